"""The end-to-end demo on the small trained LLaVA: analyse, convert, answer, measure accuracy, time prefill.

The model is SmolLM2-135M-Instruct with the CLIP vision tower and projector that
`examples/build_small_llava.py` trained on shape scenes (`dpvr_surgery.small_llava`). The demo measures
the saturation curve on calibration scenes, converts at the split that the analysis chooses (or at
`split`), and compares the original and the converted model on held-out scene questions.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import LlavaForConditionalGeneration

from .analysis import AnalysisRequest, format_table, run_analysis, write_outputs
from .convert import ConvertRequest, convert_checkpoint
from .demo_model import demo_questions
from .errors import InvalidInputError
from .evaluate import (
    EvalRequest,
    EvalResult,
    evaluate_model,
    load_eval_samples,
    reference_outputs,
    reference_results,
)
from .generation import answer, build_prompt, load_model_and_processor
from .plan import PlanSettings, format_plan_report, plan_report
from .scenes import CATEGORIES, render_scene, write_llava_json
from .small_llava import build_small_llava, calibration_scenes, held_out_questions, vision_weights_path, weights_digest
from .timing import median, time_prefill

logger = logging.getLogger(__name__)

MARKER_FILE = ".dpvr-demo"
SOURCE_DIR = "small-llava"
CONVERTED_DIR = "small-llava-dpvr"
ANALYSIS_DIR = "analysis"
DATA_DIR = "data"
# 17 of SmolLM2's 30 layers, the ratio of llava-1.5-7b's published split (18 of 32). The demo converts
# there when the saturation analysis finds no saturated layer, since its fallback (the latest valid
# split) would save almost nothing and show nothing.
DEFAULT_SPLIT = 17
NUM_STEPS = 6


@dataclass
class DemoAnswer:
    """One question with the expected answer (for scene questions) and both models' answers."""

    question: str
    image: str | None
    expected: str | None
    original: str
    converted: str

    @property
    def identical(self) -> bool:
        return self.original == self.converted


@dataclass
class DemoResult:
    """Everything the demo measured."""

    workdir: Path
    source: Path
    converted: Path
    report: dict
    analysis: dict = field(default_factory=dict)
    plot: Path | None = None
    split_source: str = "analysis"  # "analysis", "option" (--split) or "fallback" (no saturation found)
    answers: list[DemoAnswer] = field(default_factory=list)
    accuracy: dict[str, dict] = field(default_factory=dict)
    prefill_seconds: dict[str, list[float]] = field(default_factory=dict)
    prefill_tokens: int = 0
    prefill_report: dict = field(default_factory=dict)

    @property
    def text_only_identical(self) -> bool:
        return all(item.identical for item in self.answers if item.image is None)


