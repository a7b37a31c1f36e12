"""`export safetensors`: dtype cast, re-sharding and LoRA merge, checked against peft's own merge."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from test_modeling import images_for, make_row
from tiny_models import make_tiny_llava

from dpvr_surgery.cli import main
from dpvr_surgery.convert import ConvertRequest, convert_checkpoint
from dpvr_surgery.errors import InvalidInputError
from dpvr_surgery.export.safetensors_export import SafetensorsExportRequest, export_safetensors
from dpvr_surgery.modeling import DpvrLlavaForConditionalGeneration
from dpvr_surgery.plan import PlanSettings

FUSION_LAYER = 5
FUSION_TARGETS = rf".*language_model\.layers\.{FUSION_LAYER}\.(self_attn\.(q_proj|v_proj)|mlp\.down_proj)"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export_safetensors")
    make_tiny_llava(seed=0).save_pretrained(root / "source")
    output = root / "converted"
    convert_checkpoint(
        ConvertRequest(model=str(root / "source"), output=output, settings=PlanSettings(2), command_line="test"),
        show_progress=False,
    )
    return output


def load(folder: Path) -> DpvrLlavaForConditionalGeneration:
    return DpvrLlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def add_lora_adapter(folder: Path, destination: Path, **lora_kwargs) -> PeftModel:
    """Train-free LoRA: random A and B (init_lora_weights=False) on the fusion layer, saved by peft to `destination`."""
    torch.manual_seed(7)
    config = LoraConfig(target_modules=FUSION_TARGETS, init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(load(folder), config)
    if config.modules_to_save:
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "modules_to_save" in name:
                    parameter.normal_(0.0, 0.05)
    peft_model.save_pretrained(destination)
    return peft_model


def image_prompt_logits(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    rows = [make_row([3, "image", 5], 16, generator)]
    pixel_values, _ = images_for(rows, 16, generator)
    with torch.no_grad():
        return model(input_ids=torch.tensor(rows), pixel_values=pixel_values, use_cache=False).logits


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        {"r": 4, "lora_alpha": 8, "modules_to_save": ["model.side_branch.layers.0.mlp.up_proj"]},
        {"r": 4, "lora_alpha": 16, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}},
        {"r": 8, "lora_alpha": 4, "use_rslora": True},
    ],
    ids=["modules-to-save", "rank-and-alpha-patterns", "rslora"],
)
def test_lora_merge_matches_peft(converted, tmp_path, lora_kwargs):
    folder = tmp_path / "finetuned"
    shutil.copytree(converted, folder)
    peft_model = add_lora_adapter(converted, folder, **lora_kwargs)
    expected_model = peft_model.merge_and_unload().eval()

    report = export_safetensors(SafetensorsExportRequest(folder=folder, output=tmp_path / "merged"))
    merged = load(tmp_path / "merged")
    assert len(report["adapter"]["merged_modules"]) == 3
    assert not (tmp_path / "merged" / "adapter_config.json").exists()

    expected_state = expected_model.state_dict()
    for key, value in merged.state_dict().items():
        assert torch.allclose(value, expected_state[key], atol=1e-6), key
    changed = merged.model.language_model.layers[FUSION_LAYER].self_attn.q_proj.weight
    original = load(converted).model.language_model.layers[FUSION_LAYER].self_attn.q_proj.weight
    assert (changed - original).abs().max() > 1e-3
    assert (image_prompt_logits(merged) - image_prompt_logits(expected_model)).abs().max() <= 1e-5


def test_adapter_from_separate_folder_through_cli(converted, tmp_path):
    add_lora_adapter(converted, tmp_path / "adapter", r=4, lora_alpha=8)
    result = CliRunner().invoke(
        main,
        [
            "export", "safetensors", str(converted), "-o", str(tmp_path / "merged"),
            "--adapter", str(tmp_path / "adapter"), "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "LoRA merged into 3 module(s), 0 weight(s) replaced" in result.output
    merged_layer = load(tmp_path / "merged").model.language_model.layers[FUSION_LAYER]
    original_layer = load(converted).model.language_model.layers[FUSION_LAYER]
    assert not torch.equal(merged_layer.mlp.down_proj.weight, original_layer.mlp.down_proj.weight)
    assert torch.equal(merged_layer.mlp.up_proj.weight, original_layer.mlp.up_proj.weight)


def test_finetune_adapter_folder_matches_load_finetuned(converted, tmp_path):
    from safetensors.torch import save_file

    from dpvr_surgery.finetune import load_finetuned

    adapter = tmp_path / "adapter"
    add_lora_adapter(converted, adapter, r=4, lora_alpha=8)
    side_branch = {
        f"model.side_branch.{key}": value + 0.01
        for key, value in load(converted).model.side_branch.state_dict().items()
    }
    save_file(side_branch, str(adapter / "trained_weights.safetensors"), metadata={"format": "pt"})

    report = export_safetensors(SafetensorsExportRequest(folder=converted, output=tmp_path / "merged", adapter=adapter))
    assert report["adapter"]["replaced_weights"] == sorted(side_branch)
    expected = load_finetuned(converted, adapter, dtype=torch.float32).state_dict()
    for key, value in load(tmp_path / "merged").state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key


def test_adapter_folder_without_weights_rejected(converted, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="Invalid adapter folder .*: neither adapter_config.json"):
        export_safetensors(SafetensorsExportRequest(folder=converted, output=tmp_path / "out", adapter=tmp_path / "empty"))


def test_dtype_cast_and_shards(converted, tmp_path):
    output = tmp_path / "bf16"
    report = export_safetensors(
        SafetensorsExportRequest(folder=converted, output=output, dtype="bf16", max_shard_size="100KB")
    )
    assert report["adapter"] is None
    shards = sorted(path.name for path in output.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    for shard in shards:
        with safe_open(str(output / shard), framework="pt") as handle:
            for name in handle.keys():
                assert handle.get_tensor(name).dtype == torch.bfloat16, name
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    for name in ("README.md", "modeling_dpvr_llava.py", "configuration_dpvr_llava.py", "dpvr_recipe.yaml"):
        assert (output / name).is_file(), name

    cast = DpvrLlavaForConditionalGeneration.from_pretrained(output)
    assert cast.dtype == torch.bfloat16
    source = load(converted).state_dict()
    for key, value in cast.state_dict().items():
        assert torch.equal(value, source[key].to(torch.bfloat16)), key


def test_copy_without_adapter_keeps_tensors(converted, tmp_path):
    export_safetensors(SafetensorsExportRequest(folder=converted, output=tmp_path / "copy"))
    with safe_open(str(converted / "model.safetensors"), framework="pt") as before:
        with safe_open(str(tmp_path / "copy" / "model.safetensors"), framework="pt") as after:
            assert sorted(before.keys()) == sorted(after.keys())
            for name in before.keys():
                assert torch.equal(before.get_tensor(name), after.get_tensor(name)), name


def test_dora_adapter_rejected(converted, tmp_path):
    folder = tmp_path / "finetuned"
    shutil.copytree(converted, folder)
    add_lora_adapter(converted, folder, r=4, lora_alpha=8, use_dora=True)
    with pytest.raises(InvalidInputError, match=r"use_dora cannot be merged as W \+ scaling \* B @ A"):
        export_safetensors(SafetensorsExportRequest(folder=folder, output=tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


def test_adapter_for_another_model_rejected(converted, tmp_path):
    add_lora_adapter(converted, tmp_path / "adapter", r=4, lora_alpha=8)
    config_path = tmp_path / "adapter" / "adapter_config.json"
    weights_path = tmp_path / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights_path))
    renamed = {name.replace(f"layers.{FUSION_LAYER}.", "layers.9."): value for name, value in tensors.items()}
    save_file(renamed, str(weights_path))
    assert config_path.is_file()
    request = SafetensorsExportRequest(folder=converted, output=tmp_path / "merged", adapter=tmp_path / "adapter")
    message = r"targets 3 weight\(s\) that .* does not contain: model\.language_model\.layers\.9\."
    with pytest.raises(InvalidInputError, match=message):
        export_safetensors(request)


def test_invalid_dtype_rejected(converted, tmp_path):
    with pytest.raises(InvalidInputError, match="Invalid dtype 'int8': choose one of auto, bf16, fp16, fp32"):
        export_safetensors(SafetensorsExportRequest(folder=converted, output=tmp_path / "out", dtype="int8"))
