"""Stream a LLaVA checkpoint into a dual-path (DPVR-LF) model folder.

Tensors are read one at a time from the source shards, renamed to the current `transformers` keys
and cast if requested. They are written to new shards as these fill up, and each side-branch copy is
written next to the layer it copies. Peak memory is about one output shard plus the tensor being read (plus the side
branch for random initialisation).
"""

import json
import logging
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlavaConfig

from . import __version__
from .checkpoint import (
    check_keys,
    find_weight_files,
    iter_tensors,
    list_tensor_names,
    normalize_llava_key,
    read_config,
    resolve_model_path,
)
from .errors import InvalidInputError
from .model_card import render_model_card
from .modeling import DpvrLlavaConfig, DpvrLlavaForConditionalGeneration
from .output import ShardedSafetensorsWriter, atomic_output_dir, copy_side_files, parse_size, peak_rss_bytes
from .plan import PlanSettings, plan_report
from .recipe import write_recipe
from .surgery import (
    SIDE_BRANCH_PREFIX,
    build_dpvr_config,
    random_side_branch_state,
    side_branch_keys_for,
    side_branch_source_layers,
)
from .verify import verify_conversion

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llava",)
MODEL_CODE_FILES = ("configuration_dpvr_llava.py", "modeling_dpvr_llava.py")
REPORT_FILE_NAME = "dpvr_report.json"
SATURATION_PLOT_NAME = "saturation.png"
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ConvertRequest:
    """Everything `convert_checkpoint` needs; the CLI fills it from flags and the recipe."""

    model: str
    output: Path
    settings: PlanSettings
    dtype: str = "auto"
    max_shard_size: str | int = "5GB"
    overwrite: bool = False
    revision: str | None = None
    cache_dir: str | None = None
    verify: bool = True
    seed: int = 0
    saturation: dict | None = None
    # PNG of the saturation curves, copied into the output folder and shown in the model card.
    saturation_plot: Path | None = None
    command_line: str = field(default_factory=lambda: shlex.join(["dpvr-surgery", *sys.argv[1:]]))


@dataclass
class ConversionPlan:
    """The source, configs and tensor names of a conversion, checked before any output exists."""

    source: Path
    source_config: LlavaConfig
    config: DpvrLlavaConfig
    tensor_names: list[str]
    report: dict

    def summary(self) -> dict:
        """Describe the plan as JSON-serialisable data for `--dry-run`."""
        return {
            "source": str(self.source),
            "source_tensors": len(self.tensor_names),
            "plan": self.report["plan"],
            "parameters": self.report["parameters"],
        }


