"""Locate, read and key-normalise llava-hf checkpoints.

A converter streams a source checkpoint with these functions: it lists the tensor names first (safetensors
headers only), checks them against the keys the target model expects, then reads tensors one at a time.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open

from dpvr_surgery.errors import InvalidInputError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_NAME = "pytorch_model.bin"
WEIGHT_FILE_NAMES = (SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME, BIN_INDEX_NAME, BIN_NAME)

# Files fetched from the Hub: config, safetensors weights, tokenizer, processor and chat template.
# `.bin` weights are fetched in a second step, and only when a repository has no safetensors.
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
HUB_BIN_PATTERNS = ["pytorch_model*.bin", BIN_INDEX_NAME]

WeightFormat = Literal["safetensors", "bin"]
KeyLayout = Literal["current", "legacy", "mixed"]


# --------------------------------------------------------------------------- model location


def resolve_model_path(
    model: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Return the folder of a model given as a local folder or as a Hub id (`owner/name`).

    A local folder is returned as given once it is known to contain `config.json`. A Hub id is looked up
    in the Hugging Face cache first, so cached models work offline, and downloaded only when that fails
    and `HF_HUB_OFFLINE` is not set. Raises InvalidInputError saying what was looked up and how to
    provide the folder.
    """
    local_path = Path(model).expanduser()
    if local_path.exists():
        return _check_local_model_folder(local_path)

    if _looks_like_local_path(model):
        raise InvalidInputError(
            f"Model folder not found: {local_path.absolute()} does not exist. "
            "Pass an existing model folder or a Hub id such as llava-hf/llava-1.5-7b-hf."
        )

    try:
        validate_repo_id(model)
    except HFValidationError as error:
        raise InvalidInputError(
            f"Invalid model {model!r}: it is neither an existing local folder nor a valid Hub id "
            f"({error}). Pass a model folder that contains config.json, or a Hub id of the form "
            "owner/name such as llava-hf/llava-1.5-7b-hf."
        ) from error

    return _resolve_hub_model(model, local_path, revision=revision, cache_dir=cache_dir)


def _looks_like_local_path(model: str) -> bool:
    """Return whether `model` can only mean a file system path, never a Hub id."""
    path_prefixes = ("/", "./", "../", "~", ".\\", "..\\")
    return model.startswith(path_prefixes) or model in (".", "..") or "\\" in model


def _check_local_model_folder(path: Path) -> Path:
    if not path.is_dir():
        raise InvalidInputError(
            f"Invalid model path {path}: it is a file, but a model must be a folder that contains "
            f"{CONFIG_NAME} and the weights. Pass the folder instead."
        )

    if not (path / CONFIG_NAME).is_file():
        raise InvalidInputError(
            f"Invalid model folder {path}: {CONFIG_NAME} not found. Pass the folder of a Hugging Face "
            "model (one that contains config.json and the weights)."
        )

    logger.debug("Using local model folder %s", path)
    return path


def _resolve_hub_model(
    repo_id: str,
    local_path: Path,
    *,
    revision: str | None,
    cache_dir: str | Path | None,
) -> Path:
    download_kwargs = {"revision": revision, "cache_dir": cache_dir}

    try:
        folder = snapshot_download(
            repo_id, local_files_only=True, allow_patterns=HUB_FILE_PATTERNS, **download_kwargs
        )
    except (OSError, ValueError) as error:
        cache_error: Exception = error
    else:
        logger.info("Using cached snapshot of %s at %s", repo_id, folder)
        return _check_hub_snapshot(Path(folder), repo_id)

    # Read at call time, so that a change of the setting after import is honoured.
    offline = hub_constants.HF_HUB_OFFLINE
    if offline:
        raise _hub_lookup_error(repo_id, local_path, revision, cache_dir, cache_error, offline=True) from cache_error

    # NOTE: the tests run offline only, so this download branch is not covered by them.
    try:
        logger.info("Model %s is not in the Hugging Face cache, downloading it", repo_id)
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS, **download_kwargs))
        if not any(folder.glob("*.safetensors")):
            logger.info("%s has no safetensors weights, downloading the .bin weights", repo_id)
            snapshot_download(repo_id, allow_patterns=HUB_BIN_PATTERNS, **download_kwargs)
    except (OSError, ValueError) as error:
        raise _hub_lookup_error(repo_id, local_path, revision, cache_dir, error, offline=False) from error

    return _check_hub_snapshot(folder, repo_id)


