"""Measure the peak memory of `dpvr-surgery convert` on a multi-GB checkpoint that this script writes.

The source is a llava-hf checkpoint with the exact configuration of a preset (llava-1.5-7b by
default) and random fp16 weights, in the older llava-hf key layout, sharded like the Hub's. The
conversion runs in a child process, whose peak resident memory (ru_maxrss) is reported next to the
sizes of the largest source shard, the output shard limit and the side branch.

    python examples/bench_convert_memory.py --workdir /tmp/convert-memory

It needs about 2 x 14 GB of free disk for llava-1.5-7b and deletes both folders at the end unless
--keep is given. The logit check (--verify) is off, because it loads the whole model.
"""

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from dpvr_surgery.output import ShardedSafetensorsWriter, parse_size
from dpvr_surgery.plan import PRESET_NAMES, load_preset


def legacy_key(key: str) -> str:
    """The key names of llava-hf checkpoints on the Hub (transformers 4.x)."""
    if key.startswith("lm_head."):
        return "language_model." + key
    key = key.replace("model.language_model.", "language_model.model.", 1)
    key = key.replace("model.vision_tower.", "vision_tower.vision_model.", 1)
    return key.replace("model.multi_modal_projector.", "multi_modal_projector.", 1)


def write_source(folder: Path, preset: str, shard_size: str) -> int:
    """Write a random fp16 checkpoint with the preset's exact shapes; return its size in bytes."""
    config_dict = load_preset(preset)
    config = LlavaConfig.from_dict(config_dict)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2))

    writer = ShardedSafetensorsWriter(folder, parse_size(shard_size))
    generator = torch.Generator().manual_seed(0)
    total = 0
    for name, parameter in model.state_dict().items():
        tensor = torch.empty(parameter.shape, dtype=torch.float16)
        tensor.normal_(0.0, 0.02, generator=generator) if tensor.dim() > 1 else tensor.fill_(1.0)
        writer.add(legacy_key(name), tensor)
        total += tensor.numel() * tensor.element_size()
    writer.finish()
    return total


def read_status_mib(pid: int) -> dict[str, int]:
    """Anonymous, file-backed and total resident memory of a process, in MiB, from /proc."""
    values = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                values[key] = int(rest.split()[0]) // 1024
    return values


def convert_in_child(
    source: Path, output: Path, split: int, max_shard_size: str, dtype: str
) -> tuple[float, dict[str, int]]:
    """Run the converter in a child process, sampling its memory every 50 ms; return wall time and peaks.

    The peaks separate anonymous memory (what the converter allocates) from file-backed pages
    (safetensors memory-maps the source shards, and the kernel reclaims those clean pages under
    memory pressure). `ru_maxrss`, the usual "peak RSS", counts both.
    """
    command = [
        sys.executable, "-m", "dpvr_surgery", "convert", str(source), "-o", str(output),
        "--split", str(split), "--max-shard-size", max_shard_size, "--dtype", dtype, "--no-verify", "-q",
    ]
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    started = time.monotonic()
    child = subprocess.Popen(command)
    while child.poll() is None:
        try:
            for key, value in read_status_mib(child.pid).items():
                peaks[key] = max(peaks[key], value)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.05)
    if child.wait() != 0:
        sys.exit(f"convert failed with exit code {child.returncode}")
    seconds = time.monotonic() - started
    peaks["ru_maxrss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    return seconds, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="Folder for the source and converted checkpoints.")
    parser.add_argument("--shape", choices=PRESET_NAMES, default="llava-1.5-7b")
    parser.add_argument("--split", type=int, default=18)
    parser.add_argument("--source-shard-size", default="5GB", help="Shard size of the written source checkpoint.")
    parser.add_argument("--max-shard-size", default="2GB", help="Shard size of the converted output.")
    parser.add_argument("--dtype", default="auto", help="Output dtype (auto keeps fp16; bf16 casts every tensor).")
    parser.add_argument("--keep", action="store_true", help="Keep both checkpoints.")
    parser.add_argument("--reuse-source", action="store_true", help="Convert the source a --keep run left behind.")
    args = parser.parse_args()

    source = args.workdir / "source"
    output = args.workdir / "converted"
    args.workdir.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in LlavaForConditionalGeneration(LlavaConfig.from_dict(load_preset(args.shape))).parameters())
    copies = 1 if args.reuse_source else 2
    needed = int(copies * parameters * 2 * 1.1)
    free = shutil.disk_usage(args.workdir).free
    if free < needed:
        sys.exit(f"Not enough free disk in {args.workdir}: {needed / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free.")
    if args.reuse_source:
        source_bytes = sum(path.stat().st_size for path in source.glob("*.safetensors"))
        write_seconds = 0.0
    else:
        print(f"Writing a random {args.shape} checkpoint to {source} ...", flush=True)
        started = time.monotonic()
        source_bytes = write_source(source, args.shape, args.source_shard_size)
        write_seconds = time.monotonic() - started
    if output.exists():
        shutil.rmtree(output)
    largest_source_shard = max(path.stat().st_size for path in source.glob("*.safetensors"))

    print("Converting in a child process ...", flush=True)
    seconds, peaks = convert_in_child(source, output, args.split, args.max_shard_size, args.dtype)
    report = json.loads((output / "dpvr_report.json").read_text())
    side_branch_bytes = report["plan"]["parameters"]["side_branch"] * 2  # fp16 and bf16: 2 bytes each
    result = {
        "shape": args.shape,
        "split": args.split,
        "source_bytes": source_bytes,
        "largest_source_shard_bytes": largest_source_shard,
        "output_dtype": args.dtype,
        "output_max_shard_size": args.max_shard_size,
        "output_max_shard_bytes": parse_size(args.max_shard_size),
        "side_branch_bytes": side_branch_bytes,
        "convert_seconds": round(seconds, 1),
        "write_source_seconds": round(write_seconds, 1),
        "peak_anonymous_mib": peaks["RssAnon"],
        "peak_file_backed_mib": peaks["RssFile"],
        "peak_rss_mib": peaks["VmRSS"],
        "ru_maxrss_mib": peaks["ru_maxrss"],
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(source)
        shutil.rmtree(output)


if __name__ == "__main__":
    main()