def prepare_workdir(workdir: Path, *, overwrite: bool, weights: Path) -> bool:
    """Create or reuse the demo folder. Return True when its source checkpoint was built from `weights`."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise InvalidInputError(f"Demo folder {workdir} is a file. Pass another path with -o.")
    marker = workdir / MARKER_FILE
    if workdir.is_dir() and any(workdir.iterdir()) and not marker.exists() and not overwrite:
        raise InvalidInputError(
            f"Demo folder {workdir} is not empty and was not made by the demo. Pass --overwrite to use it anyway, "
            "or choose another folder with -o."
        )

    digest = weights_digest(weights)
    reuse = (
        not overwrite
        and (workdir / SOURCE_DIR / "config.json").is_file()
        and marker.is_file()
        and _marker_digest(marker) == digest
    )
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"made_by": "dpvr-surgery demo", "vision_weights_sha256": digest}) + "\n",
                      encoding="utf-8")
    return reuse


def _marker_digest(marker: Path) -> str | None:
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("vision_weights_sha256")
    except (json.JSONDecodeError, AttributeError):
        return None


def write_demo_data(workdir: Path, *, per_category: int, calibration_samples: int) -> tuple[Path, Path]:
    """Write the held-out questions and the calibration scenes as LLaVA JSON, and return both paths."""
    folder = Path(workdir) / DATA_DIR
    held_out = write_llava_json(held_out_questions(per_category), folder / "held-out", name="questions.json")
    calibration = write_llava_json(calibration_scenes(calibration_samples), folder / "calibration",
                                   name="questions.json")
    return held_out, calibration


def run_demo(
    workdir: Path,
    *,
    split: int | None = None,
    per_category: int = 3,
    calibration_samples: int = 8,
    max_new_tokens: int = 40,
    repeats: int = 3,
    overwrite: bool = False,
    show_progress: bool = True,
    vision_weights: Path | None = None,
) -> DemoResult:
    """Build (or reuse) the small LLaVA in `workdir`, analyse and convert it, and compare the two models.

    `split` None takes the split that the saturation analysis chooses. `vision_weights` defaults to the
    weights shipped with the package.
    """
    workdir = Path(workdir)
    weights = Path(vision_weights) if vision_weights is not None else vision_weights_path()
    reuse = prepare_workdir(workdir, overwrite=overwrite, weights=weights)
    source = workdir / SOURCE_DIR
    converted = workdir / CONVERTED_DIR

    logger.info("Step 1/%d: %s the small LLaVA (SmolLM2-135M-Instruct, trained vision tower)", NUM_STEPS,
                "reusing" if reuse else "building")
    if not reuse:
        build_small_llava(source, vision_weights=weights, overwrite=True)
    held_out, calibration = write_demo_data(workdir, per_category=per_category, calibration_samples=calibration_samples)

    logger.info("Step 2/%d: measuring saturation on %d calibration scenes", NUM_STEPS, calibration_samples)
    analysis, plot = _analyse(source, calibration, calibration_samples, workdir / ANALYSIS_DIR, show_progress)
    chosen, split_source = _choose_split(analysis, split)

    logger.info("Step 3/%d: converting with split layer %d", NUM_STEPS, chosen)
    report = convert_checkpoint(
        ConvertRequest(model=str(source), output=converted, settings=PlanSettings(chosen), overwrite=True,
                       command_line=f"dpvr-surgery convert {source} -o {converted} --split {chosen}"),
        show_progress=show_progress,
    )
    result = DemoResult(workdir, source, converted, report["plan"], analysis, plot, split_source)

    logger.info("Step 4/%d: loading both models and answering example questions", NUM_STEPS)
    original_model, processor = load_model_and_processor(str(source), device="cpu")
    converted_model, _ = load_model_and_processor(str(converted), device="cpu")
    if not isinstance(original_model, LlavaForConditionalGeneration):
        raise InvalidInputError(f"{source} did not load as a LLaVA model. Rerun the demo with --overwrite.")
    result.answers = _example_answers(original_model, converted_model, processor, max_new_tokens)

    logger.info("Step 5/%d: held-out accuracy before and after conversion", NUM_STEPS)
    result.accuracy = _accuracy(original_model, converted_model, processor, held_out, show_progress)

    logger.info("Step 6/%d: timing prefill (%d repeats, models interleaved)", NUM_STEPS, repeats)
    _time_prefill(result, original_model, converted_model, processor, chosen, repeats)
    return result


def _choose_split(analysis: dict, split: int | None) -> tuple[int, str]:
    """Return the split to convert at and where it came from: `split`, the analysis, or the fallback."""
    if split is not None:
        return split, "option"
    if analysis["split"].get("saturated", True):
        return analysis["split"]["split_layer"], "analysis"
    logger.warning("The analysis found no saturated layer on the demo model; converting at split %d instead "
                   "(llava-1.5-7b's split ratio). Pass --split N to choose another.", DEFAULT_SPLIT)
    return DEFAULT_SPLIT, "fallback"


def _analyse(source: Path, calibration: Path, samples: int, folder: Path, show_progress: bool) -> tuple[dict, Path]:
    request = AnalysisRequest(
        model=str(source), data=str(calibration), num_calibration_samples=samples, shuffle=False, device="cpu",
        logit_lens_tokens=16, command_line=f"dpvr-surgery analyze {source} --data {calibration}",
    )
    analysis = run_analysis(request, show_progress=show_progress)
    paths = write_outputs(analysis, folder, title="small LLaVA (SmolLM2-135M-Instruct)")
    return analysis.report, paths["plot"]


def _example_answers(original_model, converted_model, processor, max_new_tokens: int) -> list[DemoAnswer]:
    """Answer one held-out scene question per category and the text-only demo questions with both models."""
    answers = []
    records = held_out_questions(1)
    for record in records:
        question = record.questions[0]
        image = render_scene(record.scene)
        replies = [answer(model, processor, question.question, [image], max_new_tokens=max_new_tokens).text
                   for model in (original_model, converted_model)]
        answers.append(DemoAnswer(question.question, f"scene {record.record_id}", question.answer, *replies))

    for item in demo_questions():
        if item.photo is not None:
            continue
        replies = [answer(model, processor, item.question, [], max_new_tokens=max_new_tokens).text
                   for model in (original_model, converted_model)]
        answers.append(DemoAnswer(item.question, None, None, *replies))
    return answers


def _accuracy(original_model, converted_model, processor, held_out: Path, show_progress: bool) -> dict[str, dict]:
    request = EvalRequest(model="converted", data=held_out, reference="original", device="cpu")
    samples = load_eval_samples(held_out)
    references = reference_outputs(original_model, processor, samples, request, show_progress=show_progress)
    original = reference_results(processor, samples, references, request)
    converted = evaluate_model(converted_model, processor, samples, request, references=references,
                               show_progress=show_progress)
    return {
        "original": EvalResult("original", None, str(held_out), original, 0.0).summary(),
        "converted": EvalResult("converted", "original", str(held_out), converted, 0.0).summary(),
    }


def _time_prefill(result: DemoResult, original_model, converted_model, processor, split: int, repeats: int) -> None:
    record = held_out_questions(1)[0]
    prompt = build_prompt(processor, record.questions[0].question, 1)
    inputs = dict(processor(images=[render_scene(record.scene)], text=prompt, return_tensors="pt"))
    result.prefill_tokens = int(inputs["input_ids"].shape[1])
    image_tokens = int((inputs["input_ids"] == original_model.config.image_token_id).sum())
    result.prefill_report = plan_report(
        original_model.config, PlanSettings(split), text_tokens=result.prefill_tokens - image_tokens
    )
    result.prefill_seconds = time_prefill(
        {"original": original_model, "converted": converted_model}, inputs, warmup=1, repeats=repeats
    )


# --------------------------------------------------------------------------- output


def format_demo_result(result: DemoResult) -> str:
    """Format the demo's terminal summary: saturation and split, the plan, answers, accuracy, prefill timing."""
    lines = _format_split(result)
    lines += [format_plan_report(result.report), ""]
    lines += _format_answers(result)
    lines += _format_accuracy(result)
    lines += _format_prefill(result)
    lines.append(f"Models: {result.source} (original), {result.converted} (converted)")
    return "\n".join(lines)


