"""The split rule: which layer image tokens can leave the decoder stack at, and the evidence for it.

Image tokens skip layers `s .. L-K-1` of the converted model (L layers, K fusion layers), so a split
`s` is safe when, on the mean curves over the calibration samples, every layer from `s` to `L-K-1`
looks saturated through each lens the rule uses:

- `attention`: text queries put little attention on image keys:
  `mass[l] <= floor + attention_tolerance * (peak - floor)`, with `peak` and `floor` the largest and
  smallest mean mass over all layers (or `mass[l] <= attention_threshold` when that is set);
- `cosine`: the layer barely changes the image tokens: `cosine[l] >= cosine_threshold`;
- `logit_lens`: the image tokens already decode to the last layer's top-1 token:
  `top1[l] >= top1_threshold`.

Each lens proposes the smallest `s` in `min_split .. L-K-1` for which its condition holds at every
layer from `s` to `L-K-1`; the split is the largest proposal, so every used lens agrees. When a
used lens is never saturated over that range, the split falls back to `L-K-1`, the latest valid
split, and the decision is marked as not saturated.
"""

import logging
from dataclasses import asdict, dataclass, field

from ..errors import InvalidInputError

logger = logging.getLogger(__name__)

RULE_LENSES = ("attention", "cosine", "logit_lens")
CURVE_OF_LENS = {"attention": "attention_mass", "cosine": "cosine_similarity", "logit_lens": "logit_lens_top1"}


@dataclass
class SplitRule:
    """Settings of the split rule; the module docstring defines each condition."""

    lenses: tuple[str, ...] = ("attention",)
    attention_tolerance: float = 0.02
    attention_threshold: float | None = None
    cosine_threshold: float = 0.9
    top1_threshold: float = 0.5
    min_split: int = 1
    num_fusion_layers: int = 1

    def validate(self, num_layers: int) -> None:
        """Raise InvalidInputError unless the settings are usable for a model with `num_layers` layers."""
        unknown = [lens for lens in self.lenses if lens not in RULE_LENSES]
        if not self.lenses or unknown:
            raise InvalidInputError(
                f"Invalid split-rule lenses {','.join(self.lenses) or '(none)'}: use one or more of "
                f"{', '.join(RULE_LENSES)}, separated by commas."
            )
        _check_fraction("attention_tolerance", self.attention_tolerance)
        if self.attention_threshold is not None:
            _check_fraction("attention_threshold", self.attention_threshold)
        _check_fraction("top1_threshold", self.top1_threshold)
        if not -1.0 <= self.cosine_threshold <= 1.0:
            raise InvalidInputError(
                f"Invalid cosine_threshold {self.cosine_threshold}: a cosine similarity lies in -1..1. Pass a "
                "value such as 0.9."
            )
        last_split = num_layers - self.num_fusion_layers - 1
        if self.num_fusion_layers < 1 or last_split < 1:
            raise InvalidInputError(
                f"Invalid num_fusion_layers {self.num_fusion_layers} for a language model with {num_layers} layers: "
                f"it must lie in 1..{num_layers - 2}."
            )
        if not 1 <= self.min_split <= last_split:
            raise InvalidInputError(
                f"Invalid min_split {self.min_split}: it must lie in 1..{last_split} for a language model with "
                f"{num_layers} layers and {self.num_fusion_layers} fusion layer(s)."
            )

    def to_dict(self) -> dict:
        """Return the settings as JSON-ready values."""
        settings = asdict(self)
        settings["lenses"] = list(self.lenses)
        return settings


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise InvalidInputError(f"Invalid {name} {value}: it must lie in 0..1. Pass a value such as 0.1.")


@dataclass
class LensProposal:
    """One lens's proposal: its threshold, the split it proposes, and the curve values around that split."""

    lens: str
    curve: str
    used: bool
    comparison: str
    threshold: float
    split_layer: int | None
    value_at_split: float | None
    value_before_split: float | None


