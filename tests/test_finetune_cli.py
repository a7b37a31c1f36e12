"""`dpvr-surgery finetune` through click: recipes, overrides, dry runs, errors, and the shipped recipe files."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from click.testing import CliRunner
from finetune_helpers import convert_tiny, save_tiny_llava

from dpvr_surgery.cli import main
from dpvr_surgery.finetune.config import RECIPE_KEYS, FinetuneConfig
from dpvr_surgery.recipe import SECTION_KEYS, load_recipe

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune-cli")
    source = save_tiny_llava(root / "source")
    return {"root": root, "source": source, "converted": convert_tiny(source, root / "converted")}


def invoke(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def write_recipe(path: Path, finetune: dict) -> Path:
    path.write_text(yaml.safe_dump({"version": 1, "finetune": finetune}))
    return path


def test_recipe_keys_match_config():
    assert SECTION_KEYS["finetune"] == frozenset(RECIPE_KEYS)
    config_fields = set(FinetuneConfig.__dataclass_fields__)
    assert set(RECIPE_KEYS) <= config_fields


def test_run_with_recipe_and_override(folders):
    recipe = write_recipe(folders["root"] / "recipe.yaml", {
        "teacher": str(folders["source"]), "max_steps": 8, "learning_rate": 1e-3, "teacher_answer_tokens": 2,
        "max_samples": 6, "logging_steps": 1,
    })
    output = folders["root"] / "out"
    result = invoke(["finetune", str(folders["converted"]), "-o", str(output), "--recipe", str(recipe),
                     "--set", "finetune.max_steps=3", "--learning-rate", "5e-4", "-q"])

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "Trainable parameters: 36,992 of 305,600 (12.10 %)"
    assert "Steps: 3, final loss" in result.output
    saved = yaml.safe_load((output / "dpvr_recipe.yaml").read_text())["finetune"]
    assert saved["max_steps"] == 3
    assert saved["learning_rate"] == 5e-4
    assert saved["teacher_answer_tokens"] == 2
    report = json.loads((output / "dpvr_report.json").read_text())["finetune"]
    assert [step for step, _ in report["losses"]] == [1, 2, 3]


def test_dry_run_prints_plan(folders):
    output = folders["root"] / "planned"
    result = invoke(["finetune", str(folders["converted"]), "-o", str(output), "--teacher", str(folders["source"]),
                     "--fusion", "lora", "--lora-rank", "4", "--max-samples", "10", "--batch-size", "2",
                     "--global-batch-size", "4", "--epochs", "3", "--dry-run"])

    assert result.exit_code == 0, result.output
    assert "Objective: distill" in result.output
    assert "side branch 36,992, fusion LoRA 4,096" in result.output
    assert "global batch 4 (2 accumulation step(s))" in result.output
    assert "Optimizer steps: 9 (1 warm-up)" in result.output
    assert not output.exists()


def test_dry_run_json(folders):
    result = invoke(["finetune", str(folders["converted"]), "-o", str(folders["root"] / "x"), "--teacher",
                     str(folders["source"]), "--max-steps", "7", "--dry-run", "--json"])
    plan = json.loads(result.output)
    assert plan["optimizer_steps"] == 7
    assert plan["trainable_parameters"]["trainable"] == 36992
    assert plan["data"]["source"] == "builtin"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--objective", "sft"], "Supervised fine-tuning needs --data"),
        (["--set", "finetune.fusion=half"], "Invalid fusion 'half'"),
        (["--set", "finetune.unknown=1"], "unknown key\\(s\\) unknown in section finetune"),
    ],
)
def test_invalid_input_exits_2(folders, args, message):
    result = CliRunner().invoke(main, ["finetune", str(folders["converted"]), "-o", str(folders["root"] / "bad"),
                                       "--dry-run", *args])
    assert result.exit_code == 2
    assert message.replace("\\", "") in result.output


def test_help_lists_groups():
    result = invoke(["finetune", "--help"])
    for section in ("Data options:", "Training options:", "Output options:", "Performance options:", "Misc options:"):
        assert section in result.output
    assert "--save-adapter" in result.output


@pytest.mark.parametrize(("name", "split"), [("llava-1.5-7b", 18), ("llava-1.5-13b", 22)])
def test_shipped_recipes(name, split):
    recipe = load_recipe(REPOSITORY / "recipes" / f"{name}.yaml")
    assert recipe["convert"] == {"split": split, "side_branch_depth": 1, "fusion_layers": 1, "side_init": "copy"}
    finetune = recipe["finetune"]
    assert (finetune["epochs"], finetune["learning_rate"], finetune["lr_scheduler"]) == (1, 2e-5, "cosine")
    assert (finetune["warmup_ratio"], finetune["global_batch_size"]) == (0.03, 128)
    assert finetune["data"].endswith("llava_v1_5_mix665k.json")
    config = FinetuneConfig(model="m", output=Path("o"), **finetune)
    config.validate()
    assert config.accumulation_steps(8) == 1
    assert config.accumulation_steps(2) == 4


@pytest.mark.parametrize(("name", "kind"), [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    config = load_config_from_file(str(REPOSITORY / "recipes" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == kind
    if kind == "DEEPSPEED":
        settings = json.loads((REPOSITORY / config.deepspeed_config["deepspeed_config_file"]).read_text())
        assert settings["zero_optimization"]["stage"] == 2
