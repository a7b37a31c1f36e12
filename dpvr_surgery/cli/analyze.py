"""`dpvr-surgery analyze`: measure visual saturation per decoder layer and choose the split layer."""

import json
import logging
from pathlib import Path

import click
from transformers import LlavaConfig

from ..analysis import (
    REPORT_FILE_NAME,
    RULE_LENSES,
    AnalysisRequest,
    SplitRule,
    format_table,
    run_analysis,
    saturation_summary,
    write_outputs,
)
from ..analysis.data import read_prompts_file
from ..checkpoint import read_config, resolve_model_path
from ..errors import InvalidInputError
from .options import GroupedCommand, misc_options, model_options, option, recipe_value, show_progress

logger = logging.getLogger(__name__)

SECTION = "analyze"
DEFAULT_RULE = SplitRule()
DEFAULT_REQUEST = AnalysisRequest(model="", command_line="")

# Recipe keys of the `analyze` section, with the value each takes when neither a flag nor the recipe sets it.
ANALYZE_DEFAULTS: dict = {
    "data": None,
    "image_folder": None,
    "prompt": None,
    "prompts_file": None,
    "num_calibration_samples": DEFAULT_REQUEST.num_calibration_samples,
    "max_seq_length": DEFAULT_REQUEST.max_seq_length,
    "shuffle": DEFAULT_REQUEST.shuffle,
    "logit_lens_tokens": DEFAULT_REQUEST.logit_lens_tokens,
    "batch_size": DEFAULT_REQUEST.batch_size,
    "sequential": None,
    "device": DEFAULT_REQUEST.device,
    "device_map": None,
    "attn_implementation": None,
    "dtype": DEFAULT_REQUEST.dtype,
    "seed": DEFAULT_REQUEST.seed,
    "fusion_layers": DEFAULT_RULE.num_fusion_layers,
    "rule_lenses": ",".join(DEFAULT_RULE.lenses),
    "attention_tolerance": DEFAULT_RULE.attention_tolerance,
    "attention_threshold": DEFAULT_RULE.attention_threshold,
    "cosine_threshold": DEFAULT_RULE.cosine_threshold,
    "top1_threshold": DEFAULT_RULE.top1_threshold,
    "min_split": DEFAULT_RULE.min_split,
}


