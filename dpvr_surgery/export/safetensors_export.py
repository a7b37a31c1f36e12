"""Rewrite a (fine-tuned) model folder as safetensors: cast the dtype, re-shard, merge a peft LoRA adapter.

Tensors are streamed one at a time from the source shards into new shards, so peak memory is about
one output shard. A LoRA adapter saved by peft (`adapter_config.json` and `adapter_model.safetensors`)
is merged while streaming. Each adapted weight `W` becomes `W + scaling * B @ A`, transposed for
`fan_in_fan_out`. The scaling is `alpha / r`, or `alpha / sqrt(r)` for rsLoRA, with `r` and `alpha`
resolved per module through `rank_pattern` and `alpha_pattern` as peft 0.21 resolves them. Weights
listed in `modules_to_save` replace the base weights. The sum is computed in fp32 and then cast.

The adapter folder may also contain `trained_weights.safetensors`, the fixed-name tensors that
`finetune --save-adapter` writes (side branch, projector or full fusion layers). They replace the
base tensors first, and the LoRA pairs are merged on top, as `load_finetuned` applies them.
"""

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

from ..checkpoint import CONFIG_NAME, find_weight_files, iter_tensors, list_tensor_names, read_config
from ..errors import InvalidInputError
from ..output import ShardedSafetensorsWriter, atomic_output_dir, copy_side_files, parse_size, peak_rss_bytes
from .folder_check import check_weight_keys, model_key

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINED_WEIGHTS = "trained_weights.safetensors"
ADAPTER_PREFIX = "base_model.model."
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONFIG_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>A|B)(?:\.[^.]+)?\.weight$")
MODULES_TO_SAVE_PART = re.compile(r"\.modules_to_save(\.[^.]+)?\.")
# peft options whose adapters are not a plain `W + scaling * B @ A` and that this merge rejects.
UNSUPPORTED_ADAPTER_OPTIONS = (
    "use_dora",
    "lora_bias",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
)


@dataclass
class SafetensorsExportRequest:
    """Settings of one `export safetensors` run."""

    folder: Path
    output: Path
    dtype: str = "auto"
    max_shard_size: str | int = "5GB"
    adapter: Path | None = None
    overwrite: bool = False


