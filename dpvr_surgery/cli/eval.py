"""`dpvr-surgery eval`: held-out accuracy of a model, and how closely it follows a reference model."""

import json
from pathlib import Path

import click

from ..evaluate import LONG_ANSWER_TOKENS, EvalRequest, format_eval_result, run_evaluation
from .options import GroupedCommand, misc_options, model_options, option, show_progress


@click.command("eval", cls=GroupedCommand)
@click.argument("model")
@option("--data", group="Data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Held-out questions as LLaVA conversation JSON: each row's first human turn and the gpt answer after "
        "it. An optional `category` field groups the accuracy.")
@option("--image-folder", group="Data", type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Folder that the `image` paths of --data are relative to (default: the JSON file's folder).")
@option("--per-category", group="Data", type=click.IntRange(min=1),
        help="Use only the first N rows of each category.")
@option("--max-samples", group="Data", type=click.IntRange(min=1), help="Use at most N rows in total.")
@option("--reference", group="Model", metavar="MODEL",
        help="Compare with this model (folder or Hub id), usually the original of a converted MODEL: answer "
        "agreement, top-1 token agreement and mean next-token KL(reference || MODEL) along its greedy answers.")
@option("--long-answer-tokens", group="Generation", type=click.IntRange(min=1), default=LONG_ANSWER_TOKENS,
        show_default=True, help="Expected answers with at least this many tokens form the \"long\" group.")
@option("--max-new-tokens-short", group="Generation", type=click.IntRange(min=1), default=16, show_default=True,
        help="Maximum generated tokens for a short answer.")
@option("--max-new-tokens-long", group="Generation", type=click.IntRange(min=1), default=64, show_default=True,
        help="Maximum generated tokens for a long answer.")
@option("--device", group="Performance", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@option("--json", "as_json", group="Output", is_flag=True, help="Print the summary as JSON instead of the table.")
@option("-o", "--output", group="Output", type=click.Path(dir_okay=False, path_type=Path),
        help="Also write the summary and every sample's answers to this JSON file.")
@model_options
@misc_options
def eval_command(model, data, image_folder, per_category, max_samples, reference, long_answer_tokens,
                 max_new_tokens_short, max_new_tokens_long, device, as_json, output, model_options, misc):
    """Measure MODEL on held-out visual questions: exact-match accuracy, per short and long answers.

    Answers are compared after normalisation (lower case, no punctuation or articles, numbers as
    digits). With --reference, also the agreement with the reference model's greedy answers and the
    mean next-token KL to it, on the reference's answers.
    """
    request = EvalRequest(
        model=model,
        data=data,
        reference=reference,
        image_folder=image_folder,
        per_category=per_category,
        max_samples=max_samples,
        long_answer_tokens=long_answer_tokens,
        max_new_tokens_short=max_new_tokens_short,
        max_new_tokens_long=max_new_tokens_long,
        dtype=model_options.dtype,
        device=device,
        revision=model_options.revision,
        cache_dir=model_options.cache_dir,
    )
    result = run_evaluation(request, show_progress=show_progress(misc))

    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    click.echo(json.dumps(result.summary(), indent=2) if as_json else format_eval_result(result))