def check_source_config(config_dict: dict, source: Path) -> None:
    """Raise InvalidInputError unless the folder contains a LLaVA model that this tool converts."""
    model_type = config_dict.get("model_type")
    if model_type == DpvrLlavaConfig.model_type:
        raise InvalidInputError(
            f"{source} is already a converted dual-path model (model_type {model_type!r}). Convert the original "
            "LLaVA checkpoint instead."
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidInputError(
            f"{source} is not a LLaVA model: its config.json has model_type {model_type!r}, and convert supports "
            f"{', '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)} (a vision tower, a projector and a decoder-only "
            "language model in llava-hf format)."
        )


def plan_conversion(request: ConvertRequest) -> ConversionPlan:
    """Resolve the source, validate config, settings and weight keys; write nothing."""
    source = resolve_model_path(request.model, revision=request.revision, cache_dir=request.cache_dir)
    config_dict = read_config(source)
    check_source_config(config_dict, source)
    source_config = LlavaConfig.from_dict(config_dict)
    request.settings.validate(source_config.text_config.num_hidden_layers)
    if request.dtype not in DTYPES:
        raise InvalidInputError(f"Invalid dtype {request.dtype!r}: choose one of {', '.join(DTYPES)}.")
    parse_size(request.max_shard_size)

    config = build_dpvr_config(
        config_dict,
        split_layer=request.settings.split_layer,
        side_branch_depth=request.settings.side_branch_depth,
        num_fusion_layers=request.settings.num_fusion_layers,
        side_branch_init=request.settings.side_branch_init,
        saturation=request.saturation,
    )
    try:
        with torch.device("meta"):
            expected_model = DpvrLlavaForConditionalGeneration(config)
    except ValueError as error:
        raise InvalidInputError(f"Cannot convert {source}: {error}") from error
    expected = {key for key in expected_model.state_dict() if not key.startswith(SIDE_BRANCH_PREFIX)}
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")

    names = list_tensor_names(find_weight_files(source))
    found = {normalized for name in names if (normalized := normalize_llava_key(name)) is not None}
    if config.tie_word_embeddings:
        found.discard("lm_head.weight")
    check_keys(found, expected, source=str(source))

    report = plan_report(source_config, request.settings)
    return ConversionPlan(source, source_config, config, names, report)


def convert_checkpoint(request: ConvertRequest, *, show_progress: bool = True) -> dict:
    """Convert a LLaVA checkpoint into a dual-path folder at `request.output`; return the report written there."""
    started = time.monotonic()
    plan = plan_conversion(request)
    output = Path(request.output)
    with atomic_output_dir(output, overwrite=request.overwrite, inputs=[plan.source]) as folder:
        written = _write_weights(plan, request, folder, show_progress=show_progress)
        _write_config(plan.config, request.dtype, folder)
        _write_model_code(folder)
        copied = copy_side_files(plan.source, folder)
        write_recipe(folder, {"convert": recipe_section(request)})

        verification = None
        if request.verify:
            verification = verify_conversion(plan.source, folder, dtype=DTYPES[request.dtype])
        report = _build_report(plan, request, written, copied, verification, time.monotonic() - started)
        (folder / REPORT_FILE_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        plot_name = None
        if request.saturation_plot is not None:
            plot_name = SATURATION_PLOT_NAME
            shutil.copyfile(request.saturation_plot, folder / plot_name)
        card = render_model_card(
            # A local source is recorded by its absolute path, which `push` rejects until it is a Hub id.
            base_model=str(plan.source) if Path(request.model).exists() else request.model,
            report=plan.report,
            command_line=request.command_line,
            verification=verification,
            saturation_plot=plot_name,
        )
        (folder / "README.md").write_text(card, encoding="utf-8")
    logger.info("Wrote %s in %.1f s (peak RSS %.2f GB)", output, time.monotonic() - started, peak_rss_bytes() / 1e9)
    return report


def recipe_section(request: ConvertRequest) -> dict:
    """Return the resolved convert settings under the names that recipes and flags use."""
    settings = request.settings
    return {
        "split": settings.split_layer,
        "side_branch_depth": settings.side_branch_depth,
        "fusion_layers": settings.num_fusion_layers,
        "side_init": settings.side_branch_init,
        "dtype": request.dtype,
        "max_shard_size": request.max_shard_size,
        "seed": request.seed,
    }


def _write_weights(plan: ConversionPlan, request: ConvertRequest, folder: Path, *, show_progress: bool) -> list[str]:
    config = plan.config
    target_dtype = DTYPES[request.dtype]
    writer = ShardedSafetensorsWriter(folder, parse_size(request.max_shard_size))
    source_layers = side_branch_source_layers(config)

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        if target_dtype is not None and tensor.is_floating_point():
            return tensor.to(target_dtype)
        return tensor

    progress = tqdm(
        total=len(plan.tensor_names), desc="Converting", unit="tensor", disable=not show_progress, leave=False
    )
    with progress:
        for name, tensor in iter_tensors(find_weight_files(plan.source)):
            progress.update()
            key = normalize_llava_key(name)
            if key is None or (config.tie_word_embeddings and key == "lm_head.weight"):
                continue
            tensor = cast(tensor)
            writer.add(key, tensor)
            for side_key in side_branch_keys_for(key, source_layers):
                writer.add(side_key, tensor.clone())
            del tensor

    if source_layers is None:
        for key, tensor in random_side_branch_state(config, seed=request.seed).items():
            writer.add(key, cast(tensor))
    return [path.name for path in writer.finish()]


def _write_config(config: DpvrLlavaConfig, dtype: str, folder: Path) -> None:
    if DTYPES[dtype] is not None:
        config.dtype = DTYPES[dtype]
    config.save_pretrained(folder)


def _write_model_code(folder: Path) -> None:
    package = resources.files("dpvr_surgery.modeling")
    for name in MODEL_CODE_FILES:
        with resources.as_file(package.joinpath(name)) as path:
            shutil.copyfile(path, folder / name)


def _build_report(plan, request, written, copied, verification, seconds) -> dict:
    return {
        "tool": "dpvr-surgery",
        "version": __version__,
        "command_line": request.command_line,
        "source": {"model": request.model, "path": str(plan.source), "revision": request.revision},
        "settings": recipe_section(request),
        "plan": plan.report,
        "saturation": request.saturation,
        "verification": verification,
        "files": {"weights": written, "copied_from_source": copied},
        "resources": {"seconds": round(seconds, 2), "peak_rss_bytes": peak_rss_bytes()},
        "environment": _environment(),
    }


def _environment() -> dict:
    packages = {}
    for name in ("torch", "transformers", "safetensors", "huggingface_hub"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": packages}


__all__ = ["ConvertRequest", "ConversionPlan", "convert_checkpoint", "plan_conversion", "check_source_config"]
