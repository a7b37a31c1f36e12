"""The bench command and library: KV-cache bytes against the analytic figure, report fields, exit codes."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import make_tiny_llava

from dpvr_surgery.bench import (
    BenchSettings,
    StorageMemoryTracker,
    check_kv_cache,
    format_bench_report,
    interpolated_mean,
    models_from_llava,
    no_cache_steps,
    run_bench,
    shape_config,
    sweep_prefill,
)
from dpvr_surgery.bench_plot import plot_speedup
from dpvr_surgery.cli import main
from dpvr_surgery.convert import ConvertRequest, convert_checkpoint
from dpvr_surgery.errors import InvalidInputError, VerificationError
from dpvr_surgery.plan import PlanSettings, image_tokens_per_image

REPO_ROOT = Path(__file__).resolve().parent.parent

# Top-level fields of a bench report, as docs/benchmarks.md lists them.
REPORT_FIELDS = {
    "report_version", "model", "source", "notes", "environment", "architecture", "plan", "prompt", "repetitions",
    "analytic", "original", "converted", "vision_encoder_seconds", "no_cache", "ratios", "goals",
}
MODEL_FIELDS = {
    "prefill_seconds", "decode_seconds_per_token", "decode_tokens_per_second", "kv_cache_bytes",
    "kv_cache_tokens_per_layer", "weights_bytes", "peak_memory_bytes", "peak_memory_method",
}
RATIO_FIELDS = {
    "prefill_speedup", "flop_bound", "share_of_flop_bound", "decoder_flops_change", "prefill_flops_change",
    "token_layers_change", "kv_cache_ratio", "decode_time_ratio", "end_to_end_prefill_speedup", "end_to_end_flop_bound",
    "prefill_speedup_per_repeat", "decode_time_ratio_per_repeat",
}
# Small enough for seconds on a CPU: no warm-up, one run, two or three decode steps.
QUICK = {"warmup": 0, "repeats": 1, "no_cache_samples": None, "no_cache_repeats": 1}
QUICK_FLAGS = ["--warmup", "0", "--repeats", "1", "--no-cache-samples", "all", "--no-memory", "--threads", "1"]


def run(*args):
    return CliRunner().invoke(main, ["bench", *[str(arg) for arg in args]], catch_exceptions=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run torch on one thread: two OpenMP threads on a busy two-core machine stall for seconds per call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_models():
    source = make_tiny_llava(seed=5, attn_implementation="sdpa")
    return models_from_llava(source, PlanSettings(split_layer=2), label="tiny")


@pytest.fixture(scope="module")
def batch_report(tiny_models):
    # Two rows of two images each, so every layer group caches a different number of positions.
    settings = BenchSettings(num_images=2, text_tokens=6, batch_size=2, new_tokens=3, no_cache_tokens=(2, 3), **QUICK)
    return run_bench(tiny_models, settings)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "source"
    make_tiny_llava(seed=6).save_pretrained(folder)
    return folder


def test_measured_kv_bytes_equal_analytic(batch_report):
    analytic = batch_report["analytic"]
    assert batch_report["original"]["kv_cache_bytes"] == analytic["original"]["kv_cache_bytes"]
    assert batch_report["converted"]["kv_cache_bytes"] == analytic["converted"]["kv_cache_bytes"]
    for group, measured in batch_report["converted"]["kv_cache_bytes_by_group"].items():
        assert measured == analytic["converted"]["kv_cache_bytes_by_group"][group], group
    check_kv_cache(batch_report)


def test_deep_layers_cache_text_positions_only(batch_report):
    prompt = batch_report["prompt"]
    full = prompt["sequence_length"]
    assert full == 2 * 16 + 6
    # Layers 0-1 shared, 2-4 deep text, 5 fusion.
    assert batch_report["converted"]["kv_cache_tokens_per_layer"] == [full, full, 6, 6, 6, full]
    assert batch_report["original"]["kv_cache_tokens_per_layer"] == [full] * 6


def test_report_has_documented_fields(batch_report):
    assert set(batch_report) == REPORT_FIELDS
    assert MODEL_FIELDS <= set(batch_report["original"])
    assert MODEL_FIELDS | {"kv_cache_bytes_by_group"} <= set(batch_report["converted"])
    assert set(batch_report["ratios"]) == RATIO_FIELDS
    assert set(batch_report["no_cache"]) == {"2", "3"}
    assert batch_report["original"]["peak_memory_bytes"] > 0
    json.dumps(batch_report)


def test_report_ratios_follow_measurements(batch_report):
    ratios = batch_report["ratios"]
    original = batch_report["original"]
    converted = batch_report["converted"]
    assert ratios["prefill_speedup"] == pytest.approx(
        original["prefill_seconds"]["median"] / converted["prefill_seconds"]["median"]
    )
    assert ratios["share_of_flop_bound"] == pytest.approx(ratios["prefill_speedup"] / ratios["flop_bound"])
    assert ratios["flop_bound"] > 1
    entry = batch_report["no_cache"]["3"]
    assert entry["timed_steps"] == [0, 1, 2]
    assert entry["cached_over_no_cache"] == pytest.approx(
        entry["cached_seconds_per_token"] / entry["no_cache_seconds_per_token"]
    )
    assert [goal["met"] for goal in batch_report["goals"] if goal["name"].startswith("KV-cache")] == [True]


def test_text_report_shows_tables(batch_report):
    text = format_bench_report(batch_report)
    assert "prefill ms" in text
    assert "KV cache MiB, measured" in text
    assert "3 new tokens: cached" in text
    assert "[met] KV-cache bytes equal the analytic figure" in text


def test_kv_mismatch_raises_verification_error(batch_report):
    broken = json.loads(json.dumps(batch_report))
    broken["converted"]["kv_cache_bytes_by_group"]["deep_text"] += 2
    with pytest.raises(VerificationError, match=r"converted deep_text layers: measured .* bytes, analytic"):
        check_kv_cache(broken)


def test_shape_config_keeps_layout():
    config = shape_config("llava-1.5-7b", hidden_size=512)
    text = config.text_config
    assert text.num_hidden_layers == 32
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (512, 4, 4, 128)
    assert text.intermediate_size == 1376
    assert image_tokens_per_image(config) == 576

    config = shape_config("llava-1.5-13b", hidden_size=640)
    assert config.text_config.num_hidden_layers == 40
    assert config.text_config.num_attention_heads == 5
    assert image_tokens_per_image(config) == 576

    full = shape_config("llava-1.5-7b")
    assert full.text_config.hidden_size == 4096


def test_shape_config_rejects_width():
    with pytest.raises(InvalidInputError, match="hidden size 500 does not fit shape llava-1.5-7b: .* multiple of 128"):
        shape_config("llava-1.5-7b", hidden_size=500)


def test_settings_reject_bad_counts():
    with pytest.raises(InvalidInputError, match="repeats 0 is invalid: it must be at least 1"):
        BenchSettings(repeats=0).validate()
    with pytest.raises(InvalidInputError, match="no_cache_samples 1 is invalid"):
        BenchSettings(no_cache_samples=1).validate()


def test_no_cache_steps_and_interpolation():
    assert no_cache_steps((4, 8), None) == list(range(8))
    assert no_cache_steps((5, 9), 3) == [0, 2, 4, 8]
    linear = {0: 1.0, 4: 5.0, 8: 9.0}
    # Steps 0..7 of a straight line from 1 to 8: mean 4.5.
    assert interpolated_mean(linear, 8) == pytest.approx(4.5)
    assert interpolated_mean({0: 2.0, 1: 4.0}, 2) == pytest.approx(3.0)


def test_memory_tracker_counts_new_storages():
    existing = torch.ones(1000)
    with StorageMemoryTracker() as tracker:
        view = existing[:10] * 1  # a new 40-byte storage
        big = torch.empty(4096)  # 16 KiB
        del big
        after_free = tracker.current_bytes
        same = existing.view(10, 100)  # a view of an old storage: no new bytes
    assert tracker.peak_bytes == 40 + 4096 * 4
    assert after_free == 40
    assert view.shape == (10,)
    assert same.shape == (10, 100)


def test_sweep_and_plot(tiny_models, tmp_path):
    points = sweep_prefill(tiny_models, image_token_counts=[4, 16], text_token_counts=[3, 6], warmup=0, repeats=1)
    assert [(point["image_tokens"], point["text_tokens"]) for point in points] == [(4, 3), (4, 6), (16, 3), (16, 6)]
    assert all(math.isfinite(point["speedup"]) and point["flop_bound"] > 1 for point in points)

    path = plot_speedup(points, tmp_path / "plots" / "speedup.png", title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InvalidInputError, match="no sweep points to plot"):
        plot_speedup([], tmp_path / "empty.png")


def test_cli_shape_json(tmp_path):
    output = tmp_path / "report.json"
    result = run(
        "--shape", "llava-1.5-7b", "--hidden-size", "128", "--image-tokens", "8", "--text-tokens", "4",
        "--new-tokens", "2", "--no-cache-tokens", "2", "--json", "-o", output, "-q", *QUICK_FLAGS,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads(output.read_text())
    assert report["plan"]["split_layer"] == 18
    assert report["architecture"]["num_layers"] == 32
    assert report["notes"] == {"weights": "random", "hidden_size": 128, "full_hidden_size": 4096}
    assert report["converted"]["kv_cache_bytes"] == report["analytic"]["converted"]["kv_cache_bytes"]
    assert report["command"].startswith("dpvr-surgery")


def test_cli_model_with_split_and_converted(source_dir, tmp_path):
    in_memory = run(source_dir, "--split", "3", "--new-tokens", "1", "--no-cache-tokens", "none", "-q", *QUICK_FLAGS)
    assert in_memory.exit_code == 0, in_memory.output
    assert "Plan: split layer 3" in in_memory.output
    assert "[converted in memory]" in in_memory.output

    converted = tmp_path / "converted"
    convert_checkpoint(ConvertRequest(model=str(source_dir), output=converted, settings=PlanSettings(2), verify=False))
    from_folder = run(
        source_dir, "--converted", converted, "--new-tokens", "1", "--no-cache-tokens", "none", "--json", "-q",
        *QUICK_FLAGS,
    )
    assert from_folder.exit_code == 0, from_folder.output
    report = json.loads(from_folder.stdout)
    assert report["plan"]["split_layer"] == 2
    assert report["source"] == "checkpoints"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "Pass either MODEL or --shape, not neither"),
        (["--shape", "llava-1.5-7b", "--converted", "."], "cannot be combined with --shape"),
        (["--shape", "llava-1.5-7b", "--hidden-size", "100"], "hidden size 100 does not fit shape llava-1.5-7b"),
        (["--shape", "llava-1.5-7b", "--hidden-size", "128", "--split", "40"], "outside the valid range 1..30"),
        (["--shape", "llava-1.5-7b", "--no-cache-tokens", "64,x"], "--no-cache-tokens '64,x' is invalid"),
        (["--shape", "llava-1.5-7b", "--no-cache-samples", "some"], "--no-cache-samples 'some' is invalid"),
    ],
    ids=["no-model", "converted-with-shape", "bad-width", "bad-split", "bad-lengths", "bad-samples"],
)
def test_cli_invalid_input_exits_2(arguments, message):
    result = run(*arguments)
    assert result.exit_code == 2
    assert message in result.output


def test_cli_rejects_converted_model_as_source(source_dir, tmp_path):
    converted = tmp_path / "converted"
    convert_checkpoint(ConvertRequest(model=str(source_dir), output=converted, settings=PlanSettings(2), verify=False))
    result = run(converted, "--split", "2")
    assert result.exit_code == 2
    assert "already a converted dual-path model" in result.output


def test_gpu_script_smoke(tmp_path):
    output = tmp_path / "gpu_bench.json"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "gpu_bench.py"), "--smoke", "--threads", "1", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    assert set(results["reports"]) == {"llava-1.5-7b", "llava-1.5-13b"}
    for name, report in results["reports"].items():
        assert report["converted"]["kv_cache_bytes"] == report["analytic"]["converted"]["kv_cache_bytes"], name
        assert report["sweep"], name
    assert (tmp_path / "gpu_bench_llava-1.5-7b.png").is_file()
