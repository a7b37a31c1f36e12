"""Reading, key normalisation and writing of llava-hf checkpoints, on tiny real models and real files."""

import json
import os
import re
import shutil
from pathlib import Path

import psutil
import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import tiny_llava_config
from transformers import LlavaForConditionalGeneration

from dpvr_surgery.checkpoint import (
    check_keys,
    detect_key_layout,
    find_weight_files,
    iter_tensors,
    list_tensor_names,
    normalize_llava_key,
    read_config,
    resolve_model_path,
)
from dpvr_surgery.errors import InvalidInputError
from dpvr_surgery.output import (
    ShardedSafetensorsWriter,
    atomic_output_dir,
    copy_side_files,
    parse_size,
    peak_rss_bytes,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------- helpers


def _to_legacy_key(key: str) -> str:
    """Rename a transformers 5 key to the llava-hf layout of transformers < 4.52."""
    renames = (
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^model\.vision_tower\.", "vision_tower.vision_model."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    )
    for pattern, replacement in renames:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    raise AssertionError(f"no legacy name for {key}")


def _to_hub_current_key(key: str) -> str:
    """Rename a transformers 5 key to the layout of transformers 4.52 and later 4.x, with `vision_model.`."""
    return re.sub(r"^model\.vision_tower\.", "model.vision_tower.vision_model.", key)


def _build_model(tie_word_embeddings: bool) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    config = tiny_llava_config(num_layers=2, tie_word_embeddings=tie_word_embeddings)
    return LlavaForConditionalGeneration(config).eval()


def _persistent_state(model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Return the weights that a checkpoint stores: the state dict without a tied `lm_head.weight`."""
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def _write_model_folder(folder: Path, model, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _normalized_names(names: list[str]) -> set[str]:
    normalized = {normalize_llava_key(name) for name in names}
    normalized.discard(None)
    return normalized


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(find_weight_files(folder)))


@pytest.fixture(scope="module")
def tied_model():
    return _build_model(tie_word_embeddings=True)


@pytest.fixture(scope="module")
def untied_model():
    return _build_model(tie_word_embeddings=False)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tied_model):
    """Folders of the same tied model in each llava-hf layout, keyed by layout name."""
    root = tmp_path_factory.mktemp("layouts")
    state = _persistent_state(tied_model)

    folders = {
        "transformers5": _write_model_folder(root / "transformers5", tied_model, state),
        "hub_current": _write_model_folder(
            root / "hub_current", tied_model, {_to_hub_current_key(k): v for k, v in state.items()}
        ),
        "legacy": _write_model_folder(root / "legacy", tied_model, {_to_legacy_key(k): v for k, v in state.items()}),
    }
    # transformers 5.25 `save_pretrained` writes the older prefixes, without `vision_model.`.
    tied_model.save_pretrained(root / "save_pretrained")
    folders["save_pretrained"] = root / "save_pretrained"
    return folders


def _make_fake_hub_cache(cache_dir: Path, source: Path, repo_id: str = "owner/name") -> Path:
    """Build the Hugging Face cache layout for `repo_id` at COMMIT, files as links to blobs."""
    storage = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir()

    for index, path in enumerate(sorted(source.iterdir())):
        blob = storage / "blobs" / f"blob{index:04d}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))

    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


# --------------------------------------------------------------------------- resolve_model_path


def test_resolve_local_folder(layouts):
    folder = layouts["transformers5"]
    assert resolve_model_path(str(folder)) == folder


def test_resolve_folder_without_config(tmp_path):
    with pytest.raises(InvalidInputError, match=r"config\.json not found"):
        resolve_model_path(str(tmp_path))


def test_resolve_file_instead_of_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(InvalidInputError, match=r"it is a file.*Pass the folder"):
        resolve_model_path(str(file))


def test_resolve_missing_local_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(InvalidInputError, match=re.escape(f"{missing} does not exist")):
        resolve_model_path(str(missing))


def test_resolve_invalid_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("not a repo id!", "a/b/c", "owner/name--x"):
        with pytest.raises(InvalidInputError, match=r"neither an existing local folder nor a valid Hub id"):
            resolve_model_path(value)


def test_resolve_uncached_repo_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    cache_dir = tmp_path / "hub-cache"

    with pytest.raises(InvalidInputError) as caught:
        resolve_model_path("owner/name", revision="v1.0", cache_dir=cache_dir)

    message = str(caught.value)
    assert f"no local folder {tmp_path / 'owner/name'} exists" in message
    assert "Hub id 'owner/name' (revision v1.0)" in message
    assert str(cache_dir) in message
    assert "Offline mode is on" in message
    assert "local_files_only" not in message
    assert "hf download owner/name --local-dir DIR" in message


def test_resolve_cached_snapshot_offline(tmp_path, monkeypatch, layouts):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    cache_dir = tmp_path / "hub-cache"
    snapshot = _make_fake_hub_cache(cache_dir, layouts["transformers5"])

    resolved = resolve_model_path("owner/name", cache_dir=cache_dir)
    assert resolved.resolve() == snapshot.resolve()
    assert read_config(resolved)["model_type"] == "llava"

    by_commit = resolve_model_path("owner/name", revision=COMMIT, cache_dir=cache_dir)
    assert by_commit.resolve() == snapshot.resolve()

    # The weights resolve through the cache's links to blobs.
    files = find_weight_files(resolved)
    assert len(list_tensor_names(files)) > 0


def test_resolve_cached_repo_missing_revision(tmp_path, monkeypatch, layouts):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    cache_dir = tmp_path / "hub-cache"
    _make_fake_hub_cache(cache_dir, layouts["transformers5"])

    expected = r"Hub id 'owner/name' \(revision v2\) is not in the Hugging Face cache"
    with pytest.raises(InvalidInputError, match=expected):
        resolve_model_path("owner/name", revision="v2", cache_dir=cache_dir)


# --------------------------------------------------------------------------- read_config


def test_read_config(layouts):
    config = read_config(layouts["transformers5"])
    assert config["model_type"] == "llava"
    assert config["text_config"]["num_hidden_layers"] == 2


def test_read_config_missing(tmp_path):
    with pytest.raises(InvalidInputError, match=re.escape(f"{tmp_path / 'config.json'} does not exist")):
        read_config(tmp_path)


def test_read_config_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match=re.escape(f"Invalid model config {tmp_path / 'config.json'}")):
        read_config(tmp_path)


# --------------------------------------------------------------------------- find_weight_files and reading


def test_find_single_safetensors(layouts):
    files = find_weight_files(layouts["transformers5"])
    assert files.format == "safetensors"
    assert files.indexed is False
    assert files.files == [layouts["transformers5"] / "model.safetensors"]


def test_sharded_index_reads_all_tensors(tmp_path, tied_model):
    tied_model.save_pretrained(tmp_path, max_shard_size="20KB")
    files = find_weight_files(tmp_path)

    assert files.indexed is True
    assert len(files.files) > 1
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f.name) for f in files.files)

    names = list_tensor_names(files)
    tensors = dict(iter_tensors(files))
    assert sorted(names) == sorted(tensors)

    expected = _persistent_state(tied_model)
    normalized = {normalize_llava_key(name): tensor for name, tensor in tensors.items()}
    assert normalized.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(normalized[name], tensor), name


def test_missing_shard(tmp_path, tied_model):
    tied_model.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()

    with pytest.raises(InvalidInputError, match=re.escape(f"Missing weight shard {shard}")):
        find_weight_files(tmp_path)


def test_invalid_index_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2")
    with pytest.raises(InvalidInputError, match=r"Invalid weight index .*model\.safetensors\.index\.json"):
        find_weight_files(tmp_path)


def test_index_shard_outside_folder(tmp_path):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidInputError, match=r"shard '\.\./elsewhere\.safetensors' is not a file name"):
        find_weight_files(tmp_path)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidInputError) as caught:
        find_weight_files(tmp_path)

    message = str(caught.value)
    assert f"No weights found in {tmp_path}" in message
    names = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
    for name in names:
        assert name in message


def test_safetensors_preferred_over_bin(layouts, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(layouts["transformers5"], folder)
    torch.save({"a": torch.ones(2)}, folder / "pytorch_model.bin")

    assert find_weight_files(folder).format == "safetensors"

    (folder / "model.safetensors").unlink()
    assert find_weight_files(folder).format == "bin"


def test_single_bin_round_trip(tmp_path, untied_model):
    state = _persistent_state(untied_model)
    legacy_state = {_to_legacy_key(k): v for k, v in state.items()}
    torch.save(legacy_state, tmp_path / "pytorch_model.bin")

    files = find_weight_files(tmp_path)
    assert files.format == "bin"
    assert files.indexed is False

    assert sorted(list_tensor_names(files)) == sorted(legacy_state)
    for name, tensor in iter_tensors(files):
        assert torch.equal(tensor, legacy_state[name]), name


def test_bin_index_round_trip(tmp_path, untied_model):
    state = _persistent_state(untied_model)
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for shard_name, shard_keys in halves.items():
        torch.save({key: state[key] for key in shard_keys}, tmp_path / shard_name)
        weight_map.update({key: shard_name for key in shard_keys})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    files = find_weight_files(tmp_path)
    assert files.format == "bin"
    assert files.indexed is True
    assert [f.name for f in files.files] == sorted(halves)

    tensors = _read_all(tmp_path)
    assert tensors.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(tensors[name], tensor), name


class _NotATensor:
    """A picklable object that `torch.load(weights_only=True)` must reject."""


def test_bin_with_object_rejected(tmp_path):
    torch.save({"weight": torch.ones(2), "payload": _NotATensor()}, tmp_path / "pytorch_model.bin")
    files = find_weight_files(tmp_path)

    with pytest.raises(InvalidInputError, match=r"contains Python objects other than tensors.*weights_only=True"):
        list(iter_tensors(files))
    with pytest.raises(InvalidInputError, match=r"Unsafe or invalid PyTorch checkpoint"):
        list_tensor_names(files)


def test_bin_with_plain_value_rejected(tmp_path):
    torch.save({"weight": torch.ones(2), "step": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InvalidInputError, match=r"entry 'step' has type int, not a tensor"):
        list(iter_tensors(find_weight_files(tmp_path)))


def test_truncated_safetensors(tmp_path, layouts):
    shutil.copytree(layouts["transformers5"], tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    files = find_weight_files(tmp_path / "model")

    expected = re.escape(f"Corrupt or truncated weight file {weights}") + r".*download it again"
    with pytest.raises(InvalidInputError, match=expected):
        list_tensor_names(files)
    with pytest.raises(InvalidInputError, match=expected):
        list(iter_tensors(files))


def test_truncated_bin(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.ones(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(InvalidInputError, match=re.escape(f"Corrupt or truncated weight file {path}")):
        list(iter_tensors(find_weight_files(tmp_path)))


# --------------------------------------------------------------------------- key layouts


@pytest.mark.parametrize("layout", ["transformers5", "hub_current", "legacy", "save_pretrained"])
def test_layouts_normalize_to_model_keys(layouts, tied_model, layout):
    names = list_tensor_names(find_weight_files(layouts[layout]))
    fresh = LlavaForConditionalGeneration(tied_model.config).state_dict()
    expected = set(fresh) - {"lm_head.weight"}

    assert _normalized_names(names) == expected


def test_layouts_load_in_transformers(layouts, tied_model):
    # The hand-written layouts must be ones that transformers itself recognises.
    for layout in ("hub_current", "legacy"):
        model, info = LlavaForConditionalGeneration.from_pretrained(layouts[layout], output_loading_info=True)
        assert info["missing_keys"] == set(), layout
        assert info["unexpected_keys"] == set(), layout


def test_untied_lm_head_normalizes(untied_model):
    state = _persistent_state(untied_model)
    legacy_names = [_to_legacy_key(name) for name in state]

    assert "language_model.lm_head.weight" in legacy_names
    assert _normalized_names(legacy_names) == set(untied_model.state_dict())


def test_normalized_tensors_match_across_layouts(layouts):
    reference = {normalize_llava_key(k): v for k, v in _read_all(layouts["transformers5"]).items()}
    legacy = {normalize_llava_key(k): v for k, v in _read_all(layouts["legacy"]).items()}

    assert reference.keys() == legacy.keys()
    for name, tensor in reference.items():
        assert torch.equal(legacy[name], tensor), name


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("language_model.model.layers.3.mlp.up_proj.weight", "model.language_model.layers.3.mlp.up_proj.weight"),
        ("language_model.lm_head.weight", "lm_head.weight"),
        ("vision_tower.vision_model.post_layernorm.bias", "model.vision_tower.post_layernorm.bias"),
        ("vision_tower.encoder.layers.0.mlp.fc1.weight", "model.vision_tower.encoder.layers.0.mlp.fc1.weight"),
        ("multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.weight"),
        ("model.language_model.norm.weight", "model.language_model.norm.weight"),
        ("model.vision_tower.vision_model.pre_layrnorm.weight", "model.vision_tower.pre_layrnorm.weight"),
        ("model.vision_tower.embeddings.class_embedding", "model.vision_tower.embeddings.class_embedding"),
        ("model.multi_modal_projector.linear_2.bias", "model.multi_modal_projector.linear_2.bias"),
        ("lm_head.weight", "lm_head.weight"),
    ],
)
def test_normalize_key(key, expected):
    assert normalize_llava_key(key) == expected


@pytest.mark.parametrize(
    "key",
    [
        "language_model.model.layers.0.self_attn.rotary_emb.inv_freq",
        "language_model.model.rotary_emb.inv_freq",
        "model.language_model.rotary_emb.original_inv_freq",
        "vision_tower.vision_model.embeddings.position_ids",
        "model.vision_tower.embeddings.position_ids",
    ],
)
def test_normalize_drops_buffers(key):
    assert normalize_llava_key(key) is None


def test_normalize_unknown_key():
    with pytest.raises(InvalidInputError) as caught:
        normalize_llava_key("transformer.h.0.attn.c_attn.weight")

    message = str(caught.value)
    assert "Unexpected checkpoint key 'transformer.h.0.attn.c_attn.weight'" in message
    assert "model.language_model." in message
    assert "language_model.model." in message


def test_detect_key_layout(layouts):
    current = list_tensor_names(find_weight_files(layouts["transformers5"]))
    hub_current = list_tensor_names(find_weight_files(layouts["hub_current"]))
    legacy = list_tensor_names(find_weight_files(layouts["legacy"]))
    saved = list_tensor_names(find_weight_files(layouts["save_pretrained"]))

    assert detect_key_layout(current) == "current"
    assert detect_key_layout(hub_current) == "current"
    assert detect_key_layout(legacy) == "legacy"
    assert detect_key_layout(saved) == "legacy"
    assert detect_key_layout(current[:5] + legacy[5:]) == "mixed"


def test_detect_key_layout_errors():
    with pytest.raises(InvalidInputError, match=r"contains no tensors"):
        detect_key_layout([])
    with pytest.raises(InvalidInputError, match=r"Unexpected checkpoint key 'encoder\.weight'"):
        detect_key_layout(["lm_head.weight", "encoder.weight"])


# --------------------------------------------------------------------------- check_keys


def test_check_keys_equal():
    check_keys({"a", "b"}, {"b", "a"}, source="/models/x")


def test_check_keys_reports_missing_and_unexpected():
    expected = {f"model.language_model.layers.{i:02d}.weight" for i in range(12)}
    found = {"model.extra.weight"}

    with pytest.raises(InvalidInputError) as caught:
        check_keys(found, expected, source="/models/x")

    message = str(caught.value)
    assert "Checkpoint keys in /models/x do not match the model" in message
    assert "12 missing key(s): model.language_model.layers.00.weight," in message
    assert "model.language_model.layers.09.weight" in message
    assert "model.language_model.layers.10.weight" not in message
    assert "... and 2 more" in message
    assert "1 unexpected key(s): model.extra.weight." in message
    assert "Check that config.json belongs to these weights" in message


def test_check_keys_missing_only():
    with pytest.raises(InvalidInputError, match=r"1 missing key\(s\): lm_head\.weight\.") as caught:
        check_keys({"a"}, {"a", "lm_head.weight"}, source="src")
    assert "unexpected" not in str(caught.value)


# --------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("10kB", 10_000),
        ("2gB", 2 * 10**9),
        ("3 MiB", 3 * 2**20),
        ("0.5KiB", 512),
        ("7B", 7),
        ("1000", 1000),
        (1000, 1000),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GB", "5 XB", "-1GB", "0", 0, -5, "1.5", "0.1B", "abc", "5 G B", "5Gb", "500mb", "2GiBs", True]
)
def test_parse_size_invalid(text):
    with pytest.raises(InvalidInputError, match=r"Invalid size .*such as \"5GB\", \"500MB\", \"2GiB\""):
        parse_size(text)


# --------------------------------------------------------------------------- ShardedSafetensorsWriter


def test_writer_round_trip_from_pretrained(tmp_path, tied_model):
    state = _persistent_state(tied_model)
    max_shard_size = 8000
    output = tmp_path / "out"

    writer = ShardedSafetensorsWriter(output, max_shard_size)
    for name, tensor in state.items():
        writer.add(name, tensor)
    written = writer.finish()
    tied_model.config.save_pretrained(output)

    index_path = output / "model.safetensors.index.json"
    shards = sorted(output.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert written == [*shards, index_path]
    expected_names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert [s.name for s in shards] == expected_names
    assert not (output / "model.safetensors").exists()

    index = json.loads(index_path.read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert index["weight_map"].keys() == state.keys()
    assert set(index["weight_map"].values()) == {s.name for s in shards}

    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            names = list(handle.keys())
            assert handle.metadata() == {"format": "pt"}
        shard_bytes = sum(state[name].numel() * state[name].element_size() for name in names)
        assert shard_bytes <= max_shard_size or len(names) == 1, shard.name

    loaded, info = LlavaForConditionalGeneration.from_pretrained(output, output_loading_info=True)
    assert info["missing_keys"] == set()
    assert info["unexpected_keys"] == set()
    loaded_state = loaded.state_dict()
    for name, tensor in state.items():
        assert torch.equal(loaded_state[name], tensor), name


def test_writer_single_shard(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, 10**6, metadata={"source": "unit-test"})
    writer.add("a", torch.arange(6, dtype=torch.float32))
    writer.add("b", torch.ones(2, 2, dtype=torch.bfloat16))

    assert writer.finish() == [tmp_path / "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "source": "unit-test"}
        assert torch.equal(handle.get_tensor("a"), torch.arange(6, dtype=torch.float32))
        assert handle.get_tensor("b").dtype == torch.bfloat16


def test_writer_oversized_tensor_own_shard(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, 100)
    writer.add("small_1", torch.zeros(10))
    writer.add("big", torch.zeros(100))
    writer.add("small_2", torch.zeros(10))
    writer.add("small_3", torch.zeros(10))
    writer.finish()

    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map == {
        "small_1": "model-00001-of-00003.safetensors",
        "big": "model-00002-of-00003.safetensors",
        "small_2": "model-00003-of-00003.safetensors",
        "small_3": "model-00003-of-00003.safetensors",
    }


def test_writer_duplicate_name(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, 100)
    writer.add("lm_head.weight", torch.zeros(2))
    with pytest.raises(InvalidInputError, match=r"Duplicate tensor name 'lm_head\.weight'"):
        writer.add("lm_head.weight", torch.zeros(2))


def test_writer_clones_views_and_shared_storage(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    writer = ShardedSafetensorsWriter(tmp_path, 10**6)
    writer.add("base", base)
    writer.add("tied", base)
    writer.add("transposed", base.t())
    writer.add("rows", base[1:])
    writer.finish()

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("base"), base)
        assert torch.equal(handle.get_tensor("tied"), base)
        assert torch.equal(handle.get_tensor("transposed"), base.t())
        assert torch.equal(handle.get_tensor("rows"), base[1:])


def test_writer_frees_written_shards(tmp_path):
    process = psutil.Process()
    tensor_bytes = 4 * 2**20
    writer = ShardedSafetensorsWriter(tmp_path, 2 * tensor_bytes)
    baseline = process.memory_info().rss

    # 256 MiB in total: the resident memory would grow by all of it if written shards were kept.
    for index in range(64):
        writer.add(f"tensor_{index}", torch.full((tensor_bytes // 4,), float(index)))
    growth = process.memory_info().rss - baseline
    writer.finish()

    assert growth < 64 * 2**20
    assert len(list(tmp_path.glob("model-*-of-00032.safetensors"))) == 32


def test_writer_without_tensors(tmp_path):
    with pytest.raises(InvalidInputError, match=r"No tensors were written"):
        ShardedSafetensorsWriter(tmp_path, 100).finish()


# --------------------------------------------------------------------------- atomic_output_dir


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def test_atomic_output_success(tmp_path):
    output = tmp_path / "out"
    with atomic_output_dir(output, overwrite=False) as temporary:
        assert temporary.parent == tmp_path
        assert temporary.name.startswith(".out.tmp-")
        assert not output.exists()
        (temporary / "config.json").write_text("{}")

    assert (output / "config.json").read_text() == "{}"
    assert _siblings(output) == []


def test_atomic_output_respects_umask(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    output = tmp_path / "out"
    with atomic_output_dir(output, overwrite=False):
        pass
    assert output.stat().st_mode & 0o777 == 0o777 & ~umask


def test_atomic_output_exception_mid_write(tmp_path):
    output = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output_dir(output, overwrite=False) as temporary:
            (temporary / "model-00001.safetensors").write_bytes(b"x")
            raise RuntimeError("disk full")

    assert not output.exists()
    assert _siblings(output) == []


def test_atomic_output_exception_keeps_existing(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")

    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_output_dir(output, overwrite=True) as temporary:
            (temporary / "new.txt").write_text("new")
            raise RuntimeError("interrupted")

    assert sorted(p.name for p in output.iterdir()) == ["old.txt"]
    assert _siblings(output) == []


def test_atomic_output_overwrite(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")

    with atomic_output_dir(output, overwrite=True) as temporary:
        (temporary / "new.txt").write_text("new")

    assert sorted(p.name for p in output.iterdir()) == ["new.txt"]
    assert _siblings(output) == []


def test_atomic_output_refuses_non_empty(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    entered = False

    expected = re.escape(f"Output folder {output} already exists and is not empty. Pass --overwrite")
    with pytest.raises(InvalidInputError, match=expected):
        with atomic_output_dir(output, overwrite=False):
            entered = True

    assert entered is False
    assert sorted(p.name for p in output.iterdir()) == ["old.txt"]
    assert _siblings(output) == []


def test_atomic_output_empty_existing_folder(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    with atomic_output_dir(output, overwrite=False) as temporary:
        (temporary / "a.txt").write_text("a")

    assert sorted(p.name for p in output.iterdir()) == ["a.txt"]
    assert _siblings(output) == []


def test_atomic_output_file_target(tmp_path):
    output = tmp_path / "out"
    output.write_text("not a folder")
    with pytest.raises(InvalidInputError, match=r"a file with that name exists"):
        with atomic_output_dir(output, overwrite=True):
            pass
    assert output.read_text() == "not a folder"


# --------------------------------------------------------------------------- copy_side_files


def test_copy_side_files(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    side_files = [
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "generation_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    skipped = [
        ".gitattributes",
        "README.md",
        "config.json",
        "consolidated.pth",
        "model-00001-of-00002.safetensors",
        "model.gguf",
        "model.pt",
        "model.safetensors",
        "model.safetensors.index.json",
        "modeling_custom.py",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ]
    for name in side_files + skipped:
        (source / name).write_text(f"content of {name}")
    (source / "assets").mkdir()
    (source / "assets" / "logo.txt").write_text("logo")

    blob = tmp_path / "blob"
    blob.write_text("linked vocabulary")
    (source / "vocab.txt").symlink_to(blob)

    destination = tmp_path / "destination"
    copied = copy_side_files(source, destination)

    assert copied == sorted([*side_files, "vocab.txt"])
    assert sorted(p.name for p in destination.iterdir()) == copied
    assert (destination / "tokenizer.json").read_text() == "content of tokenizer.json"
    assert not (destination / "vocab.txt").is_symlink()
    assert (destination / "vocab.txt").read_text() == "linked vocabulary"


# --------------------------------------------------------------------------- peak_rss_bytes


def test_peak_rss_bytes():
    peak = peak_rss_bytes()
    current = psutil.Process().memory_info().rss
    # ru_maxrss is updated lazily, so it may trail the current value by a few pages.
    assert peak >= 0.9 * current
    assert peak < psutil.virtual_memory().total


def test_atomic_output_rejects_input_folder(tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")

    for output in (source, tmp_path):
        with pytest.raises(InvalidInputError, match="would replace the input"):
            with atomic_output_dir(output, overwrite=True, inputs=[None, "llava-hf/not-a-local-path", source]):
                pass

    assert (source / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_weight_files_follow_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        writer = ShardedSafetensorsWriter(tmp_path, 1_000_000)
        writer.add("weight", torch.zeros(4))
        (path,) = writer.finish()
    finally:
        os.umask(umask)

    assert path.stat().st_mode & 0o777 == 0o644
