"""`dpvr-surgery bench`: prefill, decode, KV cache, memory and FLOPs of a model against its conversion."""

import json
import logging
import shlex
import sys
from pathlib import Path

import click
import torch

from ..bench import (
    ATTN_IMPLEMENTATIONS,
    BenchSettings,
    build_shape_models,
    check_kv_cache,
    format_bench_report,
    load_bench_models,
    resolve_dtype,
    run_bench,
    shape_config,
    sweep_prefill,
)
from ..errors import InvalidInputError
from ..generation import resolve_device
from ..plan import PRESET_NAMES, PlanSettings
from .convert import plan_options
from .inspect import DEFAULT_SPLIT_FRACTION
from .options import GroupedCommand, misc_options, option

logger = logging.getLogger(__name__)

# Text hidden size of --shape models on a CPU: narrow enough that a 32-layer prefill of 640 tokens
# takes about a second on two cores.
CPU_HIDDEN_SIZE = 512


def parse_counts(text: str, name: str) -> tuple[int, ...]:
    """Parse a comma-separated list of positive integers; "" or "none" gives an empty tuple."""
    if text.strip().lower() in ("", "none"):
        return ()
    counts = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            value = 0
        if value < 1:
            raise InvalidInputError(
                f"{name} {text!r} is invalid: expected positive integers separated by commas, such as 64,256"
            )
        counts.append(value)
    return tuple(counts)


def default_split(num_layers: int, num_fusion_layers: int) -> int:
    """Return the split layer at llava-1.5-7b's published ratio (18 of 32), kept inside the valid range."""
    return max(1, min(round(num_layers * DEFAULT_SPLIT_FRACTION), num_layers - num_fusion_layers - 1))


def resolve_hidden_size(hidden_size: str, device_type: str) -> int | None:
    """Map --hidden-size to a width: "auto" is full width on CUDA and 512 elsewhere, "full" the preset's."""
    if hidden_size == "full" or (hidden_size == "auto" and device_type == "cuda"):
        return None
    if hidden_size == "auto":
        return CPU_HIDDEN_SIZE
    try:
        value = int(hidden_size)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidInputError(
            f"--hidden-size {hidden_size!r} is invalid: pass auto, full or a positive multiple of the head dimension, "
            "such as 512"
        )
    return value


@click.command(cls=GroupedCommand)
@click.argument("model", required=False)
@option("--shape", group="Model", type=click.Choice(PRESET_NAMES),
        help="Benchmark random-weight models of this configuration instead of MODEL.")
@option("--hidden-size", group="Model", default="auto", show_default=True,
        help="Text hidden size of --shape models: auto (full on CUDA, 512 on CPU), full, or a multiple of the "
        "head dimension. Layer count, head ratio and image tokens stay those of the shape.")
@option("--converted", group="Model", type=click.Path(exists=True, file_okay=False),
        help="Folder that `dpvr-surgery convert` wrote from MODEL (default: convert MODEL in memory).")
@option("--revision", group="Model", help="Hub revision when MODEL is a Hub id.")
@option("--cache-dir", group="Model", type=click.Path(file_okay=False), help="Hugging Face cache folder.")
@option("--dtype", group="Model", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
        show_default=True, help="Weight and activation dtype: auto is bf16 on CUDA and fp32 on CPU.")
@option("--split", group="Plan", type=int,
        help="Split layer s of the in-memory conversion (default: 18/32 of the layers, rounded).")
@plan_options
@option("--image-tokens", group="Plan", type=click.IntRange(min=1),
        help="Image tokens per image (default: the model's own count).")
@option("--num-images", group="Plan", type=click.IntRange(min=0), default=1, show_default=True,
        help="Images per prompt.")
@option("--text-tokens", group="Plan", type=click.IntRange(min=1), default=64, show_default=True,
        help="Text tokens per prompt.")
@option("--batch-size", group="Plan", type=click.IntRange(min=1), default=1, show_default=True,
        help="Prompts per batch, all of the same layout.")
@option("--new-tokens", group="Plan", type=click.IntRange(min=0), default=64, show_default=True,
        help="Decode steps to time after the prefill (0: prefill only).")
@option("--no-cache-tokens", group="Plan", default="64,256", show_default=True,
        help="Numbers of new tokens at which the converted model also decodes without a cache, comma-separated "
        "(none: skip).")
@option("--no-cache-samples", group="Performance", default="5", show_default=True,
        help="Decode steps per length timed without a cache, the rest interpolated; 'all' times every step.")