@dataclass
class AdapterWeights:
    """Trained weights to apply to a base folder, by current key: LoRA factors and whole replacement tensors."""

    path: Path
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    fan_in_fan_out: bool = False

    def targets(self) -> set[str]:
        return set(self.factors) | set(self.replacements)

    def apply(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Return the base tensor with the adapter applied (unchanged when the adapter does not touch it)."""
        if key in self.replacements:
            tensor = self.replacements[key].to(tensor.dtype)
        if key not in self.factors:
            return tensor
        lora_a, lora_b, scaling = self.factors[key]
        delta = lora_b.float() @ lora_a.float()
        if self.fan_in_fan_out:
            delta = delta.T
        return (tensor.float() + scaling * delta).to(tensor.dtype)


def export_safetensors(request: SafetensorsExportRequest) -> dict:
    """Write `request.folder` to `request.output` as safetensors, cast, re-sharded and with its adapter applied."""
    folder = Path(request.folder)
    config_dict = read_config(folder)
    if request.dtype not in DTYPES:
        raise InvalidInputError(f"Invalid dtype {request.dtype!r}: choose one of {', '.join(DTYPES)}.")
    max_shard_size = parse_size(request.max_shard_size)
    adapter_dir = request.adapter or (folder if _has_adapter(folder) else None)
    adapter = load_adapter(Path(adapter_dir)) if adapter_dir else None
    weight_files = find_weight_files(folder)
    if adapter:
        check_adapter_targets(adapter, list_tensor_names(weight_files), folder)

    target_dtype = DTYPES[request.dtype]
    inputs = [folder, adapter_dir]
    with atomic_output_dir(Path(request.output), overwrite=request.overwrite, inputs=inputs) as output:
        writer = ShardedSafetensorsWriter(output, max_shard_size)
        total_bytes = 0
        for name, tensor in iter_tensors(weight_files):
            key = model_key(name)
            if adapter and key is not None:
                tensor = adapter.apply(key, tensor)
            if target_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(target_dtype)
            total_bytes += tensor.numel() * tensor.element_size()
            writer.add(name, tensor)
            del tensor
        files = [path.name for path in writer.finish()]

        _write_config(config_dict, target_dtype, output)
        copied = _copy_folder_files(folder, output)
        keys = check_weight_keys(output)

    report = {
        "source": str(folder),
        "dtype": request.dtype,
        "max_shard_size": max_shard_size,
        "files": files,
        "total_bytes": total_bytes,
        "copied": copied,
        "tensors_checked": keys["tensors"],
        "adapter": _adapter_summary(adapter),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    logger.info("Wrote %s (%d weight files, %.2f GB)", request.output, len(files), total_bytes / 1e9)
    return report


def _has_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file() or (folder / TRAINED_WEIGHTS).is_file()


def load_adapter(path: Path) -> AdapterWeights:
    """Read an adapter folder: `trained_weights.safetensors`, a peft LoRA adapter, or both.

    Raises InvalidInputError when the folder has neither, or for LoRA variants that cannot be merged here.
    """
    if not _has_adapter(path):
        raise InvalidInputError(
            f"Invalid adapter folder {path}: neither {ADAPTER_CONFIG} (a peft LoRA adapter) nor {TRAINED_WEIGHTS} "
            "(from `finetune --save-adapter`) was found. Pass the folder that peft or finetune wrote."
        )
    adapter = AdapterWeights(path=path)
    if (path / TRAINED_WEIGHTS).is_file():
        adapter.replacements.update(load_file(str(path / TRAINED_WEIGHTS)))
    if (path / ADAPTER_CONFIG).is_file():
        _read_lora_adapter(path, adapter)
    logger.info(
        "Read adapter %s: %d LoRA module(s), %d replaced weight(s)",
        path,
        len(adapter.factors),
        len(adapter.replacements),
    )
    return adapter


def _read_lora_adapter(path: Path, adapter: AdapterWeights) -> None:
    config_path = path / ADAPTER_CONFIG
    weights_path = path / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise InvalidInputError(
            f"Invalid LoRA adapter folder {path}: {ADAPTER_WEIGHTS} not found next to {ADAPTER_CONFIG}. Pass the "
            "folder that peft's save_pretrained wrote."
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    _check_adapter_config(config, config_path)

    adapter.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(weights_path)).items():
        inner = name.removeprefix(ADAPTER_PREFIX)
        match = LORA_KEY.match(inner)
        if match:
            pairs.setdefault(match.group("module"), {})[match.group("factor")] = tensor
        elif ".lora_" in inner:
            raise InvalidInputError(
                f"Unsupported LoRA tensor {name} in {weights_path}: only LoRA on linear layers (lora_A and lora_B "
                "weights) can be merged. Merge this adapter with peft's merge_and_unload instead."
            )
        else:
            adapter.replacements[MODULES_TO_SAVE_PART.sub(".", inner)] = tensor

    for module, factors in pairs.items():
        if set(factors) != {"A", "B"} or factors["A"].dim() != 2:
            raise InvalidInputError(
                f"Invalid LoRA adapter {weights_path}: module {module} needs one 2D lora_A and one lora_B weight, "
                f"found {sorted(factors)}."
            )
        adapter.factors[f"{module}.weight"] = (factors["A"], factors["B"], _scaling(config, module, factors["A"]))


def check_adapter_targets(adapter: AdapterWeights, tensor_names: list[str], folder: Path) -> None:
    """Raise InvalidInputError when the adapter touches weights that the folder does not contain."""
    keys = {model_key(name) for name in tensor_names}
    missing = sorted(adapter.targets() - keys)
    if missing:
        raise InvalidInputError(
            f"The adapter {adapter.path} targets {len(missing)} weight(s) that {folder} does not contain: "
            f"{', '.join(missing[:5])}. Pass the adapter trained on this model."
        )


def _check_adapter_config(config: dict, config_path: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidInputError(
            f"Unsupported adapter {config_path}: peft_type {peft_type!r}; only LORA adapters can be merged."
        )
    enabled = [option for option in UNSUPPORTED_ADAPTER_OPTIONS if config.get(option)]
    if config.get("bias", "none") != "none":
        enabled.append(f"bias={config['bias']!r}")
    if enabled:
        raise InvalidInputError(
            f"Unsupported LoRA adapter {config_path}: {', '.join(enabled)} cannot be merged as W + scaling * B @ A. "
            "Merge it with peft's merge_and_unload, save the model, and export that folder."
        )


def _scaling(config: dict, module: str, lora_a: torch.Tensor) -> float:
    rank = lora_a.shape[0]
    alpha_patterns = config.get("alpha_pattern") or {}
    alpha = alpha_patterns.get(get_pattern_key(alpha_patterns.keys(), module), config["lora_alpha"])
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def _write_config(config_dict: dict, target_dtype: torch.dtype | None, output: Path) -> None:
    config = dict(config_dict)
    if target_dtype is not None:
        config["dtype"] = CONFIG_DTYPE_NAMES[target_dtype]
        config.pop("torch_dtype", None)
    (output / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _copy_folder_files(folder: Path, output: Path) -> list[str]:
    """Copy the side files, model code and model card; leave out the merged adapter's config."""
    copied = [name for name in copy_side_files(folder, output) if name != ADAPTER_CONFIG]
    (output / ADAPTER_CONFIG).unlink(missing_ok=True)
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.suffix == ".py" or path.name == "README.md"):
            shutil.copyfile(path, output / path.name)
            copied.append(path.name)
    return sorted(copied)


def _adapter_summary(adapter: AdapterWeights | None) -> dict | None:
    if adapter is None:
        return None
    return {
        "path": str(adapter.path),
        "merged_modules": sorted(key.removesuffix(".weight") for key in adapter.factors),
        "replaced_weights": sorted(adapter.replacements),
    }


__all__ = [
    "ADAPTER_CONFIG",
    "TRAINED_WEIGHTS",
    "AdapterWeights",
    "SafetensorsExportRequest",
    "check_adapter_targets",
    "export_safetensors",
    "load_adapter",
]