@dataclass
class SplitDecision:
    """The chosen split, whether every used lens was saturated, and each lens's proposal."""

    split_layer: int
    saturated: bool
    deciding_lens: str | None
    proposals: list[LensProposal] = field(default_factory=list)
    rule: dict = field(default_factory=dict)
    explanation: str = ""

    def to_dict(self) -> dict:
        """Return the decision as JSON-ready values."""
        return asdict(self)


def choose_split(curves: dict[str, list[float]], rule: SplitRule) -> SplitDecision:
    """Apply `rule` to the mean curves (one value per layer, keyed by curve name) and explain the result."""
    num_layers = len(curves["attention_mass"])
    rule.validate(num_layers)
    last_split = num_layers - rule.num_fusion_layers - 1

    proposals = [_propose(lens, curves, rule, last_split) for lens in RULE_LENSES]
    used = [proposal for proposal in proposals if proposal.used]
    unsaturated = [proposal.lens for proposal in used if proposal.split_layer is None]
    if unsaturated:
        split, deciding = last_split, None
    else:
        deciding_proposal = max(used, key=lambda proposal: proposal.split_layer)
        split, deciding = deciding_proposal.split_layer, deciding_proposal.lens

    decision = SplitDecision(
        split_layer=split,
        saturated=not unsaturated,
        deciding_lens=deciding,
        proposals=proposals,
        rule=rule.to_dict(),
    )
    decision.explanation = _explain(decision, unsaturated, last_split)
    if unsaturated:
        logger.warning("%s", decision.explanation)
    return decision


def _threshold(lens: str, values: list[float], rule: SplitRule) -> float:
    if lens == "attention":
        if rule.attention_threshold is not None:
            return rule.attention_threshold
        peak, floor = max(values), min(values)
        return floor + rule.attention_tolerance * (peak - floor)
    if lens == "cosine":
        return rule.cosine_threshold
    return rule.top1_threshold


def _propose(lens: str, curves: dict[str, list[float]], rule: SplitRule, last_split: int) -> LensProposal:
    curve = CURVE_OF_LENS[lens]
    values = curves[curve]
    threshold = _threshold(lens, values, rule)
    comparison = "<=" if lens == "attention" else ">="

    def saturated(layer: int) -> bool:
        return values[layer] <= threshold if comparison == "<=" else values[layer] >= threshold

    # Walk down from the last layer that image tokens may skip while every layer stays saturated.
    split = None
    for layer in range(last_split, rule.min_split - 1, -1):
        if not saturated(layer):
            break
        split = layer

    return LensProposal(
        lens=lens,
        curve=curve,
        used=lens in rule.lenses,
        comparison=comparison,
        threshold=float(threshold),
        split_layer=split,
        value_at_split=None if split is None else float(values[split]),
        value_before_split=None if split is None or split == 0 else float(values[split - 1]),
    )


def _explain(decision: SplitDecision, unsaturated: list[str], last_split: int) -> str:
    if unsaturated:
        return (
            f"No saturation found by lens(es) {', '.join(unsaturated)} over layers {decision.rule['min_split']}.."
            f"{last_split}: the split falls back to {last_split}, the latest valid split, which saves the least. "
            "Check the curves, or relax the rule (thresholds, --rule-lenses)."
        )
    proposal = next(item for item in decision.proposals if item.lens == decision.deciding_lens)
    before = (
        f", while layer {decision.split_layer - 1} has {proposal.value_before_split:.4g}"
        if proposal.value_before_split is not None
        else ""
    )
    return (
        f"Split {decision.split_layer}, set by the {proposal.lens} lens: from layer {decision.split_layer} to "
        f"{last_split}, every layer has {proposal.curve} {proposal.comparison} {proposal.threshold:.4g} "
        f"(layer {decision.split_layer}: {proposal.value_at_split:.4g}{before})."
    )
