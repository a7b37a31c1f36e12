"""Benchmark DPVR-LF at the full llava-1.5-7b and llava-1.5-13b sizes on one GPU and write JSON.

    python examples/gpu_bench.py --output gpu_bench.json

Each shape is built with random weights (bf16, sdpa) and converted in memory at split 18 of 32
(7b) or 22 of 40 (13b), with one side-branch layer and one fusion layer. For each shape the script
runs `dpvr_surgery.bench.run_bench` on 576 image + 64 text tokens with 64 new tokens, and times
decoding without a cache at 64 and 256 new tokens, every step. Then it times a prefill sweep over
image-token counts and text lengths and plots it next to the JSON. The JSON is rewritten after each
shape, so a run that is cut short keeps what it measured.

Time: about 3-5 minutes on one H200. This is an estimate from the step counts (eight runs of 64
decode steps per shape, then 256 cached and 256 uncached steps once), not yet timed on a GPU.
`--budget-seconds` (default 420) aims to keep the whole run under 8 minutes. When the 7b timings
predict that 13b would pass the budget, 13b runs with fewer repeats and without the 256-token
comparison; when even that would pass 470 s, 13b is skipped. Sweeps are skipped when little time is
left.

Memory: both 13b models (original and converted) are resident at once, about 53 GB in bf16.

`--smoke` runs the same code on a CPU at hidden size 128, with 16 image tokens, 8 text tokens and a
few decode steps, to check the script without a GPU.
"""

import argparse
import gc
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dpvr_surgery.bench import BenchSettings, build_shape_models, format_bench_report, run_bench, sweep_prefill
from dpvr_surgery.bench_plot import plot_speedup
from dpvr_surgery.plan import PlanSettings

logger = logging.getLogger("gpu_bench")

# Split layers at llava-1.5-7b's published ratio, 18 of 32 layers; 22 of 40 for 13b.
SPLITS = {"llava-1.5-7b": 18, "llava-1.5-13b": 22}
# 13b has 1.86 times the parameters of 7b; its steps take about that much longer.
SIZE_RATIO_13B = 1.9
# Share of the full 13b time that `reduced_settings` is expected to take (an estimate: one repeat
# fewer and no 256-step comparison).
REDUCED_SHARE = 0.6
# Past this many seconds the run would miss the 8-minute target, so a shape that would end later is skipped.
HARD_LIMIT_SECONDS = 470.0


@dataclass
class RunPlan:
    """Everything that differs between the GPU run and the CPU smoke run."""

    device: str
    dtype: torch.dtype
    hidden_size: int | None
    settings: BenchSettings
    sweep_image_tokens: list[int]
    sweep_text_tokens: list[int]
    sweep_repeats: int


def gpu_plan() -> RunPlan:
    settings = BenchSettings(
        new_tokens=64, warmup=1, repeats=3, no_cache_tokens=(64, 256), no_cache_samples=None, no_cache_repeats=1
    )
    return RunPlan("cuda", torch.bfloat16, None, settings, [144, 576, 1152, 2304], [16, 64, 256], 3)


def smoke_plan() -> RunPlan:
    settings = BenchSettings(
        image_tokens=16,
        text_tokens=8,
        new_tokens=4,
        warmup=0,
        repeats=1,
        no_cache_tokens=(4, 8),
        no_cache_samples=None,
        no_cache_repeats=1,
    )
    return RunPlan("cpu", torch.float32, 128, settings, [8, 16], [4], 1)


def reduced_settings(settings: BenchSettings) -> BenchSettings:
    """Settings for a shape that would not fit the time budget: fewer repeats, no 256-token comparison."""
    shorter = tuple(length for length in settings.no_cache_tokens if length <= settings.new_tokens)
    return replace(settings, repeats=max(1, settings.repeats - 1), no_cache_tokens=shorter)


def bench_shape(name: str, plan: RunPlan, settings: BenchSettings, deadline: float) -> dict:
    """Build, convert and measure one shape; add the prefill sweep when the deadline allows."""
    started = time.perf_counter()
    models = build_shape_models(
        name,
        PlanSettings(SPLITS[name]),
        hidden_size=plan.hidden_size,
        dtype=plan.dtype,
        device=plan.device,
        attn_implementation="sdpa",
    )
    report = run_bench(models, settings)
    bench_seconds = time.perf_counter() - started

    # A sweep point costs about (warm-up + repeats) prefills of both models. The main bench ran as
    # many prefills per point plus every decode run, so half its time is a generous sweep estimate.
    points = len(plan.sweep_image_tokens) * len(plan.sweep_text_tokens)
    if time.perf_counter() + 0.5 * bench_seconds < deadline:
        report["sweep"] = sweep_prefill(
            models,
            image_token_counts=plan.sweep_image_tokens,
            text_token_counts=plan.sweep_text_tokens,
            warmup=1,
            repeats=plan.sweep_repeats,
        )
    else:
        logger.warning("Skipping the %d-point prefill sweep of %s: too little time left", points, name)
        report["sweep"] = []
    report["elapsed_seconds"] = time.perf_counter() - started

    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report


def write_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("gpu_bench.json"), help="JSON file to write.")
    parser.add_argument("--smoke", action="store_true", help="Run the code path on a CPU at tiny width.")
    parser.add_argument("--budget-seconds", type=float, default=420.0, help="Time budget for the whole run.")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice).")
    arguments = parser.parse_args(argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    plan = smoke_plan() if arguments.smoke else gpu_plan()
    if plan.device == "cuda" and not torch.cuda.is_available():
        logger.error("CUDA is not available; run with --smoke to check the script on a CPU")
        return 2

    started = time.perf_counter()
    deadline = started + arguments.budget_seconds
    results = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "smoke": arguments.smoke,
        "settings": {**asdict(plan.settings), "dtype": str(plan.dtype)},
        "reports": {},
    }

    seconds_7b = None
    for name in SPLITS:
        settings = plan.settings
        if seconds_7b is not None:
            predicted = SIZE_RATIO_13B * seconds_7b
            if time.perf_counter() + REDUCED_SHARE * predicted > started + HARD_LIMIT_SECONDS:
                logger.warning("Skipping %s: predicted to take %.0f s, which passes the time limit", name, predicted)
                results["skipped"] = name
                write_results(arguments.output, results)
                continue
            if time.perf_counter() + predicted > deadline:
                logger.warning("%s predicted to take %.0f s, over the budget: running with fewer repeats", name, predicted)
                settings = reduced_settings(settings)
        shape_started = time.perf_counter()
        report = bench_shape(name, plan, settings, deadline)
        seconds_7b = seconds_7b or time.perf_counter() - shape_started

        results["reports"][name] = report
        results["elapsed_seconds"] = time.perf_counter() - started
        write_results(arguments.output, results)
        if report["sweep"]:
            plot_path = arguments.output.with_name(f"{arguments.output.stem}_{name}.png")
            title = f"{name}, split {SPLITS[name]}, {report['environment']['device_name']}"
            plot_speedup(report["sweep"], plot_path, title=title)
        print(format_bench_report(report), flush=True)

    logger.info("Wrote %s in %.0f s", arguments.output, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
