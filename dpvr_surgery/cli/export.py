"""`dpvr-surgery export onnx|safetensors`: ship a converted model to runtimes and re-cast its weights."""

import json
from pathlib import Path

import click

from .options import GroupedCommand, misc_options, option, recipe_value

SECTION = "export"


def source_options(function):
    """Add --revision and --cache-dir for a MODEL given as a Hub id."""
    function = option(
        "--cache-dir",
        group="Model",
        type=click.Path(file_okay=False),
        help="Hugging Face cache folder to look up Hub ids in (default: the standard cache).",
    )(function)
    function = option("--revision", group="Model", help="Hub revision (branch, tag or commit) when MODEL is a Hub id.")(
        function
    )
    return function


def output_options(function):
    """Add -o/--output and --overwrite."""
    function = option(
        "--overwrite", group="Output", is_flag=True, help="Replace OUTPUT if it exists and is not empty."
    )(function)
    function = option(
        "-o",
        "--output",
        group="Output",
        type=click.Path(file_okay=False, path_type=Path),
        required=True,
        help="Folder to write to; it is written under a temporary name and renamed when complete.",
    )(function)
    return function


@click.group()
def export():
    """Export a converted model: ONNX graphs for onnxruntime, or safetensors in another dtype or shard size."""


@export.command("onnx", cls=GroupedCommand)
@click.argument("model")
@output_options
@option("--opset", group="Output", type=int, default=18, show_default=True, help="ONNX opset version (18 or newer).")
@option(
    "--dtype",
    group="Output",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="Weight and activation dtype of the graphs.",
)
@option(
    "--validate/--no-validate",
    group="Output",
    default=True,
    show_default=True,
    help="Compare onnxruntime with PyTorch on random inputs before the folder is moved into place.",
)
@option(
    "--atol",
    group="Output",
    type=click.FloatRange(min=0.0),
    help="Maximum absolute difference that validation accepts. Default: 1e-4 for fp32 and 5e-2 for fp16, or 10 "
    "times PyTorch's own eager-to-sdpa difference on the same inputs when that is larger.",
)
@option(
    "--allow-mismatch",
    group="Output",
    is_flag=True,
    help="Keep the export when validation finds a difference above --atol, with a warning instead of an error.",
)
@option("--json", "as_json", group="Output", is_flag=True, help="Print the export report as JSON.")
@source_options
@misc_options
@click.pass_context
def export_onnx_command(
    ctx, model, output, overwrite, opset, dtype, validate, atol, allow_mismatch, as_json, revision, cache_dir, misc
):
    """Export the converted model MODEL to ONNX: vision encoder, token embedding and routed decoder with KV cache."""
    from ..export.onnx_export import REPORT_FILE, OnnxExportRequest, export_onnx

    request = OnnxExportRequest(
        model=model,
        output=output,
        opset=recipe_value(ctx, misc, SECTION, "opset", "opset", opset),
        dtype=recipe_value(ctx, misc, SECTION, "dtype", "onnx_dtype", dtype),
        validate=recipe_value(ctx, misc, SECTION, "validate", "validate", validate),
        atol=recipe_value(ctx, misc, SECTION, "atol", "atol", atol),
        allow_mismatch=allow_mismatch,
        overwrite=overwrite,
        revision=revision,
        cache_dir=cache_dir,
        seed=misc.seed,
    )
    report = export_onnx(request)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for file_name, graph in report["graphs"].items():
        megabytes = graph["weight_bytes"] / 1e6
        click.echo(f"{file_name}: {megabytes:.1f} MB of weights, exported in {graph['seconds']:.1f} s")
    validation = report["validation"]
    if validation is None:
        click.echo("Validation skipped (--no-validate).")
    else:
        verdict = "within" if validation["passed"] else "ABOVE"
        basis = ""
        if validation.get("atol_source") == "kernel_spread":
            basis = f", 10 x PyTorch's eager-to-sdpa difference {validation['pytorch_kernel_spread']:.3g}"
        click.echo(
            f"Validation: onnxruntime {verdict} {validation['atol']:.3g} of PyTorch{basis}, max abs diff "
            f"{validation['max_abs_diff']:.3g} ({validation['dtype']})."
        )
    click.echo(f"Wrote {output} (report in {REPORT_FILE})")


@export.command("safetensors", cls=GroupedCommand)
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@output_options
@option(
    "--dtype",
    group="Output",
    type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
    default="auto",
    show_default=True,
    help="Weight dtype of the output: auto keeps each tensor's dtype.",
)
@option("--max-shard-size", group="Output", default="5GB", show_default=True, help="Largest safetensors shard.")
@option(
    "--adapter",
    group="Model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Adapter folder to apply: a peft LoRA adapter and/or the trained_weights.safetensors of `finetune "
    "--save-adapter` (default: FOLDER's own adapter files, if it has any).",
)
@option("--json", "as_json", group="Output", is_flag=True, help="Print the export report as JSON.")
@misc_options
@click.pass_context
def export_safetensors_command(ctx, folder, output, overwrite, dtype, max_shard_size, adapter, as_json, misc):
    """Rewrite the model FOLDER as safetensors: cast the dtype, re-shard, and apply an adapter if present."""
    from ..export.safetensors_export import SafetensorsExportRequest, export_safetensors

    request = SafetensorsExportRequest(
        folder=folder,
        output=output,
        dtype=recipe_value(ctx, misc, SECTION, "dtype", "dtype", dtype),
        max_shard_size=recipe_value(ctx, misc, SECTION, "max_shard_size", "max_shard_size", max_shard_size),
        adapter=adapter,
        overwrite=overwrite,
    )
    report = export_safetensors(request)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    adapter = report["adapter"]
    if adapter:
        click.echo(
            f"Applied the adapter {adapter['path']}: LoRA merged into {len(adapter['merged_modules'])} module(s), "
            f"{len(adapter['replaced_weights'])} weight(s) replaced."
        )
    click.echo(f"Wrote {len(report['files'])} file(s), {report['total_bytes'] / 1e9:.2f} GB of weights, to {output}")