def _format_split(result: DemoResult) -> list[str]:
    layout = result.report["plan"]
    split = layout["split_layer"]
    lines = ["Saturation per decoder layer (mean +- std over the calibration scenes):",
             format_table(result.analysis, split_layer=split)]
    if result.plot is not None:
        lines.append(f"Plot: {result.plot}")
    source = {
        "analysis": "chosen by the analysis",
        "option": "set with --split",
        "fallback": f"the analysis found no saturation and would fall back to {result.analysis['split']['split_layer']}, "
                    "which saves almost nothing; the demo uses llava-1.5-7b's split ratio instead",
    }[result.split_source]
    lines += [f"Split layer: {split} ({source}); image tokens skip layers {split}.."
              f"{layout['deep_text_layers'][1]}.", ""]
    return lines


def _format_answers(result: DemoResult) -> list[str]:
    lines = []
    for item in result.answers:
        topic = f"[{item.image}]" if item.image else "[text only]"
        lines.append(f"Q {topic} {item.question}")
        if item.expected is not None:
            lines.append(f"  expected : {item.expected}")
        lines.append(f"  original : {_one_line(item.original)}")
        lines.append(f"  converted: {_one_line(item.converted)}")
        if item.image is None:
            lines.append("  identical: " + ("yes" if item.identical else "NO (text-only answers must match)"))
        lines.append("")
    return lines


def _format_accuracy(result: DemoResult) -> list[str]:
    original = result.accuracy["original"]
    converted = result.accuracy["converted"]
    samples = original["groups"]["all"]["samples"]
    lines = [
        f"Held-out accuracy, before and after conversion ({samples} scene questions, no fine-tuning):",
        f"  {'model':<10} {'short':>7} {'long':>7} {'all':>7} {'agreement':>10} {'KL short':>9} {'KL long':>8}",
    ]
    for name, summary in (("original", original), ("converted", converted)):
        groups = summary["groups"]
        agreement = "-" if name == "original" else _percent(groups["all"].get("answer_agreement"))
        kl_short = "-" if name == "original" else _number(groups["short"].get("mean_kl"))
        kl_long = "-" if name == "original" else _number(groups["long"].get("mean_kl"))
        lines.append(
            f"  {name:<10} {_percent(groups['short']['accuracy']):>7} {_percent(groups['long']['accuracy']):>7} "
            f"{_percent(groups['all']['accuracy']):>7} {agreement:>10} {kl_short:>9} {kl_long:>8}"
        )
    by_category = ", ".join(
        f"{name} {_percent(original['categories'][name]['accuracy'])} -> "
        f"{_percent(converted['categories'][name]['accuracy'])}"
        for name in CATEGORIES if name in original["categories"]
    )
    lines += [f"  per category: {by_category}", ""]
    return lines


def _format_prefill(result: DemoResult) -> list[str]:
    original = median(result.prefill_seconds["original"])
    converted = median(result.prefill_seconds["converted"])
    flop_ratio = result.prefill_report["ratios"]["prefill_flops"]
    return [
        f"Prefill, one scene question ({result.prefill_tokens} tokens, median of "
        f"{len(result.prefill_seconds['original'])} runs, this machine):",
        f"  original  {original * 1000:8.1f} ms",
        f"  converted {converted * 1000:8.1f} ms   ratio {converted / original:.3f} "
        f"(FLOP ratio {flop_ratio:.3f}, vision tower included)",
        "",
    ]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
