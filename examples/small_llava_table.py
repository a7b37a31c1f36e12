"""Measure what DPVR-LF conversion keeps of the small trained LLaVA: accuracy and prefill FLOPs per variant.

The original is the SmolLM2-135M-Instruct LLaVA with the trained vision tower and projector that
`examples/build_small_llava.py` produced (`dpvr_surgery/assets/small_llava_vision.safetensors`). The
script

1. builds the original (or reuses it from the work folder);
2. writes calibration scenes (32) and fine-tuning conversations from the training distribution, with the
   held-out layouts excluded;
3. runs `dpvr-surgery analyze` on the calibration scenes to choose the split;
4. for each row of the table, runs `dpvr-surgery convert` and, for trained rows, `dpvr-surgery finetune`
   (distillation from the original, or supervised on the generated answers);
5. evaluates the original and every variant on the committed held-out questions
   (`examples/small_llava/heldout/questions.json`) with `dpvr_surgery.evaluate`, against the original as
   the reference, and computes prefill FLOPs with `dpvr_surgery.plan.plan_report` at the held-out
   prompts' median length.

It writes `WORKDIR/table.json` and `WORKDIR/table.md`. Steps that already finished are reused when the
script runs again with the same work folder, so an interrupted run continues where it stopped.

    python examples/small_llava_table.py --workdir /tmp/small-llava-table --threads 1
"""

import argparse
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from dpvr_surgery.evaluate import (
    EvalRequest,
    ReferenceOutput,
    evaluate_model,
    load_eval_samples,
    reference_outputs,
)
from dpvr_surgery.generation import load_model_and_processor
from dpvr_surgery.plan import PlanSettings, plan_report
from dpvr_surgery.scenes import training_records, write_llava_json
from dpvr_surgery.small_llava import build_small_llava, calibration_scenes, held_out_layouts

logger = logging.getLogger("small_llava_table")

REPOSITORY = Path(__file__).resolve().parent.parent
HELD_OUT_JSON = REPOSITORY / "examples" / "small_llava" / "heldout" / "questions.json"
CALIBRATION_SAMPLES = 32
FINETUNE_SEED = 202
GOAL_ACCURACY_KEPT = 0.98
GOAL_FLOP_SAVING = 0.25