def parse_rule_lenses(text: str | list | tuple) -> tuple[str, ...]:
    """Split a comma-separated lens list ("attention,cosine") or take a recipe list as it is."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    lenses = tuple(str(item).strip() for item in items if str(item).strip())
    unknown = [lens for lens in lenses if lens not in RULE_LENSES]
    if not lenses or unknown:
        raise InvalidInputError(
            f"Invalid --rule-lenses {text!r}: use one or more of {', '.join(RULE_LENSES)}, separated by commas."
        )
    return lenses


def analysis_request(model: str, settings: dict, *, revision: str | None, cache_dir: str | None) -> AnalysisRequest:
    """Build an AnalysisRequest from `analyze` settings (recipe keys; missing keys take their defaults)."""
    values = {**ANALYZE_DEFAULTS, **settings}
    prompts = None
    if values["prompt"] is not None and values["prompts_file"] is not None:
        raise InvalidInputError("Pass either --prompt or --prompts-file, not both.")
    if values["prompt"] is not None:
        prompts = [str(values["prompt"])]
    elif values["prompts_file"] is not None:
        prompts = read_prompts_file(values["prompts_file"])

    rule = SplitRule(
        lenses=parse_rule_lenses(values["rule_lenses"]),
        attention_tolerance=values["attention_tolerance"],
        attention_threshold=values["attention_threshold"],
        cosine_threshold=values["cosine_threshold"],
        top1_threshold=values["top1_threshold"],
        min_split=values["min_split"],
        num_fusion_layers=values["fusion_layers"],
    )
    return AnalysisRequest(
        model=model,
        data=values["data"],
        image_folder=values["image_folder"],
        prompts=prompts,
        num_calibration_samples=values["num_calibration_samples"],
        batch_size=values["batch_size"],
        max_seq_length=values["max_seq_length"],
        shuffle=values["shuffle"],
        seed=values["seed"],
        logit_lens_tokens=values["logit_lens_tokens"],
        sequential=values["sequential"],
        dtype=values["dtype"],
        device=values["device"],
        device_map=values["device_map"],
        attn_implementation=values["attn_implementation"],
        revision=revision,
        cache_dir=cache_dir,
        rule=rule,
    )


def plot_title(model: str) -> str:
    """Return a short plot title: the folder name of a local model, or the Hub id."""
    path = Path(model)
    return path.name if path.exists() else model


def calibration_options(function):
    """Add the calibration-data flags (section "Calibration" of --help)."""
    decorators = [
        option("--data", group="Calibration", type=click.Path(exists=True),
               help="Folder of images, or a LLaVA conversation JSON file (llava_v1_5_mix665k.json format). "
               "Default: built-in scikit-image photos with generic questions."),
        option("--image-folder", group="Calibration", type=click.Path(exists=True, file_okay=False),
               help="Folder that the image paths of a LLaVA JSON file are relative to (default: the file's folder)."),
        option("--prompt", group="Calibration", help="Prompt for every image of an image folder."),
        option("--prompts-file", group="Calibration", type=click.Path(exists=True, dir_okay=False),
               help="Prompts for an image folder, one per line, used in turn."),
        option("--num-calibration-samples", group="Calibration", type=click.IntRange(min=1),
               default=ANALYZE_DEFAULTS["num_calibration_samples"], show_default=True,
               help="Samples to analyse (fewer when the data has fewer readable ones)."),
        option("--max-seq-length", group="Calibration", type=click.IntRange(min=1),
               default=ANALYZE_DEFAULTS["max_seq_length"], show_default=True,
               help="Maximum sample length in tokens, image tokens included. Longer samples are cut at the end, "
               "never inside an image."),
        option("--shuffle/--no-shuffle", group="Calibration", default=ANALYZE_DEFAULTS["shuffle"], show_default=True,
               help="Pick samples in a random order drawn from --seed, or in file order."),
        option("--logit-lens-tokens", group="Calibration", type=click.IntRange(min=1),
               default=ANALYZE_DEFAULTS["logit_lens_tokens"], show_default=True,
               help="Image tokens per sample that the logit lens reads, evenly spaced over the image."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def rule_options(function):
    """Add the split-rule flags (section "Plan" of --help)."""
    decorators = [
        option("--fusion-layers", group="Plan", type=click.IntRange(min=1), default=ANALYZE_DEFAULTS["fusion_layers"],
               show_default=True, help="Fusion layers K of the planned conversion: the split lies in 1..L-K-1."),
        option("--rule-lenses", group="Plan", default=ANALYZE_DEFAULTS["rule_lenses"], show_default=True,
               help=f"Lenses that must all show saturation, comma-separated: {', '.join(RULE_LENSES)}."),
        option("--attention-tolerance", group="Plan", type=click.FloatRange(0, 1),
               default=ANALYZE_DEFAULTS["attention_tolerance"], show_default=True,
               help="Attention lens: saturated where mass <= floor + tolerance x (peak - floor) over layers."),
        option("--attention-threshold", group="Plan", type=click.FloatRange(0, 1),
               help="Attention lens: an absolute mass threshold instead of the tolerance rule."),
        option("--cosine-threshold", group="Plan", type=click.FloatRange(-1, 1),
               default=ANALYZE_DEFAULTS["cosine_threshold"], show_default=True,
               help="Cosine lens: saturated where cos(h_l, h_l+1) of image tokens >= this."),
        option("--top1-threshold", group="Plan", type=click.FloatRange(0, 1),
               default=ANALYZE_DEFAULTS["top1_threshold"], show_default=True,
               help="Logit lens: saturated where top-1 agreement with the last layer >= this."),
        option("--min-split", group="Plan", type=click.IntRange(min=1), default=ANALYZE_DEFAULTS["min_split"],
               show_default=True, help="Smallest split the rule may choose."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


@click.command(cls=GroupedCommand)
@click.argument("model")
@calibration_options
@rule_options
@option("-o", "--output", group="Output", type=click.Path(file_okay=False, path_type=Path),
        default=Path("dpvr-analysis"), show_default=True,
        help=f"Folder for {REPORT_FILE_NAME} and the PNG plot.")
@option("--overwrite", group="Output", is_flag=True, help="Replace an existing report in OUTPUT.")
@option("--json", "as_json", group="Output", is_flag=True, help="Print the report as JSON instead of the table.")
@option("--batch-size", group="Performance", type=click.IntRange(min=1), default=ANALYZE_DEFAULTS["batch_size"],
        show_default=True, help="Samples per forward pass.")
@option("--sequential/--in-memory", group="Performance", default=None,
        help="Load one decoder layer at a time from safetensors (for models larger than memory), or the whole "
        "model. Default: layer by layer only when the weights do not fit in free memory.")
@option("--device", group="Performance", default=ANALYZE_DEFAULTS["device"], show_default=True,
        help="auto, cpu, cuda or cuda:N.")
@option("--device-map", group="Performance",
        help="Spread the model over several GPUs through accelerate, for example --device-map auto.")
@option("--attn-implementation", group="Performance", type=click.Choice(["eager", "sdpa", "flash_attention_2"]),
        help="Attention kernel to load the model with (default: the transformers default). The lenses do not "
        "depend on it.")
@model_options
@misc_options
@click.pass_context
def analyze(ctx, model, output, overwrite, as_json, model_options, misc, **flags):
    """Measure visual saturation of the LLaVA model MODEL per decoder layer and choose the split layer.

    Three lenses per layer, averaged over calibration samples with their spread:

    \b
    - the attention that text queries after the image pay to image tokens;
    - the cosine similarity of image-token hidden states before and after the layer;
    - the logit lens on image tokens: KL to the last layer and top-1 agreement.

    Writes a JSON report and a PNG plot to OUTPUT and prints a table.
    """
    # Every recipe key is also the name of its click parameter.
    flags["dtype"] = model_options.dtype
    flags["seed"] = misc.seed
    settings = {key: recipe_value(ctx, misc, SECTION, key, key, flags[key]) for key in ANALYZE_DEFAULTS}
    request = analysis_request(model, settings, revision=model_options.revision, cache_dir=model_options.cache_dir)

    report_path = output / REPORT_FILE_NAME
    if report_path.exists() and not overwrite:
        raise InvalidInputError(
            f"Output {report_path} already exists. Pass --overwrite to replace it, or choose another folder with -o."
        )
    result = run_analysis(request, show_progress=show_progress(misc))
    paths = write_outputs(result, output, title=plot_title(model))

    if as_json:
        click.echo(json.dumps(result.report, indent=2))
        return
    click.echo(format_table(result.report))
    click.echo(f"Wrote {paths['report']} and {paths['plot']}")


class SplitParamType(click.ParamType):
    """A split layer: a positive integer, or "auto" to choose it with a saturation analysis."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        try:
            return int(text)
        except ValueError:
            self.fail(f"{value!r} is not a layer number or 'auto'. Pass --split 18 or --split auto.", param, ctx)


