"""Choose which parameters of a dual-path model train: the side branch by default, optionally the fusion
layers (LoRA through peft, or in full) and the projector. Also merges LoRA weights into a state dict.
"""

import logging
import re
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from ..errors import InvalidInputError

logger = logging.getLogger(__name__)

FUSION_MODES = ("none", "lora", "full")
LORA_ADAPTER_NAME = "default"
LORA_KEY_PATTERN = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")


@dataclass
class TrainableSelection:
    """Selection of the parameter groups that train. LoRA settings apply when `fusion` is "lora"."""

    side_branch: bool = True
    fusion: str = "none"
    projector: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05

    def validate(self) -> None:
        """Raise InvalidInputError for an unknown fusion mode, bad LoRA settings or an empty selection."""
        if self.fusion not in FUSION_MODES:
            raise InvalidInputError(
                f"Invalid fusion training mode {self.fusion!r}: choose one of {', '.join(FUSION_MODES)}."
            )
        if self.lora_rank < 1:
            raise InvalidInputError(f"Invalid lora_rank {self.lora_rank}: it must be a positive integer, such as 16.")
        if self.lora_alpha <= 0:
            raise InvalidInputError(f"Invalid lora_alpha {self.lora_alpha}: it must be positive, such as 32.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise InvalidInputError(f"Invalid lora_dropout {self.lora_dropout}: it must be in [0, 1).")
        if not (self.side_branch or self.fusion != "none" or self.projector):
            raise InvalidInputError(
                "Nothing to train: the side branch is frozen, fusion is 'none' and the projector is frozen. Train at "
                "least one of them."
            )


@dataclass
class TrainableReport:
    """Trainable and total parameter counts, with the count of each trained group."""

    trainable: int
    total: int
    groups: dict[str, int]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def format(self) -> str:
        groups = ", ".join(f"{name} {count:,}" for name, count in self.groups.items())
        return f"Trainable parameters: {self.trainable:,} of {self.total:,} ({self.percent:.2f} %): {groups}"

    def as_dict(self) -> dict:
        return {"trainable": self.trainable, "total": self.total, "percent": round(self.percent, 4), "groups": self.groups}


def fusion_layer_prefixes(model: nn.Module) -> list[str]:
    """Return the module names of the fusion layers, such as "model.language_model.layers.31"."""
    return [f"model.language_model.layers.{index}" for index in model.config.fusion_layers]


def lora_config_for(model: nn.Module, selection: TrainableSelection) -> LoraConfig:
    """Build a LoRA config that targets every linear layer inside the fusion layers, by exact module name."""
    prefixes = tuple(prefix + "." for prefix in fusion_layer_prefixes(model))
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name.startswith(prefixes)]
    if not names:
        raise InvalidInputError("The fusion layers contain no linear layers, so LoRA has nothing to adapt.")
    pattern = "^(" + "|".join(re.escape(name) for name in names) + ")$"
    return LoraConfig(
        r=selection.lora_rank,
        lora_alpha=selection.lora_alpha,
        lora_dropout=selection.lora_dropout,
        target_modules=pattern,
        bias="none",
    )


def select_trainable(model: nn.Module, selection: TrainableSelection) -> tuple[TrainableReport, LoraConfig | None]:
    """Freeze `model`, add LoRA layers if asked (in place), and unfreeze the selected groups.

    Returns the parameter counts and the LoRA config (None without LoRA).
    """
    selection.validate()
    for parameter in model.parameters():
        parameter.requires_grad_(False)

    lora_config = None
    if selection.fusion == "lora":
        lora_config = lora_config_for(model, selection)
        inject_adapter_in_model(lora_config, model, adapter_name=LORA_ADAPTER_NAME)

    groups: dict[str, list[nn.Parameter]] = {}
    if selection.side_branch:
        groups["side branch"] = list(model.model.side_branch.parameters())
    if selection.fusion == "full":
        groups["fusion layers"] = [
            parameter for index in model.config.fusion_layers
            for parameter in model.model.language_model.layers[index].parameters()
        ]
    if selection.fusion == "lora":
        groups["fusion LoRA"] = [parameter for name, parameter in model.named_parameters() if ".lora_" in name]
    if selection.projector:
        groups["projector"] = list(model.model.multi_modal_projector.parameters())

    for parameters in groups.values():
        for parameter in parameters:
            parameter.requires_grad_(True)

    report = count_parameters(model, {name: parameters for name, parameters in groups.items()})
    return report, lora_config


def count_parameters(model: nn.Module, groups: dict[str, list[nn.Parameter]] | None = None) -> TrainableReport:
    """Count trainable and total parameters (shared tensors once); `groups` adds per-group counts."""
    seen, trainable, total = set(), 0, 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    group_counts = {name: sum(parameter.numel() for parameter in parameters) for name, parameters in (groups or {}).items()}
    return TrainableReport(trainable, total, group_counts)


def upcast_trainable(model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Keep trainable parameters in `dtype` (fp32 master weights) while frozen ones stay in the compute dtype."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require gradients."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def merge_lora_state(state: dict[str, torch.Tensor], lora_config: LoraConfig | dict) -> dict[str, torch.Tensor]:
    """Return a state dict with each LoRA pair folded into its base weight and the LoRA keys removed.

    peft renames an adapted `x.weight` to `x.base_layer.weight` and adds `x.lora_A.<adapter>.weight`
    (r, in) and `x.lora_B.<adapter>.weight` (out, r). The merged weight is W + (alpha / r) * B @ A, which
    is what plain LoRA computes. This tool configures neither rsLoRA nor DoRA, which scale differently.
    """
    rank, alpha = _lora_rank_alpha(lora_config)
    scaling = alpha / rank
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    merged: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = LORA_KEY_PATTERN.match(key)
        if match:
            pairs.setdefault(match.group("module"), {})[match.group("which")] = tensor
            continue
        merged[key.replace(".base_layer.", ".")] = tensor

    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA weights of {module} are incomplete: found {sorted(pair)}, expected A and B.")
        key = f"{module}.weight"
        base = merged[key]
        delta = (pair["B"].float() @ pair["A"].float()) * scaling
        merged[key] = (base.float() + delta).to(base.dtype)
    return merged


def lora_adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the LoRA tensors of a state dict under the key names of a peft adapter file.

    peft saves `base_model.model.<module>.lora_A.weight` (no adapter name) for a model wrapped in a
    PeftModel, which is what `PeftModel.from_pretrained(converted_model, folder)` reads back.
    """
    adapter = {}
    for key, tensor in state.items():
        match = LORA_KEY_PATTERN.match(key)
        if match:
            adapter[f"base_model.model.{match.group('module')}.lora_{match.group('which')}.weight"] = tensor
    return adapter


def _lora_rank_alpha(lora_config: LoraConfig | dict) -> tuple[int, float]:
    if isinstance(lora_config, dict):
        return int(lora_config["r"]), float(lora_config["lora_alpha"])
    return int(lora_config.r), float(lora_config.lora_alpha)
