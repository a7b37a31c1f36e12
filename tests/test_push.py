"""`push`: the folder check, and uploads through `huggingface_hub.HfApi` to a local HTTP server.

The server below implements the Hub endpoints that `HfApi.create_repo`, `create_branch`,
`upload_folder` and `create_pull_request` call (repository creation, branches, model card
validation, preupload, commit, pull requests, and the git LFS batch API with its upload and verify
actions), records every request and keeps the committed files, so the tests check what actually
reached the wire.
"""

import base64
import hashlib
import json
import logging
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from click.testing import CliRunner
from huggingface_hub import HfApi, constants
from tiny_models import make_tiny_llava

from dpvr_surgery.cli import main
from dpvr_surgery.convert import ConvertRequest, convert_checkpoint
from dpvr_surgery.errors import InvalidInputError
from dpvr_surgery.export.hub import PushRequest, push_folder
from dpvr_surgery.plan import PlanSettings

TOKEN = "hf_localtesttoken0123456789abcdef"
REPO_ID = "tester/tiny-dpvr"
# Files that the fake Hub marks for git LFS in the LFS test, instead of inline in the commit.
LFS_SUFFIXES = (".safetensors",)


class FakeHub:
    """State of the local Hub: requests seen, repositories, commits, pull requests and LFS objects."""

    def __init__(self):
        # With hf_xet installed, huggingface_hub sends every "lfs" file through Xet storage, which
        # this server does not emulate, so it returns "regular" (inline in the commit) by default.
        self.lfs_suffixes: tuple[str, ...] = ()
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.pull_requests: list[dict] = []
        self.lfs_objects: dict[str, bytes] = {}
        self.validated_cards: list[str] = []
        self.base_url = ""


