"""Push a converted model folder to the Hugging Face Hub, after checking that it is complete.

The folder check runs before any network call. Every weight must load into the model of
`config.json` with no missing or unexpected keys, and the model code files named in `auto_map` must
be present. The README model card must carry the Hub metadata `base_model`, `tags`,
`pipeline_tag: image-text-to-text` and `library_name: transformers`. The upload goes through
`huggingface_hub.HfApi` (`create_repo`, `create_branch` for a new `--revision`, `upload_folder`).
Callers and tests can pass their own `HfApi`, for example one whose `endpoint` is a local server.
The token comes from `HfApi`'s usual sources (the `token` argument, `HF_TOKEN`, the login cache) and
is never printed or logged.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import validate_repo_id

from ..checkpoint import read_config
from ..errors import InvalidInputError
from .folder_check import check_weight_keys

logger = logging.getLogger(__name__)

MODEL_CARD = "README.md"
PIPELINE_TAG = "image-text-to-text"
LIBRARY_NAME = "transformers"
# Hidden files and folders (caches, markers, `.git`) stay local. `upload_folder` matches these
# patterns with fnmatch, where `*` also matches `/`.
IGNORE_PATTERNS = [".*", "*/.*"]
DEFAULT_COMMIT_MESSAGE = "Upload dual-path (DPVR-LF) model with dpvr-surgery"


@dataclass
class PushRequest:
    """Settings of one `push` run."""

    folder: Path
    repo_id: str
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    dry_run: bool = False


@dataclass
class PushResult:
    """Files uploaded (or, with `dry_run`, to be uploaded) with their sizes, and the resulting Hub URLs."""

    repo_id: str
    files: list[tuple[str, int]] = field(default_factory=list)
    dry_run: bool = False
    repo_url: str | None = None
    commit_url: str | None = None
    pull_request_url: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def push_folder(request: PushRequest, *, api: HfApi | None = None) -> PushResult:
    """Check `request.folder`, then create the Hub repository and upload the folder (nothing remote with `dry_run`)."""
    folder = Path(request.folder)
    _check_push_settings(request)
    check_push_folder(folder)
    files = list_upload_files(folder)
    result = PushResult(repo_id=request.repo_id, files=files, dry_run=request.dry_run)
    if request.dry_run:
        logger.info(
            "Dry run: %d files (%d bytes) would be uploaded to %s", len(files), result.total_bytes, request.repo_id
        )
        return result

    if constants.is_offline_mode():
        raise InvalidInputError(
            "HF_HUB_OFFLINE is set, so huggingface_hub makes no network calls and nothing can be uploaded. Unset "
            "HF_HUB_OFFLINE to push, or pass --dry-run to list the files only."
        )
    api = api or HfApi()
    if not (api.token or get_token()):
        raise InvalidInputError(
            "No Hugging Face token found. Log in with `hf auth login`, or set the HF_TOKEN environment variable to a "
            "token with write access."
        )

    # Without --private the Hub (or the organization) default applies.
    private = True if request.private else None
    repo_url = api.create_repo(request.repo_id, repo_type="model", private=private, exist_ok=True)
    result.repo_url = str(repo_url)
    logger.info("Repository %s is ready", repo_url)
    if request.revision:
        api.create_branch(request.repo_id, branch=request.revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        folder_path=folder,
        repo_id=request.repo_id,
        repo_type="model",
        revision=request.revision,
        commit_message=request.commit_message or DEFAULT_COMMIT_MESSAGE,
        create_pr=request.create_pr,
        ignore_patterns=list(IGNORE_PATTERNS),
    )
    result.commit_url = commit.commit_url
    result.pull_request_url = commit.pr_url
    logger.info("Uploaded %d files (%d bytes) to %s", len(files), result.total_bytes, commit.commit_url)
    return result


def check_push_folder(folder: Path) -> None:
    """Raise InvalidInputError listing everything that keeps `folder` from being a complete Hub model repository."""
    if not folder.is_dir():
        raise InvalidInputError(
            f"Folder not found: {folder} does not exist. Pass the output folder of convert or finetune."
        )
    config = read_config(folder)
    problems = _missing_model_code(folder, config) + _model_card_problems(folder)
    try:
        check_weight_keys(folder)
    except InvalidInputError as error:
        problems.append(str(error))
    if problems:
        raise InvalidInputError(f"{folder} is not ready to push: " + " ".join(problems))


def list_upload_files(folder: Path) -> list[tuple[str, int]]:
    """Return (path relative to `folder`, size in bytes) of every file that would be uploaded, sorted."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append((relative.as_posix(), path.stat().st_size))
    return files


def _check_push_settings(request: PushRequest) -> None:
    try:
        validate_repo_id(request.repo_id)
    except HFValidationError as error:
        raise InvalidInputError(
            f"Invalid --repo-id {request.repo_id!r}: {error}. Use the form owner/name, for example me/llava-dpvr."
        ) from error
    if "/" not in request.repo_id:
        raise InvalidInputError(
            f"Invalid --repo-id {request.repo_id!r}: expected owner/name (your user or organization name, a slash, "
            "and the model name), so that the repository is created where you intend."
        )
    if request.create_pr and request.revision:
        raise InvalidInputError(
            f"--create-pr and --revision {request.revision!r} cannot be combined: the Hub opens pull requests "
            "against the default branch. Pass one of them."
        )


def _missing_model_code(folder: Path, config: dict) -> list[str]:
    auto_map = config.get("auto_map") or {}
    if config.get("model_type") == "dpvr_llava" and not auto_map:
        return ["config.json has no auto_map, so transformers cannot find the model code with trust_remote_code=True."]
    modules = sorted({reference.split(".")[0] for reference in auto_map.values() if isinstance(reference, str)})
    missing = [f"{module}.py" for module in modules if not (folder / f"{module}.py").is_file()]
    if missing:
        return [f"Model code {', '.join(missing)} named in config.json auto_map is missing."]
    return []


def _model_card_problems(folder: Path) -> list[str]:
    card = folder / MODEL_CARD
    if not card.is_file():
        return [f"{MODEL_CARD} (the model card) is missing; convert writes one."]
    try:
        metadata = metadata_load(card) or {}
    except ValueError as error:
        return [f"The model card metadata of {MODEL_CARD} is invalid YAML: {error}."]

    problems = []
    base_model = metadata.get("base_model")
    if not base_model:
        problems.append("The model card has no base_model.")
    elif any(str(model).startswith(("/", "./", "../", "~")) for model in _as_list(base_model)):
        problems.append(
            f"The model card's base_model {base_model!r} is a local path (the folder it was converted from); "
            "set it to the source model's Hub id, such as llava-hf/llava-1.5-7b-hf."
        )
    tags = metadata.get("tags")
    if not isinstance(tags, list) or not tags:
        problems.append("The model card has no tags list.")
    if metadata.get("pipeline_tag") != PIPELINE_TAG:
        problems.append(f"The model card has pipeline_tag {metadata.get('pipeline_tag')!r}, expected {PIPELINE_TAG!r}.")
    if metadata.get("library_name") != LIBRARY_NAME:
        problems.append(f"The model card has library_name {metadata.get('library_name')!r}, expected {LIBRARY_NAME!r}.")
    if problems:
        problems.append(f"Fix the YAML block at the top of {MODEL_CARD}.")
    return problems


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


__all__ = ["PushRequest", "PushResult", "check_push_folder", "list_upload_files", "push_folder"]
