"""Run a saturation analysis end to end: model and data in, report, split decision and plot out."""

import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from .. import __version__
from ..checkpoint import find_weight_files, read_config, resolve_model_path
from ..convert import check_source_config
from ..errors import InvalidInputError
from ..generation import resolve_device
from ..output import peak_rss_bytes
from ..plan import image_tokens_per_image
from .batches import encode_samples, make_batches
from .data import load_calibration_data
from .in_memory import measure_loaded_model
from .lenses import LensMeasurements
from .plots import plot_saturation
from .report import PLOT_FILE_NAME, SCHEMA_VERSION, layer_statistics, mean_curves, per_sample_values, write_report
from .rule import SplitDecision, SplitRule, choose_split
from .sequential import measure_sequential

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONFIG_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
# Loading in memory needs the weights plus room for activations and the process itself.
MEMORY_HEADROOM = 1.3


@dataclass
class AnalysisRequest:
    """Everything `run_analysis` needs; the CLI fills it from flags and the recipe."""

    model: str
    data: str | None = None
    image_folder: str | None = None
    prompts: list[str] | None = None
    num_calibration_samples: int = 16
    batch_size: int = 1
    max_seq_length: int = 2048
    shuffle: bool = True
    seed: int = 0
    logit_lens_tokens: int = 64
    sequential: bool | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    attn_implementation: str | None = None
    revision: str | None = None
    cache_dir: str | None = None
    rule: SplitRule = field(default_factory=SplitRule)
    command_line: str = field(default_factory=lambda: shlex.join(["dpvr-surgery", *sys.argv[1:]]))

    def validate(self) -> None:
        """Raise InvalidInputError for settings that cannot work, naming the flag."""
        for flag, value in (
            ("--batch-size", self.batch_size),
            ("--max-seq-length", self.max_seq_length),
            ("--logit-lens-tokens", self.logit_lens_tokens),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"Invalid {flag} {value!r}: it must be a positive integer.")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise InvalidInputError(f"Invalid dtype {self.dtype!r}: choose auto, {', '.join(DTYPES)}.")
        if self.attn_implementation is not None and self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise InvalidInputError(
                f"Invalid attention implementation {self.attn_implementation!r}: choose one of "
                f"{', '.join(ATTN_IMPLEMENTATIONS)}."
            )
        if self.sequential and self.device_map is not None:
            raise InvalidInputError(
                "--sequential and --device-map exclude each other: layer-by-layer analysis loads one layer on one "
                "device. Drop one of them."
            )


@dataclass
class AnalysisResult:
    """The JSON report, the per-sample measurements and the split decision of one analysis."""

    report: dict
    measurements: LensMeasurements
    decision: SplitDecision


def run_analysis(request: AnalysisRequest, *, show_progress: bool = True) -> AnalysisResult:
    """Measure the saturation lenses of a LLaVA model on calibration samples and choose the split."""
    started = time.monotonic()
    request.validate()
    path = resolve_model_path(request.model, revision=request.revision, cache_dir=request.cache_dir)
    config_dict = read_config(path)
    check_source_config(config_dict, path)
    config = LlavaConfig.from_dict(config_dict)
    num_layers = config.text_config.num_hidden_layers
    request.rule.validate(num_layers)

    processor = _load_processor(path)
    data = load_calibration_data(
        request.data,
        image_folder=request.image_folder,
        prompts=request.prompts,
        num_samples=request.num_calibration_samples,
        shuffle=request.shuffle,
        seed=request.seed,
    )
    batches, sample_ids = _prepare_batches(processor, config, data.samples, request)
    logger.info("Calibration: %d sample(s) from %s, %d batch(es)", len(sample_ids), data.source, len(batches))

    dtype = _resolve_dtype(request.dtype, config_dict)
    device = resolve_device(request.device)
    sequential = _use_sequential(request, path, dtype, device)
    torch.manual_seed(request.seed)
    if sequential:
        config._attn_implementation = request.attn_implementation or "sdpa"
        attn_implementation = config._attn_implementation
        measurements = measure_sequential(
            path, config, batches, sample_ids, dtype=dtype, device=device, show_progress=show_progress
        )
    else:
        model = _load_model(path, request, dtype, device)
        attn_implementation = model.config.text_config._attn_implementation
        measurements = measure_loaded_model(model, batches, sample_ids, show_progress=show_progress)
        del model

    layers = layer_statistics(measurements)
    decision = choose_split(mean_curves(layers), request.rule)
    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": "dpvr-surgery",
        "version": __version__,
        "command_line": request.command_line,
        "model": {
            "model": request.model,
            "path": str(path),
            "num_layers": num_layers,
            "image_tokens_per_image": image_tokens_per_image(config),
            "dtype": str(dtype).removeprefix("torch."),
            "attn_implementation": attn_implementation,
            "mode": "sequential" if sequential else "in_memory",
            "device": str(device) if request.device_map is None else f"device_map={request.device_map}",
        },
        "calibration": {
            **data.summary(),
            "sample_ids": sample_ids,
            "num_samples": len(sample_ids),
            "seed": request.seed,
            "shuffle": request.shuffle,
            "batch_size": request.batch_size,
            "max_seq_length": request.max_seq_length,
            "logit_lens_tokens": request.logit_lens_tokens,
        },
        "layers": layers,
        "split": decision.to_dict(),
        "samples": per_sample_values(measurements),
        "resources": {"seconds": round(time.monotonic() - started, 2), "peak_rss_bytes": peak_rss_bytes()},
    }
    return AnalysisResult(report, measurements, decision)


