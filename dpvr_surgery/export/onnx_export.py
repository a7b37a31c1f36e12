"""Export a converted dual-path model to three ONNX graphs with `torch.onnx` (the dynamo exporter).

Output layout, as optimum and transformers.js lay out vision-language models:

    DIR/onnx/vision_encoder.onnx         pixel_values -> image_features
    DIR/onnx/embed_tokens.onnx           input_ids -> inputs_embeds
    DIR/onnx/decoder_model_merged.onnx   routed decoder with past/present key values (prefill and decode)
    DIR/config.json, tokenizer, processor, chat template and generation config of the model
    DIR/dpvr_onnx_report.json            what was exported and the validation result

A graph whose weights exceed 2 GiB (the protobuf limit) keeps them in `<graph>.onnx_data` beside it.
"""

import json
import logging
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx_ir
import torch
from optimum.exporters.base import ExporterConfig

from .. import __version__
from ..checkpoint import CONFIG_NAME, read_config, resolve_model_path
from ..errors import InvalidInputError
from ..modeling import DpvrLlavaConfig, DpvrLlavaForConditionalGeneration
from ..output import atomic_output_dir, copy_side_files, peak_rss_bytes
from .onnx_config import (
    DECODER_ROUTING_INPUTS,
    PAST_AXES,
    EmbedTokensExporterConfig,
    RoutedDecoderExporterConfig,
    VisionEncoderExporterConfig,
)
from .onnx_graphs import EmbedTokensGraph, RoutedDecoderGraph, VisionEncoderGraph

logger = logging.getLogger(__name__)

ONNX_SUBFOLDER = "onnx"
VISION_ENCODER_FILE = "vision_encoder.onnx"
EMBED_TOKENS_FILE = "embed_tokens.onnx"
DECODER_FILE = "decoder_model_merged.onnx"
REPORT_FILE = "dpvr_onnx_report.json"
# Protobuf files cannot exceed 2 GiB, so larger graphs keep their weights in an external data file.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3
# The dynamo exporter of torch 2.13 emits opset 18 and newer.
MIN_OPSET = 18
DEFAULT_OPSET = 18
ONNX_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
OPTIMUM_DTYPE_NAMES = {"fp32": "fp32", "fp16": "fp16"}
# Room for graph metadata and the temporary copy that onnx_ir writes before renaming.
DISK_MARGIN = 1.15


@dataclass
class OnnxExportRequest:
    """Settings of one `export onnx` run; the CLI fills it from flags and the recipe."""

    model: str
    output: Path
    opset: int = DEFAULT_OPSET
    dtype: str = "fp32"
    validate: bool = True
    atol: float | None = None
    allow_mismatch: bool = False
    overwrite: bool = False
    revision: str | None = None
    cache_dir: str | None = None
    seed: int = 0
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD


def export_onnx(request: OnnxExportRequest) -> dict:
    """Export the converted model `request.model` to `request.output`; return the report written there.

    With `request.validate`, onnxruntime is compared with PyTorch before the folder is moved into
    place, and a difference above the tolerance raises VerificationError and leaves nothing behind
    unless `request.allow_mismatch` is set.
    """
    started = time.monotonic()
    source = resolve_model_path(request.model, revision=request.revision, cache_dir=request.cache_dir)
    check_converted_config(read_config(source), source)
    check_export_settings(request.opset, request.dtype)
    model = load_model_for_export(source, request.dtype)
    check_free_disk(Path(request.output), estimate_onnx_bytes(model))

    with atomic_output_dir(Path(request.output), overwrite=request.overwrite, inputs=[source]) as folder:
        graphs = export_graphs(
            model,
            folder / ONNX_SUBFOLDER,
            opset=request.opset,
            dtype=request.dtype,
            seed=request.seed,
            external_data_threshold=request.external_data_threshold,
        )
        shutil.copyfile(source / CONFIG_NAME, folder / CONFIG_NAME)
        copied = copy_side_files(source, folder)

        validation = None
        if request.validate:
            from .validate import validate_onnx_export

            validation = validate_onnx_export(
                model, folder, atol=request.atol, allow_mismatch=request.allow_mismatch, seed=request.seed
            )
        report = {
            "tool": "dpvr-surgery",
            "version": __version__,
            "source": str(source),
            "settings": {"opset": request.opset, "dtype": request.dtype, "exporter": "torch.onnx dynamo"},
            "graphs": graphs,
            "copied_from_source": [CONFIG_NAME, *copied],
            "validation": validation,
            "resources": {"seconds": round(time.monotonic() - started, 2), "peak_rss_bytes": peak_rss_bytes()},
        }
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    logger.info("Wrote %s in %.1f s", request.output, time.monotonic() - started)
    return report