def make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _reply(self, status: int, payload: dict | None = None):
            data = json.dumps(payload or {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self, body: bytes) -> str:
            path = urlsplit(self.path).path
            hub.requests.append(
                {"method": self.command, "path": path, "query": urlsplit(self.path).query,
                 "authorization": self.headers.get("Authorization"), "body": body}
            )
            return path

        def do_GET(self):
            path = self._record(b"")
            match = re.fullmatch(r"/api/models/(.+)/discussions/(\d+)", path)
            if match:
                pull_request = hub.pull_requests[int(match.group(2)) - 1]
                return self._reply(200, pull_request)
            return self._reply(404, {"error": f"unexpected GET {path}"})

        def do_PUT(self):
            body = self._body()
            path = self._record(b"<binary>")
            match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
            if match and hashlib.sha256(body).hexdigest() == match.group(1):
                hub.lfs_objects[match.group(1)] = body
                return self._reply(200)
            return self._reply(400, {"error": f"bad LFS upload {path}"})

        def do_POST(self):
            body = self._body()
            path = self._record(body)
            if path == "/api/repos/create":
                request = json.loads(body)
                repo_id = f"{request['organization']}/{request['name']}"
                hub.repos.setdefault(repo_id, {"request": request, "branches": {"main"}})
                return self._reply(200, {"url": f"{hub.base_url}/{repo_id}", "name": repo_id})
            if match := re.fullmatch(r"/api/models/(.+)/branch/(.+)", path):
                hub.repos[match.group(1)]["branches"].add(unquote(match.group(2)))
                return self._reply(200)
            if match := re.fullmatch(r"/api/models/(.+)/preupload/(.+)", path):
                files = json.loads(body)["files"]
                modes = [
                    {"path": item["path"], "uploadMode": "lfs" if item["path"].endswith(hub.lfs_suffixes) else "regular",
                     "shouldIgnore": False, "oid": None}
                    for item in files
                ]
                return self._reply(200, {"files": modes})
            if match := re.fullmatch(r"/api/models/(.+)/commit/(.+)", path):
                return self._commit(match.group(1), unquote(match.group(2)), body)
            if match := re.fullmatch(r"/api/models/(.+)/discussions", path):
                return self._open_pull_request(match.group(1), json.loads(body))
            if match := re.fullmatch(r"/(.+)\.git/info/lfs/objects/batch", path):
                objects = [
                    {"oid": item["oid"], "size": item["size"], "authenticated": True,
                     "actions": {"upload": {"href": f"{hub.base_url}/lfs-upload/{item['oid']}"},
                                 "verify": {"href": f"{hub.base_url}/lfs-verify"}}}
                    for item in json.loads(body)["objects"]
                ]
                return self._reply(200, {"transfer": "basic", "objects": objects})
            if path == "/api/validate-yaml":
                hub.validated_cards.append(json.loads(body)["content"])
                return self._reply(200, {"errors": [], "warnings": []})
            if path == "/lfs-verify":
                request = json.loads(body)
                found = request["oid"] in hub.lfs_objects
                return self._reply(200 if found else 404)
            return self._reply(404, {"error": f"unexpected POST {path}"})

        def _commit(self, repo_id: str, revision: str, body: bytes):
            files, header = {}, None
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    header = item["value"]
                elif item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "lfsFile":
                    files[item["value"]["path"]] = hub.lfs_objects[item["value"]["oid"]]
            hub.commits.append({"repo_id": repo_id, "revision": revision, "header": header, "files": files,
                                "create_pr": "create_pr=1" in urlsplit(self.path).query})
            oid = f"{len(hub.commits):040x}"
            return self._reply(200, {"commitUrl": f"{hub.base_url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                     "pullRequestUrl": f"{hub.base_url}/{repo_id}/discussions/1"})

        def _open_pull_request(self, repo_id: str, request: dict):
            number = len(hub.pull_requests) + 1
            hub.pull_requests.append({
                "title": request["title"], "num": number, "author": {"name": "tester"},
                "createdAt": "2025-01-01T00:00:00.000Z", "status": "draft",
                "repo": {"name": repo_id, "type": "model"}, "isPullRequest": True, "events": [],
                "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [],
            })
            return self._reply(200, {"num": number})

    return Handler


@pytest.fixture
def fake_hub(monkeypatch):
    # The tests run with HF_HUB_OFFLINE=1, under which huggingface_hub refuses every request.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub))
    hub.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hub
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("push")
    make_tiny_llava(seed=0).save_pretrained(root / "source")
    output = root / "converted"
    convert_checkpoint(
        ConvertRequest(model=str(root / "source"), output=output, settings=PlanSettings(2), command_line="test"),
        show_progress=False,
    )
    return output


@pytest.fixture
def folder(converted, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(converted, copy)
    # convert records a local source by its path, which push rejects; a user sets the Hub id instead.
    card = copy / "README.md"
    card.write_text(re.sub(r"^base_model: .*$", "base_model: llava-hf/llava-1.5-7b-hf", card.read_text(), count=1,
                           flags=re.MULTILINE))
    (copy / ".cache").mkdir()
    (copy / ".cache" / "state").write_text("local only")
    return copy


def local_files(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    }


def test_push_uploads_every_file(fake_hub, folder, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    api = HfApi(endpoint=fake_hub.base_url, token=TOKEN)
    result = push_folder(PushRequest(folder=folder, repo_id=REPO_ID, private=True, commit_message="First upload"), api=api)

    assert fake_hub.repos[REPO_ID]["request"]["visibility"] == "private"
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit["revision"] == "main"
    assert commit["header"]["summary"] == "First upload"
    assert commit["files"] == local_files(folder)
    assert ".cache/state" not in commit["files"]
    assert fake_hub.validated_cards == [(folder / "README.md").read_text()]
    assert result.commit_url.startswith(f"{fake_hub.base_url}/{REPO_ID}/commit/")
    assert result.total_bytes == sum(len(data) for data in commit["files"].values())

    assert all(request["authorization"] == f"Bearer {TOKEN}" for request in fake_hub.requests)
    assert TOKEN not in caplog.text
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err


def test_push_through_lfs_without_xet(fake_hub, folder, monkeypatch):
    # Without hf_xet, huggingface_hub sends large files through the git LFS batch API.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    fake_hub.lfs_suffixes = LFS_SUFFIXES
    api = HfApi(endpoint=fake_hub.base_url, token=TOKEN)
    push_folder(PushRequest(folder=folder, repo_id=REPO_ID), api=api)

    weights = (folder / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() in fake_hub.lfs_objects
    assert any(request["path"] == "/lfs-verify" for request in fake_hub.requests)
    assert fake_hub.commits[0]["files"] == local_files(folder)


def test_push_to_new_branch(fake_hub, folder):
    api = HfApi(endpoint=fake_hub.base_url, token=TOKEN)
    push_folder(PushRequest(folder=folder, repo_id=REPO_ID, revision="dpvr-v1"), api=api)
    assert "visibility" not in fake_hub.repos[REPO_ID]["request"]
    assert "dpvr-v1" in fake_hub.repos[REPO_ID]["branches"]
    assert fake_hub.commits[0]["revision"] == "dpvr-v1"


def test_push_as_pull_request(fake_hub, folder):
    api = HfApi(endpoint=fake_hub.base_url, token=TOKEN)
    result = push_folder(PushRequest(folder=folder, repo_id=REPO_ID, create_pr=True), api=api)
    assert len(fake_hub.pull_requests) == 1
    assert fake_hub.commits[0]["revision"] == "refs/pr/1"
    assert result.pull_request_url == f"{fake_hub.base_url}/{REPO_ID}/discussions/1"


def test_dry_run_makes_no_requests(fake_hub, folder):
    runner = CliRunner()
    result = runner.invoke(main, ["push", str(folder), "--repo-id", REPO_ID, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"Dry run: {folder} is ready to push to {REPO_ID}" in result.output
    size = (folder / "model.safetensors").stat().st_size
    assert re.search(rf"\s{size:,d}\s+model\.safetensors", result.output)
    assert ".cache" not in result.output
    assert fake_hub.requests == []


def test_push_cli_without_token_fails_before_network(folder, monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    result = CliRunner().invoke(main, ["push", str(folder), "--repo-id", REPO_ID])
    assert result.exit_code == 2
    assert "No Hugging Face token found" in result.output


def test_push_refused_in_offline_mode(folder):
    assert constants.HF_HUB_OFFLINE, "the test suite runs with HF_HUB_OFFLINE=1"
    with pytest.raises(InvalidInputError, match="HF_HUB_OFFLINE is set, so huggingface_hub makes no network calls"):
        push_folder(PushRequest(folder=folder, repo_id=REPO_ID), api=HfApi(endpoint="http://127.0.0.1:9", token=TOKEN))


@pytest.mark.parametrize(
    "card, message",
    [
        ("---\nbase_model: x\ntags: [a]\npipeline_tag: text-generation\nlibrary_name: transformers\n---\n",
         "pipeline_tag 'text-generation', expected 'image-text-to-text'"),
        ("---\ntags: [a]\npipeline_tag: image-text-to-text\nlibrary_name: transformers\n---\n", "no base_model"),
        ("---\nbase_model: x\npipeline_tag: image-text-to-text\nlibrary_name: transformers\n---\n", "no tags list"),
        (
            "---\nbase_model: x\ntags: [a]\npipeline_tag: image-text-to-text\n---\n",
            "library_name None, expected 'transformers'",
        ),
        ("# no metadata\n", "no base_model"),
        ("---\nbase_model: /data/llava\ntags: [a]\npipeline_tag: image-text-to-text\nlibrary_name: transformers\n---\n",
         "is a local path"),
    ],
)
def test_model_card_metadata_checked(folder, card, message):
    (folder / "README.md").write_text(card)
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        push_folder(PushRequest(folder=folder, repo_id=REPO_ID, dry_run=True))


def test_missing_model_code_rejected(folder):
    (folder / "modeling_dpvr_llava.py").unlink()
    message = r"Model code modeling_dpvr_llava\.py named in config.json auto_map is missing"
    with pytest.raises(InvalidInputError, match=message):
        push_folder(PushRequest(folder=folder, repo_id=REPO_ID, dry_run=True))


def test_missing_weight_rejected(folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.side_branch.layers.0.mlp.up_proj.weight"]
    weights["model.extra.weight"] = weights["lm_head.weight"].clone()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidInputError) as error:
        push_folder(PushRequest(folder=folder, repo_id=REPO_ID, dry_run=True))
    assert "1 missing key(s): model.side_branch.layers.0.mlp.up_proj.weight" in str(error.value)
    assert "1 unexpected key(s): model.extra.weight" in str(error.value)


def test_invalid_repo_settings_rejected(folder):
    with pytest.raises(InvalidInputError, match="expected owner/name"):
        push_folder(PushRequest(folder=folder, repo_id="tiny-dpvr", dry_run=True))
    with pytest.raises(InvalidInputError, match="--create-pr and --revision 'v1' cannot be combined"):
        push_folder(PushRequest(folder=folder, repo_id=REPO_ID, revision="v1", create_pr=True, dry_run=True))


def test_all_problems_reported_together(folder):
    (folder / "README.md").write_text("# no metadata\n")
    (folder / "configuration_dpvr_llava.py").unlink()
    (folder / "model.safetensors").unlink()
    with pytest.raises(InvalidInputError) as error:
        push_folder(PushRequest(folder=folder, repo_id=REPO_ID, dry_run=True))
    message = str(error.value)
    assert "Model code configuration_dpvr_llava.py named in config.json auto_map is missing" in message
    assert "The model card has no base_model" in message
    assert "No weights found in" in message


def test_local_base_model_rejected(converted):
    with pytest.raises(InvalidInputError, match="is a local path"):
        push_folder(PushRequest(folder=converted, repo_id=REPO_ID, dry_run=True))
