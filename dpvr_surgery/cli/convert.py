"""`dpvr-surgery convert`: rewrite a LLaVA checkpoint into the dual-path graph."""

import json
import shutil
import tempfile
from pathlib import Path

import click

from ..convert import ConvertRequest, convert_checkpoint, plan_conversion
from ..modeling import SIDE_BRANCH_INITS
from ..plan import PlanSettings, format_plan_report
from .analyze import SPLIT, analyze_for_convert, parse_split, preview_split
from .options import GroupedCommand, misc_options, model_options, option, recipe_value, show_progress


def plan_options(function):
    """Add --split, --side-branch-depth, --fusion-layers and --side-init."""
    function = option(
        "--side-init",
        group="Plan",
        type=click.Choice(SIDE_BRANCH_INITS),
        default="copy",
        show_default=True,
        help="Side-branch initialisation: copy of layers s.., copy of the layers before fusion, or random.",
    )(function)
    function = option(
        "--fusion-layers",
        group="Plan",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Number of final layers where image and text tokens meet again (K).",
    )(function)
    function = option(
        "--side-branch-depth",
        group="Plan",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Number of new side-branch layers that carry image tokens (d_v).",
    )(function)
    return function


@click.command(cls=GroupedCommand)
@click.argument("model")
@option(
    "-o", "--output", group="Output", type=click.Path(file_okay=False, path_type=Path), required=True,
    help="Folder to write the converted model to.",
)
@option(
    "--split",
    group="Plan",
    type=SPLIT,
    default="auto",
    show_default=True,
    help="Split layer s: the first layer that image tokens skip (1..L-K-1), or auto: run `dpvr-surgery analyze` "
    "on MODEL (built-in photos, or the recipe's analyze section) and take the split it chooses.",
)
@plan_options
@option("--max-shard-size", group="Output", default="5GB", show_default=True, help="Largest safetensors shard.")
@option("--overwrite", group="Output", is_flag=True, help="Replace OUTPUT if it exists and is not empty.")
@option("--dry-run", group="Output", is_flag=True, help="Check the source and print the plan; write nothing.")
@option(
    "--verify/--no-verify",
    group="Output",
    default=True,
    show_default=True,
    help="Load source and result once each and compare text-only logits before the output is moved into place.",
)
@option("--json", "as_json", group="Output", is_flag=True, help="Print the report as JSON.")
@model_options
@misc_options
@click.pass_context
def convert(ctx, model, output, split, side_branch_depth, fusion_layers, side_init, max_shard_size, overwrite,
            dry_run, verify, as_json, model_options, misc):
    """Convert the LLaVA model MODEL (a folder or a Hub id) into a dual-path DPVR-LF model."""
    section = "convert"
    split = parse_split(recipe_value(ctx, misc, section, "split", "split", split))
    fusion_layers = recipe_value(ctx, misc, section, "fusion_layers", "fusion_layers", fusion_layers)
    saturation, saturation_plot = None, None
    if split == "auto" and dry_run:
        split = preview_split(model, fusion_layers, revision=model_options.revision, cache_dir=model_options.cache_dir)
        click.echo(f"--split auto: the saturation analysis chooses the split when converting; the plan below "
                   f"previews split {split}.", err=True)
    elif split == "auto":
        analysis_folder = Path(tempfile.mkdtemp(prefix="dpvr-analysis-"))
        split, saturation, saturation_plot = analyze_for_convert(
            model, misc.recipe.get("analyze", {}), fusion_layers=fusion_layers,
            seed=recipe_value(ctx, misc, section, "seed", "seed", misc.seed), revision=model_options.revision,
            cache_dir=model_options.cache_dir, folder=analysis_folder, show_progress=show_progress(misc),
        )
        # Registered only after success: when no layer saturates, the error names this folder, which keeps
        # the report and plot.
        ctx.call_on_close(lambda: shutil.rmtree(analysis_folder, ignore_errors=True))
    settings = PlanSettings(
        split_layer=split,
        side_branch_depth=recipe_value(ctx, misc, section, "side_branch_depth", "side_branch_depth", side_branch_depth),
        num_fusion_layers=fusion_layers,
        side_branch_init=recipe_value(ctx, misc, section, "side_init", "side_init", side_init),
    )
    request = ConvertRequest(
        model=model,
        output=output,
        settings=settings,
        dtype=recipe_value(ctx, misc, section, "dtype", "dtype", model_options.dtype),
        max_shard_size=recipe_value(ctx, misc, section, "max_shard_size", "max_shard_size", max_shard_size),
        overwrite=overwrite,
        revision=model_options.revision,
        cache_dir=model_options.cache_dir,
        verify=verify,
        seed=recipe_value(ctx, misc, section, "seed", "seed", misc.seed),
        saturation=saturation,
        saturation_plot=saturation_plot,
    )

    if dry_run:
        plan = plan_conversion(request)
        if as_json:
            click.echo(json.dumps(plan.summary(), indent=2))
        else:
            click.echo(f"Source: {plan.source} ({len(plan.tensor_names)} tensors, keys checked)")
            click.echo(f"Would write: {output}\n")
            click.echo(format_plan_report(plan.report))
        return

    report = convert_checkpoint(request, show_progress=show_progress(misc))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(format_plan_report(report["plan"]))
    verification = report["verification"]
    if verification and not verification.get("skipped"):
        click.echo(f"Verified: text-only logits match the source's (max abs diff {verification['max_abs_diff']:.3g}).")
    click.echo(f"Wrote {output}")
