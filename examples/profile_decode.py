"""Profile where prefill and decode time goes in the original and the converted model, per operator.

    python examples/profile_decode.py --shape llava-1.5-7b --hidden-size 512 --threads 1

Builds the random-weight models that `dpvr-surgery bench --shape` builds, runs one untimed prefill
and a few decode steps of each model as warm-up, then records one prefill and `--steps` decode steps
of each with `torch.profiler` (CPU activities). It also times the decode steps by wall clock with
and without the profiler, because the profiler's own allocations change how long some operators take.
Operators are grouped by their role: linear layers,
attention, KV-cache appends (`aten::cat`), routing and masks (gather, scatter, sort, cumsum and the
other index operations that the dual-path graph adds), and the rest. The table shows milliseconds
of operator self time per prefill and per decode step, and operator calls per step.
"""

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dpvr_surgery.bench import BenchSettings, build_shape_models, decode_step_seconds, make_bench_inputs
from dpvr_surgery.plan import PlanSettings, image_tokens_per_image

GROUPS = {
    "linear": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax", "aten::baddbmm"),
    "kv cache append": ("aten::cat",),
    "routing and masks": (
        "aten::sort", "aten::gather", "aten::scatter", "aten::index", "aten::index_put_", "aten::nonzero",
        "aten::cumsum", "aten::masked_fill", "aten::all", "aten::where", "aten::_local_scalar_dense",
        "aten::masked_scatter", "aten::arange", "aten::bitwise_not", "aten::bitwise_and", "aten::lt", "aten::le",
        "aten::ge", "aten::eq",
    ),
}


def group_of(name: str) -> str:
    for group, names in GROUPS.items():
        if name in names:
            return group
    return "other"


def profile_calls(run, calls: int) -> dict:
    """Profile `run()`; return per call the milliseconds of operator self time by group, operator calls and syncs.

    A sync is a call of `aten::_local_scalar_dense`, which copies a value to the host (`.item()`,
    `bool(tensor)`); on CUDA it waits for every queued kernel.
    """
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        run()
    milliseconds: Counter = Counter()
    operator_calls = 0
    syncs = 0
    for event in profiler.key_averages():
        if not event.key.startswith("aten::"):
            continue
        milliseconds[group_of(event.key)] += event.self_cpu_time_total / 1000 / calls
        operator_calls += event.count
        if event.key == "aten::_local_scalar_dense":
            syncs += event.count
    return {"ms": dict(milliseconds), "operator_calls": operator_calls / calls, "syncs": syncs / calls}


def decode_runner(model, inputs, steps: int):
    """Return a function that runs a prefill (not profiled separately) and `steps` cached decode steps."""
    length = inputs.sequence_length
    mask = inputs.attention_mask(length + steps)

    def prefill():
        with torch.no_grad():
            return model(**inputs.prefill_kwargs(), use_cache=True, logits_to_keep=1).cache

    def decode(cache):
        with torch.no_grad():
            for step in range(steps):
                output = model(
                    input_ids=inputs.decode_ids[:, step : step + 1],
                    attention_mask=mask[:, : length + step + 1],
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache = output.cache

    return prefill, decode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llava-1.5-7b")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--split", type=int, default=18)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16, help="Decode steps to profile per model.")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice).")
    parser.add_argument("--output", type=Path, help="Also write the results as JSON to this file.")
    arguments = parser.parse_args(argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)

    models = build_shape_models(arguments.shape, PlanSettings(arguments.split), hidden_size=arguments.hidden_size)
    config = models.original.config
    settings = BenchSettings(text_tokens=arguments.text_tokens)
    inputs = make_bench_inputs(
        config,
        settings,
        image_tokens=image_tokens_per_image(config),
        decode_steps=arguments.steps,
        device=models.original.device,
        dtype=models.original.dtype,
    )

    results = {"command": " ".join([sys.executable, *sys.argv]), "torch_threads": torch.get_num_threads()}
    for name, model in models.as_dict().items():
        prefill, decode = decode_runner(model, inputs, arguments.steps)
        decode(prefill())
        plain_seconds = decode_step_seconds(model, inputs, arguments.steps)
        with profile(activities=[ProfilerActivity.CPU]):
            profiled_seconds = decode_step_seconds(model, inputs, arguments.steps)
        prefill_profile = profile_calls(prefill, 1)
        cache = prefill()
        decode_profile = profile_calls(lambda: decode(cache), arguments.steps)
        results[name] = {
            "prefill_ms": prefill_profile["ms"],
            "prefill_operator_calls": prefill_profile["operator_calls"],
            "prefill_syncs": prefill_profile["syncs"],
            "decode_ms_per_step": decode_profile["ms"],
            "decode_operator_calls_per_step": decode_profile["operator_calls"],
            "decode_syncs_per_step": decode_profile["syncs"],
            "decode_wall_ms_per_step": 1000 * statistics.fmean(plain_seconds),
            "decode_wall_ms_per_step_profiled": 1000 * statistics.fmean(profiled_seconds),
        }

    print(format_table(results), flush=True)
    if arguments.output:
        arguments.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def format_table(results: dict) -> str:
    groups = [*GROUPS, "other"]
    lines = [f"Operator self time in ms, torch threads: {results['torch_threads']}"]
    lines.append(f"  {'group':<18} {'prefill orig':>12} {'prefill conv':>12} {'step orig':>10} {'step conv':>10}")
    for group in groups:
        values = [
            results["original"]["prefill_ms"].get(group, 0.0),
            results["converted"]["prefill_ms"].get(group, 0.0),
            results["original"]["decode_ms_per_step"].get(group, 0.0),
            results["converted"]["decode_ms_per_step"].get(group, 0.0),
        ]
        lines.append(f"  {group:<18} {values[0]:>12.2f} {values[1]:>12.2f} {values[2]:>10.3f} {values[3]:>10.3f}")
    totals = [
        sum(results[name][key].values())
        for key in ("prefill_ms", "decode_ms_per_step")
        for name in ("original", "converted")
    ]
    lines.append(f"  {'total':<18} {totals[0]:>12.2f} {totals[1]:>12.2f} {totals[2]:>10.3f} {totals[3]:>10.3f}")
    lines.append(
        f"  {'operator calls':<18} {results['original']['prefill_operator_calls']:>12.0f} "
        f"{results['converted']['prefill_operator_calls']:>12.0f} "
        f"{results['original']['decode_operator_calls_per_step']:>10.1f} "
        f"{results['converted']['decode_operator_calls_per_step']:>10.1f}"
    )
    lines.append(
        f"  {'host syncs':<18} {results['original']['prefill_syncs']:>12.0f} "
        f"{results['converted']['prefill_syncs']:>12.0f} "
        f"{results['original']['decode_syncs_per_step']:>10.1f} "
        f"{results['converted']['decode_syncs_per_step']:>10.1f}"
    )
    for name in ("original", "converted"):
        lines.append(
            f"Decode wall clock, {name}: {results[name]['decode_wall_ms_per_step']:.1f} ms per step, "
            f"{results[name]['decode_wall_ms_per_step_profiled']:.1f} ms under the profiler"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
