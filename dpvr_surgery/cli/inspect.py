"""`dpvr-surgery inspect`: architecture summary and the conversion plan, from a config alone."""

import json
import logging

import click
from transformers import LlavaConfig

from ..checkpoint import read_config, resolve_model_path
from ..convert import check_source_config
from ..errors import InvalidInputError
from ..modeling import DpvrLlavaConfig
from ..plan import PRESET_NAMES, PlanSettings, format_plan_report, load_preset, plan_report
from .convert import plan_options
from .options import GroupedCommand, misc_options, option

logger = logging.getLogger(__name__)

# llava-1.5-7b's published split (18 of 32 layers), used as a preview when no split is given.
DEFAULT_SPLIT_FRACTION = 18 / 32


# Fields that a converted config adds to the source's LlavaConfig.
CONVERTED_PLAN_FIELDS = ("split_layer", "side_branch_depth", "num_fusion_layers", "side_branch_init")


def converted_plan(config_dict: dict) -> tuple[dict, PlanSettings]:
    """Return the source's LLaVA config dict and the plan settings of a converted (`dpvr_llava`) config dict."""
    source = {key: value for key, value in config_dict.items()
              if key not in (*CONVERTED_PLAN_FIELDS, "saturation", "auto_map", "architectures")}
    source["model_type"] = "llava"
    settings = PlanSettings(*(config_dict[name] for name in CONVERTED_PLAN_FIELDS))
    return source, settings


def load_llava_config(model: str | None, shape: str | None, revision: str | None, cache_dir: str | None):
    """Return the LlavaConfig of MODEL or of a built-in shape, a label for it, and a converted MODEL's plan.

    The plan is None unless MODEL is already converted, in which case the config is its source's.
    """
    if (model is None) == (shape is None):
        raise InvalidInputError(
            f"Pass either MODEL or --shape, not {'both' if model else 'neither'}: MODEL is a folder or Hub id, "
            f"--shape one of {', '.join(PRESET_NAMES)}."
        )
    if shape is not None:
        return LlavaConfig.from_dict(load_preset(shape)), shape, None
    source = resolve_model_path(model, revision=revision, cache_dir=cache_dir)
    config_dict = read_config(source)
    if config_dict.get("model_type") == DpvrLlavaConfig.model_type:
        source_dict, settings = converted_plan(config_dict)
        return LlavaConfig.from_dict(source_dict), model, settings
    check_source_config(config_dict, source)
    return LlavaConfig.from_dict(config_dict), model, None


@click.command(cls=GroupedCommand)
@click.argument("model", required=False)
@option("--shape", group="Model", type=click.Choice(PRESET_NAMES), help="Inspect a built-in configuration instead.")
@option("--revision", group="Model", help="Hub revision when MODEL is a Hub id.")
@option("--cache-dir", group="Model", type=click.Path(file_okay=False), help="Hugging Face cache folder.")
@option(
    "--split",
    group="Plan",
    type=int,
    help=f"Split layer s (default: {DEFAULT_SPLIT_FRACTION:.4g} x layers, rounded: the ratio of llava-1.5-7b's "
    "published split 18 of 32).",
)
@plan_options
@option("--image-tokens", group="Plan", type=click.IntRange(min=1), help="Image tokens per image (default: the model's).")
@option("--num-images", group="Plan", type=click.IntRange(min=0), default=1, show_default=True, help="Images per prompt.")
@option("--text-tokens", group="Plan", type=click.IntRange(min=1), default=64, show_default=True, help="Text tokens per prompt.")
@option("--batch-size", group="Plan", type=click.IntRange(min=1), default=1, show_default=True, help="Prompts per batch.")
@option(
    "--kv-dtype-bytes", group="Plan", type=click.Choice(["1", "2", "4"]), default="2", show_default=True,
    help="Bytes per cached key or value element (2 for bf16/fp16).",
)
@option("--json", "as_json", group="Output", is_flag=True, help="Print the report as JSON.")
@misc_options
def inspect(model, shape, revision, cache_dir, split, side_branch_depth, fusion_layers, side_init, image_tokens,
            num_images, text_tokens, batch_size, kv_dtype_bytes, as_json, misc):
    """Summarise MODEL's architecture and the DPVR plan with its estimated FLOP and KV-cache savings.

    Reads config.json only (weights are never loaded), so a 13B plan needs no memory.
    """
    config, label, converted_settings = load_llava_config(model, shape, revision, cache_dir)
    num_layers = config.text_config.num_hidden_layers
    if converted_settings is not None:
        if split is not None and split != converted_settings.split_layer:
            raise InvalidInputError(
                f"{model} is already converted with split layer {converted_settings.split_layer}, so --split {split} "
                "does not apply. Inspect the original model to plan another split."
            )
        settings = converted_settings
        label = f"{model} (converted; plan read from its config.json)"
    else:
        if split is None:
            split = max(1, min(round(num_layers * DEFAULT_SPLIT_FRACTION), num_layers - fusion_layers - 1))
            logger.info("No --split given: showing split %d (%d x %.4g, rounded)", split, num_layers,
                        DEFAULT_SPLIT_FRACTION)
        settings = PlanSettings(split, side_branch_depth, fusion_layers, side_init)
    report = plan_report(
        config,
        settings,
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        num_images=num_images,
        batch_size=batch_size,
        dtype_bytes=int(kv_dtype_bytes),
    )
    report["model"] = label
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"Model: {label}\n")
        click.echo(format_plan_report(report))