def _check_hub_snapshot(folder: Path, repo_id: str) -> Path:
    if not (folder / CONFIG_NAME).is_file():
        raise InvalidInputError(
            f"Invalid model {repo_id}: its snapshot {folder} contains no {CONFIG_NAME}. "
            "Check that the Hub id names a Hugging Face model repository."
        )
    return folder


def _hub_lookup_error(
    repo_id: str,
    local_path: Path,
    revision: str | None,
    cache_dir: str | Path | None,
    error: Exception,
    *,
    offline: bool,
) -> InvalidInputError:
    cache_folder = Path(cache_dir).expanduser() if cache_dir is not None else Path(hub_constants.HF_HUB_CACHE)
    revision_text = revision if revision is not None else "main"
    if offline:
        mode_text = "Offline mode is on (HF_HUB_OFFLINE=1), so nothing was downloaded."
    else:
        mode_text = "The download failed."

    # A plain cache miss adds nothing, but an incomplete snapshot or a network error is worth showing.
    detail = ""
    if not (offline and type(error) is LocalEntryNotFoundError):
        detail = f" Hub error: {type(error).__name__}: {_first_line(error)}."

    return InvalidInputError(
        f"Model not found: no local folder {local_path.absolute()} exists, and Hub id {repo_id!r} "
        f"(revision {revision_text}) is not in the Hugging Face cache {cache_folder}. {mode_text}{detail} "
        f"To provide the model, run `hf download {repo_id} --local-dir DIR` on a machine with network "
        "access, then pass DIR as the model."
    )


# --------------------------------------------------------------------------- config and weight files


def read_config(path: Path) -> dict:
    """Load `config.json` of a model folder as a dict, raising InvalidInputError if it is missing or invalid."""
    config_path = Path(path) / CONFIG_NAME
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise InvalidInputError(
            f"Model config not found: {config_path} does not exist. Pass the folder of a Hugging Face model."
        ) from error

    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInputError(
            f"Invalid model config {config_path}: not valid JSON ({error}). Re-download the file."
        ) from error

    if not isinstance(config, dict):
        raise InvalidInputError(
            f"Invalid model config {config_path}: expected a JSON object, got {type(config).__name__}. "
            "Re-download the file."
        )
    return config


@dataclass(frozen=True)
class WeightFiles:
    """Weight files of one checkpoint, in the order they are read."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    format: WeightFormat = "safetensors"
    indexed: bool = False


def find_weight_files(path: Path) -> WeightFiles:
    """Find the weights of a model folder: a safetensors index, `model.safetensors`, a `.bin` index or
    `pytorch_model.bin`, in that order of preference.

    Raises InvalidInputError when an index names a shard that is missing or when no weights exist.
    """
    folder = Path(path)
    candidates: tuple[tuple[str, WeightFormat, bool], ...] = (
        (SAFETENSORS_INDEX_NAME, "safetensors", True),
        (SAFETENSORS_NAME, "safetensors", False),
        (BIN_INDEX_NAME, "bin", True),
        (BIN_NAME, "bin", False),
    )

    for name, weight_format, indexed in candidates:
        candidate = folder / name
        if not candidate.is_file():
            continue
        files = _read_index_shards(candidate) if indexed else [candidate]
        logger.debug("Found %d %s weight file(s) in %s", len(files), weight_format, folder)
        return WeightFiles(folder=folder, files=files, format=weight_format, indexed=indexed)

    raise InvalidInputError(
        f"No weights found in {folder}: none of {', '.join(WEIGHT_FILE_NAMES)} exists. "
        "Pass a folder that contains the model weights, or download them again."
    )


def _read_index_shards(index_path: Path) -> list[Path]:
    """Return the shard files that an index's `weight_map` names, in first-use order, checking they exist."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InvalidInputError(
            f"Invalid weight index {index_path}: not valid JSON ({error}). Re-download the file."
        ) from error

    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidInputError(
            f"Invalid weight index {index_path}: it has no 'weight_map' object. Re-download the file."
        )

    shard_names = list(dict.fromkeys(weight_map.values()))
    for name in shard_names:
        if not isinstance(name, str) or Path(name).name != name:
            raise InvalidInputError(
                f"Invalid weight index {index_path}: shard {name!r} is not a file name in the model folder. "
                "Re-download the file."
            )

    shards = [index_path.parent / name for name in shard_names]
    for shard in shards:
        if not shard.is_file():
            raise InvalidInputError(
                f"Missing weight shard {shard}: {index_path.name} lists it, but the file does not exist. "
                "Download the missing shard (or the whole model) again."
            )
    return shards


