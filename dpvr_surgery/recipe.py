"""Recipes: one YAML file of settings for every command, validated, with `key=value` overrides.

A recipe looks like::

    version: 1
    convert:
      split: 18
      side_branch_depth: 1
      fusion_layers: 1

Flags given on the command line beat `--set` overrides, which beat the recipe, which beats the
built-in defaults. The resolved settings of a run are saved as `dpvr_recipe.yaml` beside its output.
"""

from pathlib import Path
from typing import Any

import yaml

from .errors import InvalidInputError

RECIPE_VERSION = 1
RECIPE_FILE_NAME = "dpvr_recipe.yaml"

# Keys that each section accepts. A command reads its own section and ignores the others, so one
# recipe can drive every command.
SECTION_KEYS: dict[str, frozenset[str]] = {
    "convert": frozenset({"split", "side_branch_depth", "fusion_layers", "side_init", "dtype", "max_shard_size", "seed"}),
    # `finetune` keys are the fields of FinetuneConfig with the same names.
    "finetune": frozenset(
        {
            "data", "image_folder", "teacher", "objective", "prompts", "train_side_branch", "fusion",
            "train_projector", "lora_rank", "lora_alpha", "lora_dropout", "epochs", "max_steps", "learning_rate",
            "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "batch_size",
            "gradient_accumulation_steps", "global_batch_size", "max_seq_length", "precision",
            "gradient_checkpointing", "temperature", "teacher_answer_tokens", "teacher_cache", "max_samples",
            "shuffle", "num_workers", "checkpoint_dir", "save_steps", "save_total_limit", "logging_steps",
            "tensorboard", "dtype", "max_shard_size", "save_adapter", "seed",
        }
    ),
    # `export onnx` reads opset, onnx_dtype, validate and atol. `export safetensors` reads dtype and max_shard_size.
    "export": frozenset({"opset", "onnx_dtype", "validate", "atol", "dtype", "max_shard_size"}),
    "analyze": frozenset(
        {
            "data", "image_folder", "prompt", "prompts_file", "num_calibration_samples", "max_seq_length", "shuffle",
            "logit_lens_tokens", "batch_size", "sequential", "device", "device_map", "attn_implementation", "dtype",
            "seed", "fusion_layers", "rule_lenses", "attention_tolerance", "attention_threshold", "cosine_threshold",
            "top1_threshold", "min_split",
        }
    ),
}


def load_recipe(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and validate a recipe file; return its sections (missing sections are empty dicts)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise InvalidInputError(f"Recipe not found: {path} does not exist. Pass the path of a YAML recipe.") from error
    except yaml.YAMLError as error:
        raise InvalidInputError(f"Invalid recipe {path}: not valid YAML ({error}).") from error
    return validate_recipe(data or {}, source=str(path))


def validate_recipe(data: Any, *, source: str = "recipe") -> dict[str, dict[str, Any]]:
    """Check the version, the sections and their keys; return every section as a dict."""
    if not isinstance(data, dict):
        raise InvalidInputError(f"Invalid {source}: expected a mapping of sections, got {type(data).__name__}.")
    version = data.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise InvalidInputError(
            f"Invalid {source}: version {version!r} is not supported; this release reads version {RECIPE_VERSION}."
        )
    unknown_sections = sorted(set(data) - set(SECTION_KEYS) - {"version"})
    if unknown_sections:
        raise InvalidInputError(
            f"Invalid {source}: unknown section(s) {', '.join(unknown_sections)}; "
            f"the sections are {', '.join(SECTION_KEYS)}."
        )

    sections = {}
    for name, allowed in SECTION_KEYS.items():
        section = data.get(name) or {}
        if not isinstance(section, dict):
            raise InvalidInputError(f"Invalid {source}: section {name} must be a mapping, got {section!r}.")
        unknown = sorted(set(section) - allowed)
        if unknown:
            raise InvalidInputError(
                f"Invalid {source}: unknown key(s) {', '.join(unknown)} in section {name}; "
                f"allowed keys are {', '.join(sorted(allowed))}."
            )
        sections[name] = dict(section)
    return sections


def apply_overrides(sections: dict[str, dict[str, Any]], overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Apply `section.key=value` overrides (values parsed as YAML scalars) and validate the result."""
    updated = {name: dict(values) for name, values in sections.items()}
    for override in overrides:
        name_part, separator, value_text = override.partition("=")
        section, dot, key = name_part.strip().partition(".")
        if not separator or not dot or not key:
            raise InvalidInputError(
                f"Invalid --set {override!r}: expected SECTION.KEY=VALUE, for example convert.split=18."
            )
        updated.setdefault(section, {})[key] = yaml.safe_load(value_text) if value_text.strip() else None
    return validate_recipe({"version": RECIPE_VERSION, **updated}, source="--set override")


def write_recipe(folder: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Save the resolved settings as `dpvr_recipe.yaml` in `folder`, empty sections left out."""
    data = {"version": RECIPE_VERSION}
    data.update({name: values for name, values in sections.items() if values})
    path = Path(folder) / RECIPE_FILE_NAME
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