def check_converted_config(config_dict: dict, source: Path) -> None:
    """Raise InvalidInputError unless `source` contains a converted dual-path model."""
    model_type = config_dict.get("model_type")
    if model_type != DpvrLlavaConfig.model_type:
        raise InvalidInputError(
            f"{source} is not a converted dual-path model: its config.json has model_type {model_type!r}, expected "
            f"{DpvrLlavaConfig.model_type!r}. Run `dpvr-surgery convert` first and export its output folder."
        )


def check_export_settings(opset: int, dtype: str) -> None:
    """Raise InvalidInputError for an opset or dtype that the export does not support."""
    if opset < MIN_OPSET:
        raise InvalidInputError(
            f"Invalid opset {opset}: the torch.onnx dynamo exporter writes opset {MIN_OPSET} or newer. Pass "
            f"--opset {DEFAULT_OPSET} or higher."
        )
    if dtype not in ONNX_DTYPES:
        raise InvalidInputError(
            f"Invalid ONNX dtype {dtype!r}: choose one of {', '.join(ONNX_DTYPES)}. bf16 is not offered because "
            "onnxruntime's CPU kernels do not cover it."
        )


def load_model_for_export(source: Path, dtype: str) -> DpvrLlavaForConditionalGeneration:
    """Load the converted model with eager attention, in eval mode, on the CPU."""
    model = DpvrLlavaForConditionalGeneration.from_pretrained(
        source, dtype=ONNX_DTYPES[dtype], attn_implementation="eager"
    )
    return model.eval()


