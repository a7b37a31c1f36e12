"""The end-to-end demo: build a small real LLaVA, convert it, answer questions with both, time prefill."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import LlavaForConditionalGeneration

from .convert import ConvertRequest, convert_checkpoint
from .demo_model import build_demo_llava, demo_photos, demo_questions
from .errors import InvalidInputError
from .generation import answer, build_prompt, load_model_and_processor
from .plan import PlanSettings, plan_report
from .timing import median, time_prefill

logger = logging.getLogger(__name__)

MARKER_FILE = ".dpvr-demo"
SOURCE_DIR = "llava-smollm2"
CONVERTED_DIR = "llava-smollm2-dpvr"
# 17 of SmolLM2's 30 layers: the ratio of llava-1.5-7b's published split, 18 of 32. The vision
# tower is untrained, so a saturation analysis of this model would not mean anything yet.
DEFAULT_SPLIT = 17
NUM_STEPS = 5


@dataclass
class DemoAnswer:
    """One question with the original and the converted model's answers."""

    question: str
    photo: str | None
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
    answers: list[DemoAnswer] = field(default_factory=list)
    prefill_seconds: dict[str, list[float]] = field(default_factory=dict)
    prefill_tokens: int = 0
    prefill_report: dict = field(default_factory=dict)

    @property
    def text_only_identical(self) -> bool:
        return all(item.identical for item in self.answers if item.photo is None)


def prepare_workdir(workdir: Path, *, overwrite: bool) -> bool:
    """Create or reuse the demo folder; return True when a finished source checkpoint can be reused."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise InvalidInputError(f"Demo folder {workdir} is a file. Pass another path with -o.")
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / MARKER_FILE).exists() and not overwrite:
        raise InvalidInputError(
            f"Demo folder {workdir} is not empty and was not made by the demo. Pass --overwrite to use it anyway, "
            "or choose another folder with -o."
        )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER_FILE).write_text("made by dpvr-surgery demo\n", encoding="utf-8")
    return (workdir / SOURCE_DIR / "config.json").is_file() and not overwrite


def run_demo(
    workdir: Path,
    *,
    split: int = DEFAULT_SPLIT,
    max_new_tokens: int = 40,
    repeats: int = 3,
    overwrite: bool = False,
    show_progress: bool = True,
    vision_weights: Path | None = None,
) -> DemoResult:
    """Build (or reuse) the demo LLaVA in `workdir`, convert it, and compare the two models."""
    workdir = Path(workdir)
    reuse = prepare_workdir(workdir, overwrite=overwrite)
    source = workdir / SOURCE_DIR
    converted = workdir / CONVERTED_DIR

    logger.info("Step 1/%d: %s the LLaVA checkpoint from SmolLM2-135M-Instruct", NUM_STEPS, "reusing" if reuse else "building")
    if not reuse:
        build_demo_llava(source, vision_weights=vision_weights, overwrite=True)

    logger.info("Step 2/%d: converting with split layer %d", NUM_STEPS, split)
    report = convert_checkpoint(
        ConvertRequest(
            model=str(source),
            output=converted,
            settings=PlanSettings(split),
            overwrite=True,
            command_line=f"dpvr-surgery convert {source} -o {converted} --split {split}",
        ),
        show_progress=show_progress,
    )
    result = DemoResult(workdir, source, converted, report["plan"])

    logger.info("Step 3/%d: loading both models", NUM_STEPS)
    original_model, processor = load_model_and_processor(str(source), device="cpu")
    converted_model, _ = load_model_and_processor(str(converted), device="cpu")
    if not isinstance(original_model, LlavaForConditionalGeneration):
        raise InvalidInputError(f"{source} did not load as a LLaVA model; rerun the demo with --overwrite.")

    logger.info("Step 4/%d: answering %d questions with both models", NUM_STEPS, len(demo_questions()))
    photos = demo_photos()
    for number, item in enumerate(demo_questions(), start=1):
        images = [photos[item.photo]] if item.photo else []
        replies = [
            answer(model, processor, item.question, images, max_new_tokens=max_new_tokens).text
            for model in (original_model, converted_model)
        ]
        result.answers.append(DemoAnswer(item.question, item.photo, *replies))
        logger.info("  question %d/%d done", number, len(demo_questions()))

    logger.info("Step 5/%d: timing prefill (%d repeats, models interleaved)", NUM_STEPS, repeats)
    first_photo = next(item for item in demo_questions() if item.photo)
    prompt = build_prompt(processor, first_photo.question, 1)
    inputs = dict(processor(images=[photos[first_photo.photo]], text=prompt, return_tensors="pt"))
    result.prefill_tokens = int(inputs["input_ids"].shape[1])
    image_tokens = int((inputs["input_ids"] == original_model.config.image_token_id).sum())
    result.prefill_report = plan_report(
        original_model.config, PlanSettings(split), text_tokens=result.prefill_tokens - image_tokens
    )
    result.prefill_seconds = time_prefill(
        {"original": original_model, "converted": converted_model}, inputs, warmup=1, repeats=repeats
    )
    return result


def format_demo_result(result: DemoResult) -> str:
    """Format the demo's terminal summary: both models' replies side by side, then prefill timing and FLOP ratio."""
    lines = []
    for item in result.answers:
        topic = f"[photo: {item.photo}]" if item.photo else "[text only]"
        lines.append(f"Q {topic} {item.question}")
        lines.append(f"  original : {_one_line(item.original)}")
        lines.append(f"  converted: {_one_line(item.converted)}")
        if item.photo is None:
            lines.append("  identical: " + ("yes" if item.identical else "NO (text-only answers must match)"))
        lines.append("")

    original = median(result.prefill_seconds["original"])
    converted = median(result.prefill_seconds["converted"])
    flop_ratio = result.prefill_report["ratios"]["prefill_flops"]
    lines.append(f"Prefill, one photo question ({result.prefill_tokens} tokens, median of "
                 f"{len(result.prefill_seconds['original'])} runs, this machine):")
    lines.append(f"  original  {original * 1000:8.1f} ms")
    lines.append(f"  converted {converted * 1000:8.1f} ms   ratio {converted / original:.3f} "
                 f"(FLOP ratio {flop_ratio:.3f}, vision tower included)")
    lines.append("")
    lines.append(f"Models: {result.source} (original), {result.converted} (converted)")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())