def write_outputs(result: AnalysisResult, folder: Path, *, title: str | None = None) -> dict[str, Path]:
    """Write the JSON report and the PNG plot into `folder`; return their paths by kind."""
    report_path = write_report(result.report, folder)
    plot_path = plot_saturation(result.report, Path(folder) / PLOT_FILE_NAME, title=title)
    return {"report": report_path, "plot": plot_path}


def _load_processor(path: Path):
    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise InvalidInputError(
            f"Cannot load the processor of {path}: {error}. The analysis tokenizes prompts and preprocesses images "
            "with the model's own processor: copy the tokenizer and processor files of the model into the folder."
        ) from error


def _prepare_batches(processor, config: LlavaConfig, samples, request: AnalysisRequest):
    image_token_id = config.image_token_id
    encoded = encode_samples(
        processor,
        samples,
        image_token_id=image_token_id,
        image_tokens_per_image=image_tokens_per_image(config),
        max_seq_length=request.max_seq_length,
    )
    pad_token_id = config.text_config.pad_token_id
    if pad_token_id is None or pad_token_id == image_token_id:
        pad_token_id = 0 if image_token_id != 0 else 1
    batches = make_batches(
        encoded,
        batch_size=request.batch_size,
        image_token_id=image_token_id,
        pad_token_id=pad_token_id,
        logit_lens_tokens=request.logit_lens_tokens,
    )
    return batches, [sample.sample_id for sample in encoded]


def _resolve_dtype(dtype: str, config_dict: dict) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    for source in (config_dict, config_dict.get("text_config") or {}):
        name = source.get("dtype") or source.get("torch_dtype")
        if name in CONFIG_DTYPES:
            return CONFIG_DTYPES[name]
    return torch.float32


def _use_sequential(request: AnalysisRequest, path: Path, dtype: torch.dtype, device: torch.device) -> bool:
    """Return the explicit choice, or whether the weights would not fit in the memory that is free now."""
    if request.sequential is not None:
        return request.sequential
    if request.device_map is not None:
        return False
    files = find_weight_files(path)
    stored_bytes = sum(file.stat().st_size for file in files.files)
    # Checkpoints are stored in 16 or 32 bits; scale the stored size to the dtype the analysis loads.
    needed = stored_bytes * torch.finfo(dtype).bits / _stored_bits(path)
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        available = psutil.virtual_memory().available
    if needed * MEMORY_HEADROOM <= available:
        return False
    logger.info(
        "The weights need about %.1f GB in %s and %.1f GB are free: analysing layer by layer",
        needed / 1e9,
        str(dtype).removeprefix("torch."),
        available / 1e9,
    )
    return True


def _stored_bits(path: Path) -> int:
    stored = _resolve_dtype("auto", read_config(path))
    return torch.finfo(stored).bits


def _load_model(path: Path, request: AnalysisRequest, dtype: torch.dtype, device: torch.device):
    options = {"dtype": dtype}
    if request.attn_implementation is not None:
        options["attn_implementation"] = request.attn_implementation
    if request.device_map is not None:
        options["device_map"] = request.device_map
    model = LlavaForConditionalGeneration.from_pretrained(path, **options).eval()
    if request.device_map is None:
        model = model.to(device)
    return model
