"""Streaming conversion of real checkpoint layouts: files written, keys, reloading, and errors."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import IMAGE_TOKEN_ID, make_tiny_llava, tiny_processor
from transformers import AutoModelForImageTextToText, AutoProcessor

from dpvr_surgery.checkpoint import normalize_llava_key
from dpvr_surgery.convert import ConvertRequest, convert_checkpoint
from dpvr_surgery.errors import InvalidInputError
from dpvr_surgery.modeling import DpvrLlavaForConditionalGeneration
from dpvr_surgery.plan import PlanSettings
from dpvr_surgery.surgery import convert_model

SPLIT = 2


def save_source(folder: Path, *, layout: str = "save_pretrained", shard_size: str | None = None, **config_kwargs):
    """Save a tiny LLaVA in one of the checkpoint layouts that users have; return the in-memory model."""
    model = make_tiny_llava(seed=3, **config_kwargs)
    if layout == "save_pretrained":
        kwargs = {"max_shard_size": shard_size} if shard_size else {}
        model.save_pretrained(folder, **kwargs)
    else:
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
        state = {key: value.contiguous() for key, value in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        if layout == "hub-legacy":
            state = {legacy_key(key): value for key, value in state.items()}
        if layout == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        else:
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tiny_processor().save_pretrained(folder)
    return model


def legacy_key(key: str) -> str:
    """The key names of llava-hf checkpoints written by transformers 4.x before 4.52."""
    key = key.replace("model.language_model.", "language_model.model.", 1)
    key = key.replace("lm_head.", "language_model.lm_head.", 1) if key.startswith("lm_head.") else key
    key = key.replace("model.vision_tower.", "vision_tower.vision_model.", 1)
    return key.replace("model.multi_modal_projector.", "multi_modal_projector.", 1)


def convert(source: Path, output: Path, **kwargs) -> dict:
    settings = PlanSettings(kwargs.pop("split", SPLIT), **kwargs.pop("plan", {}))
    return convert_checkpoint(ConvertRequest(model=str(source), output=output, settings=settings, **kwargs))


def sample_inputs(model) -> dict:
    generator = torch.Generator().manual_seed(0)
    length = model.config.image_seq_length
    text = torch.randint(1, 100, (9,), generator=generator)
    input_ids = torch.cat([text[:3], torch.full((length,), IMAGE_TOKEN_ID), text[3:]])[None]
    pixel_values = torch.randn(1, 3, 32, 32, generator=generator)
    return {"input_ids": input_ids, "pixel_values": pixel_values}


def logits_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


@pytest.fixture(scope="module")
def converted_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    source = save_source(root / "source", shard_size="60KB")
    output = root / "converted"
    report = convert(root / "source", output, max_shard_size="150KB")
    return source, output, report


def test_output_folder_layout(converted_folder):
    _, output, report = converted_folder
    names = {path.name for path in output.iterdir()}
    for required in (
        "config.json",
        "configuration_dpvr_llava.py",
        "modeling_dpvr_llava.py",
        "generation_config.json",
        "model.safetensors.index.json",
        "dpvr_recipe.yaml",
        "dpvr_report.json",
        "README.md",
        "tokenizer.json",
        "processor_config.json",
        "chat_template.jinja",
    ):
        assert required in names, required
    assert len([name for name in names if name.endswith(".safetensors")]) > 1
    assert not [name for name in output.parent.iterdir() if name.name.startswith(".converted")]

    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "dpvr_llava"
    assert config["split_layer"] == SPLIT
    assert config["side_branch_depth"] == 1
    assert config["num_fusion_layers"] == 1
    assert config["side_branch_init"] == "copy"
    assert config["saturation"] is None
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_dpvr_llava.DpvrLlavaForConditionalGeneration"

    recipe = yaml.safe_load((output / "dpvr_recipe.yaml").read_text())
    assert recipe["version"] == 1
    assert recipe["convert"]["split"] == SPLIT
    assert report["verification"]["max_abs_diff"] <= 1e-5

    card = (output / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["pipeline_tag"] == "image-text-to-text"
    assert metadata["library_name"] == "transformers"
    assert "dpvr-surgery" in metadata["tags"]
    assert metadata["base_model"]


def test_fixed_key_names_and_identical_weights(converted_folder):
    source, output, _ = converted_folder
    index = json.loads((output / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    source_state = source.state_dict()
    side_keys = {key for key in keys if key.startswith("model.side_branch.")}
    assert keys - side_keys == set(source_state)
    layer_keys = [key.removeprefix(f"model.language_model.layers.{SPLIT}.") for key in source_state if key.startswith(f"model.language_model.layers.{SPLIT}.")]
    assert side_keys == {f"model.side_branch.layers.0.{suffix}" for suffix in layer_keys}

    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(output / shard, "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if key.startswith("model.side_branch.layers.0."):
                    suffix = key.removeprefix("model.side_branch.layers.0.")
                    expected = source_state[f"model.language_model.layers.{SPLIT}.{suffix}"]
                else:
                    expected = source_state[key]
                assert torch.equal(tensor, expected), key


def test_reload_through_auto_class(converted_folder):
    source, output, _ = converted_folder
    model = AutoModelForImageTextToText.from_pretrained(output).eval()
    assert isinstance(model, DpvrLlavaForConditionalGeneration)
    inputs = sample_inputs(source)
    expected = logits_of(convert_model(source, split_layer=SPLIT), inputs)
    assert (logits_of(model, inputs) - expected).abs().max() <= 1e-5
    assert AutoProcessor.from_pretrained(output).chat_template


def test_reload_with_remote_code_only(converted_folder, tmp_path):
    source, output, _ = converted_folder
    inputs = sample_inputs(source)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys

        class BlockPackage:
            def find_spec(self, name, path=None, target=None):
                if name == "dpvr_surgery" or name.startswith("dpvr_surgery."):
                    raise ImportError("dpvr_surgery is blocked in this process")

        sys.meta_path.insert(0, BlockPackage())
        import torch
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained({str(output)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            torch.save(model(**inputs, use_cache=False).logits, {str(tmp_path / "logits.pt")!r})
        assert not [name for name in sys.modules if name.startswith("dpvr_surgery")]
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    remote_logits = torch.load(tmp_path / "logits.pt")
    expected = logits_of(convert_model(source, split_layer=SPLIT), inputs)
    assert (remote_logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "layout, config_kwargs",
    [
        ("hub-legacy", {}),
        ("current", {}),
        ("bin", {}),
        ("save_pretrained", {"tie_word_embeddings": True, "num_kv_heads": 1}),
        ("hub-legacy", {"select_strategy": "full", "feature_layer": [-2, -1]}),
        ("current", {"num_kv_heads": 4}),
    ],
)
def test_layouts_and_variants_convert(tmp_path, layout, config_kwargs):
    source = save_source(tmp_path / "source", layout=layout, **config_kwargs)
    output = tmp_path / "converted"
    report = convert(tmp_path / "source", output)
    assert report["verification"]["max_abs_diff"] <= 1e-5
    model = DpvrLlavaForConditionalGeneration.from_pretrained(output).eval()
    inputs = sample_inputs(source)
    expected = logits_of(convert_model(source, split_layer=SPLIT), inputs)
    assert (logits_of(model, inputs) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("init, copied_layer", [("copy-last", 4), ("random", None)])
def test_side_branch_init_options(tmp_path, init, copied_layer):
    source = save_source(tmp_path / "source")
    output = tmp_path / "converted"
    convert(tmp_path / "source", output, plan={"side_branch_init": init})
    state = load_file(output / "model.safetensors")
    side = state["model.side_branch.layers.0.self_attn.q_proj.weight"]
    if copied_layer is None:
        for layer in source.model.language_model.layers:
            assert not torch.equal(side, layer.self_attn.q_proj.weight)
    else:
        assert torch.equal(side, source.model.language_model.layers[copied_layer].self_attn.q_proj.weight)


def test_dtype_cast(tmp_path):
    save_source(tmp_path / "source")
    convert(tmp_path / "source", tmp_path / "converted", dtype="bf16")
    state = load_file(tmp_path / "converted" / "model.safetensors")
    assert {tensor.dtype for tensor in state.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["dtype"] == "bfloat16"


def test_failed_verification_leaves_no_output(tmp_path, monkeypatch):
    save_source(tmp_path / "source")
    output = tmp_path / "converted"

    def corrupt_then_check(source, folder, dtype=None):
        raise InvalidInputError("simulated failure after the weights were written")

    monkeypatch.setattr("dpvr_surgery.convert.verify_conversion", corrupt_then_check)
    with pytest.raises(InvalidInputError, match="simulated failure"):
        convert(tmp_path / "source", output)
    assert not output.exists()
    assert [path.name for path in tmp_path.iterdir()] == ["source"]


def test_plain_llama_rejected(tmp_path):
    source = make_tiny_llava()
    source.model.language_model.save_pretrained(tmp_path / "llama")
    with pytest.raises(InvalidInputError, match=r"not a LLaVA model: its config.json has model_type 'llama'.*'llava'"):
        convert(tmp_path / "llama", tmp_path / "out")


def test_converted_model_rejected_as_source(converted_folder, tmp_path):
    _, output, _ = converted_folder
    with pytest.raises(InvalidInputError, match="already a converted dual-path model"):
        convert(output, tmp_path / "again")


def test_missing_shard_named(tmp_path):
    save_source(tmp_path / "source", shard_size="60KB")
    missing = sorted((tmp_path / "source").glob("model-*.safetensors"))[1]
    missing.unlink()
    with pytest.raises(InvalidInputError, match=rf"Missing weight shard .*{missing.name}"):
        convert(tmp_path / "source", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_shard_named(tmp_path):
    save_source(tmp_path / "source")
    weights = tmp_path / "source" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(InvalidInputError, match=r"model\.safetensors"):
        convert(tmp_path / "source", tmp_path / "out")


def test_missing_weight_key_rejected(tmp_path):
    source = save_source(tmp_path / "source", layout="current")
    state = load_file(tmp_path / "source" / "model.safetensors")
    state.pop("model.multi_modal_projector.linear_1.bias")
    save_file(state, str(tmp_path / "source" / "model.safetensors"), metadata={"format": "pt"})
    del source
    with pytest.raises(InvalidInputError, match=r"multi_modal_projector\.linear_1\.bias"):
        convert(tmp_path / "source", tmp_path / "out")


@pytest.mark.parametrize("split", [0, 5, 9])
def test_split_outside_range_gives_range(tmp_path, split):
    save_source(tmp_path / "source")
    with pytest.raises(InvalidInputError, match=rf"split layer {split} is outside the valid range 1\.\.4 .* 6 layers"):
        convert(tmp_path / "source", tmp_path / "out", split=split)


def test_existing_output_needs_overwrite(converted_folder, tmp_path):
    source_dir = converted_folder[1].parent / "source"
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    with pytest.raises(InvalidInputError, match="--overwrite"):
        convert(source_dir, output)
    assert (output / "keep.txt").read_text() == "user data"

    convert(source_dir, output, overwrite=True)
    assert not (output / "keep.txt").exists()
    assert (output / "config.json").exists()


def test_normalized_keys_cover_legacy_names():
    model = make_tiny_llava()
    for key in model.state_dict():
        assert normalize_llava_key(legacy_key(key)) == key


def test_save_pretrained_keeps_fixed_names(tmp_path):
    model = convert_model(make_tiny_llava(), split_layer=SPLIT)
    model.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert keys == set(model.state_dict())
    assert "model.side_branch.layers.0.self_attn.q_proj.weight" in keys