SPLIT = SplitParamType()


def parse_split(value) -> int | str:
    """Return a split from a flag or recipe value: an integer or "auto"."""
    try:
        return SPLIT.convert(value, None, None)
    except click.BadParameter as error:
        raise InvalidInputError(f"Invalid split: {error.message}") from error


def analyze_for_convert(
    model: str,
    analyze_section: dict,
    *,
    fusion_layers: int,
    seed: int,
    revision: str | None,
    cache_dir: str | None,
    folder: Path,
    show_progress: bool,
) -> tuple[int, dict, Path]:
    """Run the analysis behind `convert --split auto`; return the split, the config summary and the plot path.

    The settings come from the recipe's `analyze` section (without one: the built-in photos and the
    default rule), with the fusion-layer count of the conversion, so the split lies in 1..L-K-1.
    """
    settings = {"seed": seed, **analyze_section, "fusion_layers": fusion_layers}
    request = analysis_request(model, settings, revision=revision, cache_dir=cache_dir)
    logger.info("Choosing the split with a saturation analysis of %s", model)
    try:
        result = run_analysis(request, show_progress=show_progress)
    except InvalidInputError as error:
        raise InvalidInputError(
            f"--split auto failed: {error} Pass --split N to choose the split yourself (`dpvr-surgery inspect "
            "MODEL` shows the valid range)."
        ) from error
    paths = write_outputs(result, folder, title=plot_title(model))
    decision = result.decision
    if not decision.saturated:
        # The rule's fallback, the latest valid split, would write a model that saves almost nothing.
        used = ", ".join(proposal.lens for proposal in decision.proposals if proposal.used)
        proposals = ", ".join(
            f"{proposal.lens} {proposal.split_layer}" for proposal in decision.proposals
            if proposal.split_layer is not None
        ) or "none"
        raise InvalidInputError(
            f"--split auto found no saturated layer in {model} with the rule's lens(es) {used}. Its fallback, "
            f"split {decision.split_layer} (the latest valid one), would save almost nothing, so nothing was "
            f"written. Splits that each lens alone would choose: {proposals}. The report and plot are in "
            f"{folder}. Pass --split N to convert at a split you choose, or relax the rule in the recipe's "
            "analyze section (rule_lenses, attention_tolerance)."
        )
    logger.info("%s", decision.explanation)
    return decision.split_layer, saturation_summary(result.report), paths["plot"]


# llava-1.5-7b's published split, 18 of its 32 layers, as a ratio for previews.
PREVIEW_SPLIT_FRACTION = 18 / 32


def preview_split(model: str, fusion_layers: int, *, revision: str | None, cache_dir: str | None) -> int:
    """Return the split that a `--dry-run` with `--split auto` previews: the published ratio, rounded."""
    config = LlavaConfig.from_dict(read_config(resolve_model_path(model, revision=revision, cache_dir=cache_dir)))
    num_layers = config.text_config.num_hidden_layers
    return max(1, min(round(num_layers * PREVIEW_SPLIT_FRACTION), num_layers - fusion_layers - 1))