# --------------------------------------------------------------------------- tensor reading


def list_tensor_names(files: WeightFiles) -> list[str]:
    """Return the tensor names of a checkpoint without reading the tensor data.

    safetensors files are read header by header. A `.bin` file is memory-mapped, so only its pickled
    index and the touched pages are read.
    """
    names: list[str] = []
    for file in files.files:
        if files.format == "safetensors":
            with _open_safetensors(file) as handle:
                names.extend(handle.keys())
        else:
            names.extend(_load_bin_state_dict(file).keys())
    return names


def iter_tensors(files: WeightFiles) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` pairs one at a time, file by file, all on the CPU.

    `.bin` files are loaded only with `torch.load(weights_only=True, mmap=True)`, which rejects pickled
    objects other than tensors, primitive values and plain containers, and any value that is not a
    tensor is rejected after loading. A corrupt or truncated file raises InvalidInputError naming the file.
    """
    for file in files.files:
        if files.format == "safetensors":
            yield from _iter_safetensors(file)
        else:
            yield from _iter_bin(file)


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as error:
        raise _corrupt_file_error(file, error) from error


def _iter_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    with _open_safetensors(file) as handle:
        for name in handle.keys():
            try:
                tensor = handle.get_tensor(name)
            except (SafetensorError, OSError) as error:
                raise _corrupt_file_error(file, error) from error
            yield name, tensor


def _iter_bin(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    state_dict = _load_bin_state_dict(file)

    # Drop each entry once yielded, so that a tensor the caller has freed is not kept alive here.
    for name in list(state_dict):
        yield name, state_dict.pop(name)


def _load_bin_state_dict(file: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(file, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise InvalidInputError(
            f"Unsafe or invalid PyTorch checkpoint {file}: it contains Python objects other than tensors, "
            "and dpvr-surgery loads .bin files only with torch.load(weights_only=True), never unpickling "
            "arbitrary objects. Use the safetensors weights of the model, or convert the file to safetensors "
            f"in an environment where you trust its source. Loader error: {_first_line(error)}"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise _corrupt_file_error(file, error) from error

    if not isinstance(loaded, dict):
        raise InvalidInputError(
            f"Invalid PyTorch checkpoint {file}: expected a state dict (a dict of tensors), "
            f"got {type(loaded).__name__}. Use the safetensors weights of the model instead."
        )

    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise InvalidInputError(
                f"Invalid PyTorch checkpoint {file}: entry {name!r} has type {type(value).__name__}, not a tensor. "
                "A weights file must be a flat dict of tensors; use the safetensors weights of the model instead."
            )
    return loaded


def _corrupt_file_error(file: Path, error: Exception) -> InvalidInputError:
    return InvalidInputError(
        f"Corrupt or truncated weight file {file}: {_first_line(error)}. "
        "The file may be incomplete: delete it and download it again."
    )


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --------------------------------------------------------------------------- key layouts

# Each rule maps one source key pattern to its `transformers` 5 name, with the layout it belongs to.
# The vision towers of llava-hf (CLIP and SigLIP) have no `vision_model.` level in transformers 5,
# but checkpoints written by transformers 4 contain it in both layouts, so the rules remove it.
LLAVA_KEY_RULES: tuple[tuple[str, str, str], ...] = (
    # Older layout (transformers < 4.52, and what transformers 5.25 `save_pretrained` still writes).
    (r"^language_model\.model\.(.+)$", r"model.language_model.\1", "legacy"),
    (r"^language_model\.lm_head\.(.+)$", r"lm_head.\1", "legacy"),
    (r"^vision_tower\.vision_model\.(.+)$", r"model.vision_tower.\1", "legacy"),
    (r"^vision_tower\.(.+)$", r"model.vision_tower.\1", "legacy"),
    (r"^multi_modal_projector\.(.+)$", r"model.multi_modal_projector.\1", "legacy"),
    # Current layout (transformers >= 4.52).
    (r"^model\.vision_tower\.vision_model\.(.+)$", r"model.vision_tower.\1", "current"),
    (r"^model\.(language_model|vision_tower|multi_modal_projector)\.(.+)$", r"model.\1.\2", "current"),
    (r"^lm_head\.(.+)$", r"lm_head.\1", "current"),
)

# Buffers that the modules recompute at load time. Old checkpoints sometimes saved them.
NON_PERSISTENT_BUFFER_PATTERNS: tuple[str, ...] = (
    r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$",
    r"^model\.vision_tower\.embeddings\.position_ids$",
)

EXPECTED_KEY_PREFIXES = (
    "model.language_model.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "lm_head.",
    "language_model.model.",
    "language_model.lm_head.",
    "vision_tower.",
    "multi_modal_projector.",
)

_COMPILED_KEY_RULES = tuple(
    (re.compile(pattern), replacement, layout) for pattern, replacement, layout in LLAVA_KEY_RULES
)
_COMPILED_BUFFER_PATTERNS = tuple(re.compile(pattern) for pattern in NON_PERSISTENT_BUFFER_PATTERNS)


def _match_key_rule(key: str) -> tuple[str, str]:
    """Return the normalised key and the layout of the first rule that matches `key`."""
    for pattern, replacement, layout in _COMPILED_KEY_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key), layout

    raise InvalidInputError(
        f"Unexpected checkpoint key {key!r}: it matches no llava-hf key layout. Expected keys start with one "
        f"of {', '.join(EXPECTED_KEY_PREFIXES)}. Check that the model is a llava-hf LlavaForConditionalGeneration "
        "checkpoint."
    )


def normalize_llava_key(key: str) -> str | None:
    """Map a llava-hf checkpoint key to its current `transformers` 5 name.

    Returns None for non-persistent buffers (`rotary_emb.inv_freq`, the vision `embeddings.position_ids`)
    that old checkpoints sometimes contain. Raises InvalidInputError for a key that matches no layout.
    """
    normalized, _ = _match_key_rule(key)
    if any(pattern.search(normalized) for pattern in _COMPILED_BUFFER_PATTERNS):
        return None
    return normalized


def detect_key_layout(names: Iterable[str]) -> KeyLayout:
    """Return "current", "legacy" or "mixed", depending on which llava-hf key layouts `names` use.

    Raises InvalidInputError for an empty list or a key that matches no layout.
    """
    layouts = {_match_key_rule(name)[1] for name in names}
    if not layouts:
        raise InvalidInputError("Invalid checkpoint: it contains no tensors. Download the model weights again.")
    if len(layouts) > 1:
        return "mixed"
    return "current" if layouts == {"current"} else "legacy"


def check_keys(found: set[str], expected: set[str], *, source: str) -> None:
    """Raise InvalidInputError unless `found` equals `expected`, listing missing and unexpected keys.

    `transformers` 5 silently initialises weights that a checkpoint lacks, so a conversion must fail
    here instead of producing a model with random weights.
    """
    missing = sorted(expected - found)
    unexpected = sorted(found - expected)
    if not missing and not unexpected:
        return

    parts = [f"Checkpoint keys in {source} do not match the model."]
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_preview(missing)}.")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}.")
    parts.append("Check that config.json belongs to these weights and that the download is complete.")
    raise InvalidInputError(" ".join(parts))


def _preview(keys: list[str], limit: int = 10) -> str:
    preview = ", ".join(keys[:limit])
    if len(keys) > limit:
        preview += f", ... and {len(keys) - limit} more"
    return preview