def estimate_onnx_bytes(model: DpvrLlavaForConditionalGeneration) -> int:
    """Estimate the bytes of the three graphs: every weight once, plus the embedding twice when it is tied."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if parameter.data_ptr() in seen:
            continue
        seen.add(parameter.data_ptr())
        total += parameter.numel() * parameter.element_size()
    embedding = model.get_input_embeddings().weight
    if model.lm_head.weight.data_ptr() == embedding.data_ptr():
        total += embedding.numel() * embedding.element_size()
    return total


def check_free_disk(output: Path, needed: int) -> None:
    """Raise InvalidInputError when the file system of `output` has less free space than the graphs need."""
    existing = output
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    required = int(needed * DISK_MARGIN)
    if free < required:
        raise InvalidInputError(
            f"Not enough free disk space for the ONNX export: about {required / 1e9:.2f} GB needed, "
            f"{free / 1e9:.2f} GB free on the file system of {existing}. Free some space or choose another "
            "output folder."
        )


def export_graphs(
    model: DpvrLlavaForConditionalGeneration,
    onnx_dir: Path,
    *,
    opset: int = DEFAULT_OPSET,
    dtype: str = "fp32",
    seed: int = 0,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> dict[str, dict]:
    """Export the vision encoder, the token embedding and the routed decoder into `onnx_dir`; describe each file."""
    onnx_dir.mkdir(parents=True, exist_ok=True)
    float_dtype = OPTIMUM_DTYPE_NAMES[dtype]
    config = model.config
    vision_config = VisionEncoderExporterConfig(config.vision_config, "feature-extraction", float_dtype=float_dtype)
    embed_config = EmbedTokensExporterConfig(config.text_config, "feature-extraction", float_dtype=float_dtype)
    jobs = [
        (VISION_ENCODER_FILE, VisionEncoderGraph(model), vision_config),
        (EMBED_TOKENS_FILE, EmbedTokensGraph(model), embed_config),
        (DECODER_FILE, RoutedDecoderGraph(model), RoutedDecoderExporterConfig(config, float_dtype=float_dtype)),
    ]
    described = {}
    for file_name, graph, exporter_config in jobs:
        logger.info("Exporting %s", file_name)
        torch.manual_seed(seed)
        started = time.monotonic()
        described[file_name] = export_graph(
            graph, exporter_config, onnx_dir / file_name, opset=opset, external_data_threshold=external_data_threshold
        )
        described[file_name]["seconds"] = round(time.monotonic() - started, 2)
    return described


def export_graph(
    graph: torch.nn.Module,
    exporter_config: ExporterConfig,
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> dict:
    """Trace `graph` on the exporter config's dummy inputs with the dynamo exporter and save it to `path`."""
    samples = exporter_config.generate_dummy_inputs(framework="pt")
    args, dynamic_shapes = _export_arguments(exporter_config.inputs, samples)
    input_names = list(exporter_config.inputs)
    output_names = list(exporter_config.outputs)

    with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter_registry():
        # The exporter warns once per axis that two inputs share (the names are set below anyway),
        # and torch 2.13's pytree code warns about its own deprecated LeafSpec check.
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(
            graph.eval(),
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    _name_axes(program.model.graph.inputs, exporter_config.inputs)
    _name_axes(program.model.graph.outputs, exporter_config.outputs)

    initializers = program.model.graph.initializers.values()
    weight_bytes = sum(value.const_value.nbytes for value in initializers if value.const_value is not None)
    external_data = None
    if weight_bytes > external_data_threshold:
        external_data = f"{path.name}_data"
    onnx_ir.save(program.model, path, external_data=external_data)

    files = [path.name] + ([external_data] if external_data else [])
    return {"files": files, "weight_bytes": int(weight_bytes), "inputs": input_names, "outputs": output_names}


@contextmanager
def _quiet_exporter_registry():
    """Hide the exporter's warnings about torchvision operators, which these graphs never use."""
    registry_logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_logger.level
    registry_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        registry_logger.setLevel(level)


def _export_arguments(axes: dict[str, dict[int, str]], samples: dict) -> tuple[tuple, tuple]:
    """Positional sample arguments and `torch.export` dynamic shapes, with one `Dim` per axis name.

    The decoder's past keys and values travel as one list argument after the routing inputs.
    Axes named as a sum ("past_sequence_length + sequence_length") are left to `torch.export` to
    infer (`Dim.AUTO`), because a derived `Dim` cannot be the sum of two others.
    """
    dims: dict[str, torch.export.Dim] = {}

    def dim_for(name: str):
        if "+" in name:
            return torch.export.Dim.AUTO
        if name not in dims:
            dims[name] = torch.export.Dim(name.replace(" ", "_"), min=0 if name in PAST_AXES else 1)
        return dims[name]

    def shapes_of(name: str) -> dict:
        return {axis: dim_for(axis_name) for axis, axis_name in axes[name].items()}

    plain = [name for name in axes if not name.startswith("past_key_values.")]
    past = [name for name in axes if name.startswith("past_key_values.")]
    if not past:
        return tuple(samples[name] for name in plain), tuple(shapes_of(name) for name in plain)
    if plain != list(DECODER_ROUTING_INPUTS):
        raise ValueError(f"Unexpected decoder inputs {plain}; the graph takes {list(DECODER_ROUTING_INPUTS)}.")
    args = (*[samples[name] for name in plain], [samples[name] for name in past])
    shapes = (*[shapes_of(name) for name in plain], [shapes_of(name) for name in past])
    return args, shapes


def _name_axes(values, axes: dict[str, dict[int, str]]) -> None:
    """Give the dynamic axes of graph inputs or outputs the names of the exporter config."""
    for value in values:
        if value.name not in axes or value.shape is None:
            continue
        dims = list(value.shape.dims)
        for axis, name in axes[value.name].items():
            dims[axis] = onnx_ir.SymbolicDim(name)
        value.shape = onnx_ir.Shape(dims)


__all__ = [
    "DECODER_FILE",
    "DEFAULT_OPSET",
    "EMBED_TOKENS_FILE",
    "EXTERNAL_DATA_THRESHOLD",
    "ONNX_DTYPES",
    "ONNX_SUBFOLDER",
    "REPORT_FILE",
    "VISION_ENCODER_FILE",
    "OnnxExportRequest",
    "check_free_disk",
    "estimate_onnx_bytes",
    "export_graph",
    "export_graphs",
    "export_onnx",
    "load_model_for_export",
]