@dataclass(frozen=True)
class Variant:
    """One converted model of the table: split layer s, side-branch depth d_v, fusion layers K, and training."""

    split: int
    depth: int
    fusion: int
    training: str  # "none", "distill" or "sft"

    @property
    def name(self) -> str:
        return f"s{self.split}-d{self.depth}-k{self.fusion}-{self.training}"

    @property
    def converted_name(self) -> str:
        return f"s{self.split}-d{self.depth}-k{self.fusion}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/small-llava-table"))
    parser.add_argument("--vision-weights", type=Path, default=None,
                        help="Trained vision tower and projector (default: the file that ships with dpvr_surgery).")
    parser.add_argument("--held-out", type=Path, default=HELD_OUT_JSON)
    parser.add_argument("--per-category", type=int, default=None,
                        help="Held-out questions per category (default: all in the file).")
    parser.add_argument("--split", type=int, default=None, help="Centre the split sweep on this split.")
    parser.add_argument("--calibration-samples", type=int, default=CALIBRATION_SAMPLES,
                        help="Calibration scenes for the saturation analysis.")
    parser.add_argument("--split-offset", type=int, default=3,
                        help="The other two splits lie this many layers below and above the centre split.")
    parser.add_argument("--rows", choices=("core", "full"), default="core",
                        help="core: every variant untrained and distilled, supervised at the centre split only, "
                        "and the analysis's split untrained; full: every variant untrained, distilled and supervised.")
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--finetune-batch-size", type=int, default=4)
    parser.add_argument("--finetune-learning-rate", type=float, default=1e-4)
    parser.add_argument("--finetune-rows", type=int, default=400, help="Generated conversations to fine-tune on.")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch here and in the commands it runs (default: torch's choice).")
    parser.add_argument("--device", default="auto")
    return parser.parse_args()


# --------------------------------------------------------------------------- steps


def build_original(workdir: Path, vision_weights: Path | None) -> Path:
    original = workdir / "original"
    if not (original / "config.json").is_file():
        build_small_llava(original, vision_weights=vision_weights, overwrite=True)
    return original


def write_data(workdir: Path, calibration_samples: int, finetune_rows: int) -> tuple[Path, Path]:
    """Write calibration scenes and fine-tuning conversations; neither reuses a held-out layout."""
    calibration = workdir / "calibration" / "questions.json"
    if not calibration.is_file():
        write_llava_json(calibration_scenes(calibration_samples), calibration.parent)
    finetune = workdir / "finetune-data" / "questions.json"
    if not finetune.is_file():
        records = training_records(FINETUNE_SEED, finetune_rows, questions_per_scene=4,
                                   exclude_layouts=held_out_layouts())
        write_llava_json(records, finetune.parent)
    return calibration, finetune


def run_cli(*args, log: Path) -> str:
    """Run one `dpvr-surgery` command, write its output to `log`, and return its standard output."""
    command = [sys.executable, "-m", "dpvr_surgery", *[str(arg) for arg in args]]
    logger.info("Running %s", shlex.join(command))
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {shlex.join(command)}\n{completed.stdout}\n{completed.stderr}", encoding="utf-8")
    if completed.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed with exit code {completed.returncode}; see {log}")
    logger.info("Finished in %.0f s", time.perf_counter() - started)
    return completed.stdout


def choose_split(workdir: Path, original: Path, calibration: Path, samples: int) -> dict:
    report_path = workdir / "analysis" / "saturation_report.json"
    if not report_path.is_file():
        run_cli("analyze", original, "--data", calibration, "--num-calibration-samples", samples, "-o",
                report_path.parent, "--overwrite", "-q", log=workdir / "logs" / "analyze.log")
    return json.loads(report_path.read_text())


def convert(workdir: Path, original: Path, variant: Variant) -> Path:
    output = workdir / "converted" / variant.converted_name
    if not (output / "config.json").is_file():
        run_cli("convert", original, "-o", output, "--split", variant.split, "--side-branch-depth", variant.depth,
                "--fusion-layers", variant.fusion, "--overwrite", "-q",
                log=workdir / "logs" / f"convert-{variant.converted_name}.log")
    return output


def finetune(workdir: Path, original: Path, converted: Path, variant: Variant, data: Path, args) -> Path:
    output = workdir / "finetuned" / variant.name
    if (output / "config.json").is_file():
        return output
    objective = ["--teacher", original, "--objective", "distill"] if variant.training == "distill" else [
        "--objective", "sft"]
    run_cli("finetune", converted, "-o", output, "--data", data, *objective,
            "--max-steps", args.finetune_steps, "--batch-size", args.finetune_batch_size,
            "--learning-rate", args.finetune_learning_rate, "--save-steps", 10_000, "--overwrite", "-q",
            log=workdir / "logs" / f"finetune-{variant.name}.log")
    return output


def goal_split(config, text_tokens: int, num_layers: int) -> int:
    """Return the largest split (d_v = K = 1) whose estimated prefill FLOP saving reaches the goal."""
    candidates = [split for split in range(1, num_layers - 1)
                  if prefill_saving(config, Variant(split, 1, 1, "none"), text_tokens) >= GOAL_FLOP_SAVING]
    if not candidates:
        raise RuntimeError(f"No split saves {GOAL_FLOP_SAVING:.0%} of prefill FLOPs with {text_tokens} text tokens")
    return max(candidates)


def variants(centre: int, analysis_split: int, offset: int, rows: str, num_layers: int) -> list[Variant]:
    """List the table's variants around the `centre` split, plus the analysis's split when it lies elsewhere.

    Three splits (centre - offset, centre, centre + offset) at d_v = K = 1, evaluated untrained and
    distilled, and supervised at the centre. Then d_v = 2 and K = 2 at the centre, untrained and
    distilled. The analysis's split, when outside the sweep, is evaluated untrained. rows="full"
    distils and supervises every variant.
    """
    splits = sorted({min(max(1, centre + delta), num_layers - 3) for delta in (-offset, 0, offset)})
    listed = []
    for split in splits:
        trainings = ["none", "distill"]
        if rows == "full" or split == centre:
            trainings.append("sft")
        listed += [Variant(split, 1, 1, training) for training in trainings]
    for depth, fusion in ((2, 1), (1, 2)):
        trainings = ["none", "distill", "sft"] if rows == "full" else ["none", "distill"]
        listed += [Variant(centre, depth, fusion, training) for training in trainings]
    if analysis_split not in splits:
        trainings = ["none", "distill", "sft"] if rows == "full" else ["none"]
        listed += [Variant(analysis_split, 1, 1, training) for training in trainings]
    return listed


# --------------------------------------------------------------------------- measuring


def load_references(workdir: Path, original: Path, samples, request: EvalRequest) -> list[ReferenceOutput]:
    """Compute the original's greedy answers and log-probabilities once, cached in the work folder."""
    cache = workdir / "reference_outputs.pt"
    if cache.is_file():
        stored = torch.load(cache, weights_only=True)
        if stored["sample_ids"] == [sample.sample_id for sample in samples]:
            return [ReferenceOutput(item["answer_ids"], item["text"], item["log_probs"]) for item in stored["outputs"]]

    model, processor = load_model_and_processor(str(original), dtype="fp32", device=request.device)
    outputs = reference_outputs(model, processor, samples, request)
    torch.save({"sample_ids": [sample.sample_id for sample in samples],
                "outputs": [vars(item) for item in outputs]}, cache)
    return outputs


def measure(model_path: Path, samples, request: EvalRequest, references, cache: Path) -> dict:
    """Evaluate one model against the references; reuse the stored summary when it exists."""
    if cache.is_file():
        return json.loads(cache.read_text())
    started = time.perf_counter()
    model, processor = load_model_and_processor(str(model_path), dtype="fp32", device=request.device)
    results = evaluate_model(model, processor, samples, request, references=references)
    from dpvr_surgery.evaluate import EvalResult

    summary = EvalResult(str(model_path), "original", str(request.data), results,
                         time.perf_counter() - started).summary()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def prefill_saving(config, variant: Variant | None, text_tokens: int) -> float:
    """Return 1 - converted / original prefill FLOPs (vision encoder and lm_head included); 0 for the original."""
    if variant is None:
        return 0.0
    report = plan_report(config, PlanSettings(variant.split, variant.depth, variant.fusion), text_tokens=text_tokens)
    return 1.0 - report["ratios"]["prefill_flops"]


def median_text_tokens(processor, samples) -> int:
    """Return the median count of prompt tokens that are not image tokens, over the held-out prompts."""
    lengths = []
    for sample in samples:
        messages = [{"role": "user", "content": list(sample.content)}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        # The tokenizer keeps each <image> placeholder as one token; the processor expands it later.
        lengths.append(len(processor.tokenizer(text).input_ids) - len(sample.image_paths))
    return int(statistics.median(lengths))


# --------------------------------------------------------------------------- table


def table_row(label: str, variant: Variant | None, summary: dict, original: dict, saving: float) -> dict:
    groups = summary["groups"]
    accuracy = groups["all"]["accuracy"]
    kept = accuracy / original["groups"]["all"]["accuracy"] if original["groups"]["all"]["accuracy"] else None
    return {
        "label": label,
        "split": None if variant is None else variant.split,
        "side_branch_depth": None if variant is None else variant.depth,
        "fusion_layers": None if variant is None else variant.fusion,
        "training": "-" if variant is None else variant.training,
        "prefill_flop_saving": saving,
        "accuracy": accuracy,
        "accuracy_short": groups["short"]["accuracy"],
        "accuracy_long": groups["long"]["accuracy"],
        "accuracy_kept": kept,
        "answer_agreement": groups["all"].get("answer_agreement"),
        "mean_kl_short": groups["short"].get("mean_kl"),
        "mean_kl_long": groups["long"].get("mean_kl"),
        "goal_met": None if variant is None else (
            kept is not None and kept >= GOAL_ACCURACY_KEPT and saving >= GOAL_FLOP_SAVING),
        "categories": {name: value["accuracy"] for name, value in summary["categories"].items()},
    }


def markdown_table(rows: list[dict]) -> str:
    header = ("| model | s | d_v | K | training | prefill FLOPs saved | accuracy (short / long) | kept | "
              "agreement | KL short / long | goal |")
    lines = [header, "|" + "---|" * 11]
    for row in rows:
        def percent(value):
            return "-" if value is None else f"{100 * value:.1f} %"

        def number(value):
            return "-" if value is None else f"{value:.3f}"

        lines.append(
            f"| {row['label']} | {row['split'] or '-'} | {row['side_branch_depth'] or '-'} | "
            f"{row['fusion_layers'] or '-'} | {row['training']} | {percent(row['prefill_flop_saving'])} | "
            f"{percent(row['accuracy'])} ({percent(row['accuracy_short'])} / {percent(row['accuracy_long'])}) | "
            f"{percent(row['accuracy_kept'])} | {percent(row['answer_agreement'])} | "
            f"{number(row['mean_kl_short'])} / {number(row['mean_kl_long'])} | "
            f"{'-' if row['goal_met'] is None else 'met' if row['goal_met'] else 'not met'} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("dpvr_surgery").setLevel(logging.INFO)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    original = build_original(args.workdir, args.vision_weights)
    calibration, finetune_data = write_data(args.workdir, args.calibration_samples, args.finetune_rows)
    analysis = choose_split(args.workdir, original, calibration, args.calibration_samples)
    analysis_split = analysis["split"]["split_layer"]
    config = AutoConfig.from_pretrained(original)
    num_layers = config.text_config.num_hidden_layers
    logger.info("Analysis chose split %d: %s", analysis_split, analysis["split"]["explanation"])

    request = EvalRequest(model=str(original), data=args.held_out, per_category=args.per_category,
                          device=args.device)
    samples = load_eval_samples(args.held_out, per_category=args.per_category)
    references = load_references(args.workdir, original, samples, request)
    _, processor = load_model_and_processor(str(original), dtype="fp32", device="cpu")
    text_tokens = median_text_tokens(processor, samples)

    # The sweep centres on the analysis's split when that split reaches the FLOP goal, else on the
    # largest split that does, so that the table shows what reaching the goal costs in accuracy.
    goal = goal_split(config, text_tokens, num_layers)
    if args.split is not None:
        centre, centre_reason = args.split, "set with --split"
    elif prefill_saving(config, Variant(analysis_split, 1, 1, "none"), text_tokens) >= GOAL_FLOP_SAVING:
        centre, centre_reason = analysis_split, "the analysis's split"
    else:
        centre, centre_reason = goal, f"the largest split that saves {GOAL_FLOP_SAVING:.0%} of prefill FLOPs"

    original_summary = measure(original, samples, request, references, args.workdir / "eval" / "original.json")
    rows = [table_row("original", None, original_summary, original_summary, 0.0)]
    for variant in variants(centre, analysis_split, args.split_offset, args.rows, num_layers):
        converted = convert(args.workdir, original, variant)
        model_path = converted
        if variant.training != "none":
            model_path = finetune(args.workdir, original, converted, variant, finetune_data, args)
        summary = measure(model_path, samples, request, references, args.workdir / "eval" / f"{variant.name}.json")
        label = "converted" if variant.training == "none" else f"converted + {variant.training}"
        rows.append(table_row(label, variant, summary, original_summary,
                              prefill_saving(config, variant, text_tokens)))
        (args.workdir / "table.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")

    result = {
        "analysis_split": analysis_split,
        "analysis_explanation": analysis["split"]["explanation"],
        "analysis_curves": {name: [entry[name]["mean"] for entry in analysis["layers"]]
                            for name in ("attention_mass", "cosine_similarity", "logit_lens_top1")},
        "goal_split": goal,
        "centre_split": centre,
        "centre_reason": centre_reason,
        "text_tokens": text_tokens,
        "image_tokens": config.image_seq_length,
        "held_out_samples": len(samples),
        "finetune": {"steps": args.finetune_steps, "batch_size": args.finetune_batch_size,
                     "learning_rate": args.finetune_learning_rate, "rows": args.finetune_rows},
        "minutes": (time.perf_counter() - started) / 60,
        "rows": rows,
    }
    (args.workdir / "table.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.workdir / "table.md").write_text(markdown_table(rows) + "\n", encoding="utf-8")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
