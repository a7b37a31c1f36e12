"""Measure the peak memory of a layer-by-layer `dpvr-surgery analyze --sequential` on a 7B-sized checkpoint.

The script writes a llava-hf checkpoint with the exact configuration of a preset (llava-1.5-7b by
default) and random fp16 weights, sharded, in the Hub's older key layout. Beside it go a small
word-level tokenizer (the real one cannot be downloaded here) and a CLIP image processor of the
preset's size, so every prompt still expands to the model's 576 image tokens. The script then runs
the analysis in a child process on built-in photos. It reports the child's peak resident memory
(VmHWM, and the peaks of its anonymous and file-backed parts, sampled every 50 ms from /proc) next to
the size of one decoder layer in the analysis dtype. Linux only.

    python examples/bench_analysis_memory.py --workdir /tmp/analysis-memory

llava-1.5-7b needs about 14 GB of free disk; the checkpoint is deleted at the end unless --keep is
given. The weights are random, so the curves and the chosen split mean nothing; only memory and
time are measured.
"""

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from dpvr_surgery.analysis.data import GENERIC_QUESTIONS
from dpvr_surgery.output import ShardedSafetensorsWriter, parse_size
from dpvr_surgery.plan import PRESET_NAMES, load_preset

# LLaVA-1.5's prompt format: "USER: <image>\n{question} ASSISTANT:".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}USER: {% else %} ASSISTANT: {% endif -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<image> {% else -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%} ASSISTANT:{%- endif -%}"
)


def hub_key(key: str) -> str:
    """Return the older llava-hf key of a current `transformers` key, as checkpoints on the Hub use."""
    if key.startswith("lm_head."):
        return "language_model." + key
    for current, older in (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if key.startswith(current):
            return older + key.removeprefix(current)
    raise ValueError(f"Unexpected key {key}")


def write_checkpoint(folder: Path, config_dict: dict, shard_size: str) -> int:
    """Write random fp16 weights with the config's exact shapes; return the bytes written."""
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
        if tensor.dim() > 1:
            tensor.normal_(0.0, 0.02, generator=generator)
        elif name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            tensor.zero_()
        writer.add(hub_key(name), tensor)
        total += tensor.numel() * tensor.element_size()
        del tensor
    writer.finish()
    return total


def write_processor(folder: Path, config_dict: dict) -> None:
    """Save a word-level tokenizer over the built-in questions and the preset's CLIP image processor."""
    image_token_id = config_dict["image_token_index"]
    pad_token_id = config_dict.get("pad_token_id", image_token_id + 1)
    words = sorted({word for question in GENERIC_QUESTIONS for word in question.split()} | {"USER:", "ASSISTANT:"})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": image_token_id, "<pad>": pad_token_id}
    vocab.update({word: index for index, word in enumerate(words, start=3)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})

    vision = config_dict["vision_config"]
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": vision["image_size"]},
        crop_size={"height": vision["image_size"], "width": vision["image_size"]},
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision["patch_size"],
        vision_feature_select_strategy=config_dict.get("vision_feature_select_strategy", "default"),
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    ).save_pretrained(folder)


def read_memory(pid: int) -> dict[str, int]:
    """Return VmHWM, VmRSS, RssAnon and RssFile of a process in bytes, from /proc (Linux)."""
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def analyze_in_child(source: Path, output: Path, num_samples: int, dtype: str) -> tuple[float, dict, dict]:
    """Run `analyze --sequential` in a child process, sampling its memory every 50 ms.

    Returns the wall time, the peaks of the sampled values and the report. VmHWM is the child's own
    peak RSS: ru_maxrss is not used, because a child started with vfork inherits the high-water mark
    of its parent's memory.
    """
    command = [
        sys.executable, "-m", "dpvr_surgery", "analyze", str(source), "--sequential", "--device", "cpu",
        "--num-calibration-samples", str(num_samples), "--dtype", dtype, "-o", str(output), "--json", "-q",
    ]
    started = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as stdout:
        child = subprocess.Popen(command, stdout=stdout, text=True)
        peaks: dict[str, int] = {}
        while child.poll() is None:
            try:
                sample = read_memory(child.pid)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                break
            for key, value in sample.items():
                peaks[key] = max(peaks.get(key, 0), value)
            time.sleep(0.05)
        if child.wait() != 0:
            raise SystemExit(f"The analysis failed with exit code {child.returncode}: {shlex.join(command)}")
        stdout.seek(0)
        report = json.load(stdout)
    return time.monotonic() - started, peaks, report


def layer_bytes(config_dict: dict, dtype: str) -> int:
    """Return the bytes of one language-model decoder layer in the analysis dtype."""
    config = LlavaConfig.from_dict(config_dict)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    parameters = sum(parameter.numel() for parameter in model.model.language_model.layers[0].parameters())
    return parameters * {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="Folder for the checkpoint and the report.")
    parser.add_argument("--shape", choices=PRESET_NAMES, default="llava-1.5-7b")
    parser.add_argument("--num-samples", type=int, default=2, help="Calibration samples (built-in photos).")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="Dtype the analysis computes in."
    )
    parser.add_argument("--shard-size", default="5GB", help="Shard size of the written checkpoint.")
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoint afterwards.")
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    config_dict = load_preset(args.shape)
    source = args.workdir / "source"
    if args.write_only:
        write_checkpoint(source, config_dict, args.shard_size)
        write_processor(source, config_dict)
        return
    if source.exists():
        raise SystemExit(f"{source} exists: remove it or pass another --workdir.")
    args.workdir.mkdir(parents=True, exist_ok=True)
    needed = 7.2e9 * 2 if args.shape == "llava-1.5-7b" else 13.4e9 * 2
    free = shutil.disk_usage(args.workdir).free
    if free < needed * 1.1:
        raise SystemExit(f"Not enough disk in {args.workdir}: {free / 1e9:.1f} GB free, about {needed / 1e9:.1f} GB needed.")

    try:
        # A child process writes the checkpoint, so that the memory of the writer stays out of this
        # process and of the analysis started from it.
        started = time.monotonic()
        write_command = [sys.executable, __file__, "--write-only", "--workdir", str(args.workdir),
                         "--shape", args.shape, "--shard-size", args.shard_size]
        subprocess.run(write_command, check=True)
        write_seconds = time.monotonic() - started
        checkpoint_bytes = sum(path.stat().st_size for path in source.glob("*.safetensors"))
        seconds, peaks, report = analyze_in_child(source, args.workdir / "analysis", args.num_samples, args.dtype)
    finally:
        if not args.keep:
            shutil.rmtree(source, ignore_errors=True)

    one_layer = layer_bytes(config_dict, args.dtype)
    peak = peaks["VmHWM"]
    result = {
        "shape": args.shape,
        "checkpoint_bytes": checkpoint_bytes,
        "write_seconds": round(write_seconds, 1),
        "analysis_dtype": args.dtype,
        "num_samples": report["calibration"]["num_samples"],
        "sample_ids": report["calibration"]["sample_ids"],
        "analysis_seconds": round(seconds, 1),
        "peak_rss_bytes": peak,
        "peak_anonymous_bytes": peaks.get("RssAnon"),
        "peak_file_backed_bytes": peaks.get("RssFile"),
        "one_layer_bytes": one_layer,
        "goal_bytes": 4 * 1024**3 + one_layer,
        "within_goal": peak <= 4 * 1024**3 + one_layer,
        "machine": {
            "platform": platform.platform(),
            "cpus": psutil.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total,
            "torch": torch.__version__,
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
