"""`dpvr-surgery finetune` as real processes: two DDP processes on gloo, and resume after `kill -9`."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from finetune_helpers import convert_tiny, load_weights, save_tiny_llava

BIN = Path(sys.executable).parent
CLI = str(BIN / "dpvr-surgery")
ACCELERATE = str(BIN / "accelerate")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune-processes")
    source = save_tiny_llava(root / "source")
    return {"root": root, "source": source, "converted": convert_tiny(source, root / "converted")}


def environment() -> dict[str, str]:
    # One thread per process: tiny matrices, and a CPU shared by both DDP processes.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def finetune_args(folders, output: Path, *extra: str) -> list[str]:
    return [
        "finetune", str(folders["converted"]), "-o", str(output), "--teacher", str(folders["source"]),
        "--learning-rate", "1e-3", "--teacher-answer-tokens", "4", "--max-samples", "16", *extra,
    ]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([CLI, *args], env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def test_two_processes_match_accumulation(folders):
    """Two DDP processes with one row each equal one process that accumulates two rows per step."""
    two = folders["root"] / "two-processes"
    launch = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), CLI,
    ]
    result = subprocess.run(
        [*launch, *finetune_args(folders, two, "--max-steps", "4", "-q")],
        env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    one = folders["root"] / "one-process"
    run_cli(finetune_args(folders, one, "--max-steps", "4", "--gradient-accumulation-steps", "2", "-q"))

    report = json.loads((two / "dpvr_report.json").read_text())["finetune"]
    assert report["processes"] == 2
    assert report["gradient_accumulation_steps"] == 1
    converted, distributed, single = load_weights(folders["converted"]), load_weights(two), load_weights(one)
    assert any(not torch.equal(distributed[name], converted[name]) for name in converted)
    for name in converted:
        torch.testing.assert_close(distributed[name], single[name], atol=1e-6, rtol=0, msg=name)


def test_resume_after_kill_matches_uninterrupted(folders):
    # LoRA dropout draws random numbers every step, so this also checks that the RNG state resumes.
    settings = ("--max-steps", "40", "--save-steps", "4", "--batch-size", "2", "--gradient-accumulation-steps", "2",
                "--fusion", "lora", "--lora-dropout", "0.1", "--logging-steps", "5", "--seed", "3")
    reference = folders["root"] / "uninterrupted"
    run_cli(finetune_args(folders, reference, *settings, "-q"))

    output = folders["root"] / "killed"
    process = subprocess.Popen(
        [CLI, *finetune_args(folders, output, *settings)],
        env=environment(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    try:
        for line in process.stderr:
            if "Saved checkpoint" in line:
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not output.exists()
    checkpoints = sorted((folders["root"] / "killed-checkpoints").glob("checkpoint-*"))
    assert checkpoints

    resumed = run_cli(finetune_args(folders, output, *settings, "--resume"))
    assert "Resumed from" in resumed.stderr
    resumed_report = json.loads((output / "dpvr_report.json").read_text())["finetune"]
    reference_report = json.loads((reference / "dpvr_report.json").read_text())["finetune"]
    assert resumed_report["steps"] == 40
    assert resumed_report["losses"] == reference_report["losses"]

    expected, actual = load_weights(reference), load_weights(output)
    assert set(actual) == set(expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