@option("--device", group="Performance", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@option("--attn-implementation", group="Performance", type=click.Choice(ATTN_IMPLEMENTATIONS), default="sdpa",
        show_default=True, help="Attention kernel of both models.")
@option("--threads", group="Performance", type=click.IntRange(min=1),
        help="CPU threads for torch (default: torch's choice). One thread is steadier on a busy machine.")
@option("--warmup", group="Performance", type=click.IntRange(min=0), default=1, show_default=True,
        help="Untimed runs per model before timing.")
@option("--repeats", group="Performance", type=click.IntRange(min=1), default=5, show_default=True,
        help="Timed runs per model; times are their median.")
@option("--memory/--no-memory", group="Performance", default=True, show_default=True,
        help="Measure peak memory (one extra untimed prefill and decode per model).")
@option("--json", "as_json", group="Output", is_flag=True, help="Print the report as JSON.")
@option("-o", "--output", group="Output", type=click.Path(dir_okay=False, path_type=Path),
        help="Also write the JSON report to this file.")
@option("--plot", group="Output", type=click.Path(dir_okay=False, path_type=Path),
        help="Also time a prefill sweep over --sweep-image-tokens x --sweep-text-tokens and plot the speedup "
        "to this PNG file.")
@option("--sweep-image-tokens", group="Output", default="144,576,1152,2304", show_default=True,
        help="Image-token counts of the --plot sweep (one image each).")
@option("--sweep-text-tokens", group="Output", default="16,64,256", show_default=True,
        help="Text lengths of the --plot sweep.")
@misc_options
def bench(model, shape, hidden_size, converted, revision, cache_dir, dtype, split, side_branch_depth, fusion_layers,
          side_init, image_tokens, num_images, text_tokens, batch_size, new_tokens, no_cache_tokens,
          no_cache_samples, device, attn_implementation, threads, warmup, repeats, memory, as_json, output, plot,
          sweep_image_tokens, sweep_text_tokens, misc):
    """Measure MODEL (or a --shape with random weights) against its DPVR-LF conversion, in one process.

    Reports medians of interleaved runs: prefill latency, decode time per token with the KV cache,
    tokens per second, peak memory and KV-cache bytes (measured and analytic). It adds analytic
    FLOPs, the prefill speedup as a share of the FLOP bound, and cached decoding against recomputing
    the context at every step. Exits with code 1 when a measured KV cache differs from the analytic size.
    """
    if (model is None) == (shape is None):
        raise InvalidInputError(
            f"Pass either MODEL or --shape, not {'both' if model else 'neither'}: MODEL is a LLaVA folder or Hub id, "
            f"--shape one of {', '.join(PRESET_NAMES)}."
        )
    if converted is not None and (shape is not None or split is not None):
        raise InvalidInputError(
            "--converted takes the split from the converted folder, so it cannot be combined with "
            f"{'--shape' if shape is not None else '--split'}; drop one of them."
        )

    if threads is not None:
        torch.set_num_threads(threads)
    resolved_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolved_device)
    settings = BenchSettings(
        image_tokens=image_tokens,
        num_images=num_images,
        text_tokens=text_tokens,
        batch_size=batch_size,
        new_tokens=new_tokens,
        warmup=warmup,
        repeats=repeats,
        no_cache_tokens=parse_counts(no_cache_tokens, "--no-cache-tokens"),
        no_cache_samples=_parse_samples(no_cache_samples),
        measure_memory=memory,
        seed=misc.seed,
    )
    settings.validate()
    sweep_image_counts = parse_counts(sweep_image_tokens, "--sweep-image-tokens")
    sweep_text_counts = parse_counts(sweep_text_tokens, "--sweep-text-tokens")

    models = _build_models(
        model, shape, hidden_size, converted, revision, cache_dir, torch_dtype, resolved_device, attn_implementation,
        split, side_branch_depth, fusion_layers, side_init, misc.seed,
    )
    report = run_bench(models, settings)
    report["command"] = shlex.join(["dpvr-surgery", *sys.argv[1:]])

    if plot is not None:
        report["sweep"] = sweep_prefill(
            models,
            image_token_counts=list(sweep_image_counts),
            text_token_counts=list(sweep_text_counts),
            batch_size=batch_size,
            warmup=warmup,
            repeats=repeats,
            seed=misc.seed,
        )

    _write_outputs(report, as_json, output)
    if plot is not None:
        from ..bench_plot import plot_speedup

        plot_speedup(report["sweep"], plot, title=_plot_title(report))
        if not as_json:
            click.echo(f"Wrote {plot}")
    check_kv_cache(report)


def _parse_samples(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError as error:
        raise InvalidInputError(
            f"--no-cache-samples {text!r} is invalid: pass an integer of at least 2, or all"
        ) from error


def _build_models(model, shape, hidden_size, converted, revision, cache_dir, dtype, device, attn_implementation,
                  split, side_branch_depth, fusion_layers, side_init, seed):
    if shape is not None:
        width = resolve_hidden_size(hidden_size, device.type)
        num_layers = shape_config(shape).text_config.num_hidden_layers
        split = default_split(num_layers, fusion_layers) if split is None else split
        plan = PlanSettings(split, side_branch_depth, fusion_layers, side_init)
        return build_shape_models(
            shape, plan, hidden_size=width, dtype=dtype, device=device, attn_implementation=attn_implementation,
            seed=seed,
        )

    if hidden_size != "auto":
        raise InvalidInputError(
            f"--hidden-size {hidden_size} applies to --shape models only; a checkpoint keeps its own width. "
            "Drop --hidden-size or use --shape."
        )
    plan = None
    if converted is None:
        if split is None:
            from ..checkpoint import read_config, resolve_model_path

            config = read_config(resolve_model_path(model, revision=revision, cache_dir=cache_dir))
            num_layers = config.get("text_config", {}).get("num_hidden_layers", 0)
            split = default_split(num_layers, fusion_layers)
            logger.info("No --split given: converting at split layer %d of %d", split, num_layers)
        plan = PlanSettings(split, side_branch_depth, fusion_layers, side_init)
    return load_bench_models(
        model, converted=converted, plan=plan, dtype=dtype, device=device, attn_implementation=attn_implementation,
        revision=revision, cache_dir=cache_dir, seed=seed,
    )


def _plot_title(report: dict) -> str:
    environment = report["environment"]
    return (
        f"{report['model']}, split {report['plan']['split_layer']}, {environment['dtype']}, "
        f"{environment['device_name']}"
    )


def _write_outputs(report: dict, as_json: bool, output: Path | None) -> None:
    text = json.dumps(report, indent=2)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n", encoding="utf-8")
    if as_json:
        click.echo(text)
        return
    click.echo(format_bench_report(report), nl=False)
    if output is not None:
        click.echo(f"\nWrote {output}")
