"""Plan a DPVR-LF conversion from a config alone: presets, settings, parameter counts and prefill costs.

Nothing here allocates weights. Parameter counts and per-token multiply-accumulates are read from a
`LlavaForConditionalGeneration` built on the meta device, so a 13B plan costs a few megabytes.

The converted graph, for a language model with `L` decoder layers, split layer `s`, side-branch depth
`d_v` and `K` fusion layers:

- shared stack, layers `0 .. s-1`: the full sequence;
- side branch, `d_v` new decoder layers: image tokens only, each image attending causally to itself;
- deep text stack, layers `s .. L-K-1`: text tokens only;
- fusion, layers `L-K .. L-1`: the full sequence again, then the final norm and `lm_head`.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from dpvr_surgery.errors import InvalidInputError
from dpvr_surgery.modeling.configuration_dpvr_llava import SIDE_BRANCH_INITS

logger = logging.getLogger(__name__)


# Class tokens that each supported vision tower prepends to its patch tokens.
CLASS_TOKENS_BY_VISION_TYPE = {"clip_vision_model": 1, "siglip_vision_model": 0}

_PRESETS_DIR = resources.files("dpvr_surgery").joinpath("presets")

PRESET_NAMES: tuple[str, ...] = tuple(
    sorted(entry.name.removesuffix(".json") for entry in _PRESETS_DIR.iterdir() if entry.name.endswith(".json"))
)

MIB = 1024**2


# ---------------------------------------------------------------------------------------------------
# Presets


def load_preset(name: str) -> dict:
    """Load the llava-hf `config.json` contents stored under a preset name, such as "llava-1.5-7b".

    Build the config with `LlavaConfig.from_dict(load_preset(name))`.
    """
    if name not in PRESET_NAMES:
        raise InvalidInputError(
            f"unknown preset {name!r}: available presets are {', '.join(PRESET_NAMES)}; pass one of these names"
        )

    text = _PRESETS_DIR.joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


# ---------------------------------------------------------------------------------------------------
# Settings


@dataclass
class PlanSettings:
    """DPVR-LF conversion settings: the split layer, side-branch depth, fusion layer count and side-branch init.

    `side_branch_init` is "copy" (copy layers `s .. s+d_v-1`), "copy-last" (copy the `d_v` layers just
    before the fusion layers) or "random" (fresh weights from the language model's initialiser).
    """

    split_layer: int
    side_branch_depth: int = 1
    num_fusion_layers: int = 1
    side_branch_init: str = "copy"

    def validate(self, num_layers: int) -> None:
        """Raise `InvalidInputError` unless these settings fit a language model with `num_layers` decoder layers."""
        _check_integer("split_layer", self.split_layer)
        _check_integer("side_branch_depth", self.side_branch_depth)
        _check_integer("num_fusion_layers", self.num_fusion_layers)

        if self.side_branch_init not in SIDE_BRANCH_INITS:
            raise InvalidInputError(
                f"side_branch_init {self.side_branch_init!r} is invalid; choose one of {', '.join(SIDE_BRANCH_INITS)}"
            )

        if num_layers < 3:
            raise InvalidInputError(
                f"a language model with {num_layers} decoder layers is too small for DPVR-LF: it needs at least 3 "
                "(one shared, one deep text and one fusion layer); use a model with more layers"
            )

        if self.side_branch_depth < 1:
            raise InvalidInputError(
                f"side_branch_depth {self.side_branch_depth} is invalid: the side branch needs at least 1 layer; "
                "set side_branch_depth to 1 or more"
            )

        self._validate_fusion(num_layers)
        self._validate_split(num_layers)
        self._validate_copy_source(num_layers)

    def _validate_fusion(self, num_layers: int) -> None:
        max_fusion = num_layers - 2
        if not 1 <= self.num_fusion_layers <= max_fusion:
            raise InvalidInputError(
                f"num_fusion_layers {self.num_fusion_layers} is outside the valid range 1..{max_fusion} for a "
                f"language model with {num_layers} layers, because at least one shared and one deep text layer "
                f"must remain; pick a value in 1..{max_fusion}"
            )

    def _validate_split(self, num_layers: int) -> None:
        max_split = num_layers - self.num_fusion_layers - 1
        if not 1 <= self.split_layer <= max_split:
            fusion_noun = "fusion layer" if self.num_fusion_layers == 1 else "fusion layers"
            raise InvalidInputError(
                f"split layer {self.split_layer} is outside the valid range 1..{max_split} for a language model "
                f"with {num_layers} layers and {self.num_fusion_layers} {fusion_noun}; pick a split in 1..{max_split}"
            )

    def _validate_copy_source(self, num_layers: int) -> None:
        source = side_branch_source_layers(self, num_layers)
        if source is None:
            return

        first, last = source
        if first < 0 or last > num_layers - 1:
            if self.side_branch_init == "copy":
                max_depth = num_layers - self.split_layer
            else:
                max_depth = num_layers - self.num_fusion_layers
            raise InvalidInputError(
                f"side_branch_depth {self.side_branch_depth} with side_branch_init {self.side_branch_init!r} needs "
                f"source layers {first}..{last}, but the language model has layers 0..{num_layers - 1}; set "
                f"side_branch_depth to at most {max_depth} or use side_branch_init 'random'"
            )


def _check_integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name} {value!r} is invalid: it must be an integer; pass a whole number")


def side_branch_source_layers(settings: PlanSettings, num_layers: int) -> tuple[int, int] | None:
    """Return the first and last language-model layer that the side branch copies, or None for "random".

    "copy" takes layers `s .. s+d_v-1`, "copy-last" the `d_v` layers just before the fusion layers,
    `L-K-d_v .. L-K-1`.
    """
    if settings.side_branch_init == "random":
        return None

    if settings.side_branch_init == "copy-last":
        last = num_layers - settings.num_fusion_layers - 1
        return last - settings.side_branch_depth + 1, last

    first = settings.split_layer
    return first, first + settings.side_branch_depth - 1


def _side_branch_shape_layers(settings: PlanSettings, num_layers: int) -> tuple[int, ...]:
    """Return, per side-branch layer, the language-model layer whose shape it has.

    A copied layer has the shape of its source. A "random" layer is built from the language model's
    config, so it has the shape of layer `s` (every layer, for models whose layers all match).
    """
    source = side_branch_source_layers(settings, num_layers)
    if source is None:
        return (settings.split_layer,) * settings.side_branch_depth

    first, last = source
    return tuple(range(first, last + 1))


# ---------------------------------------------------------------------------------------------------
# Image tokens


def image_tokens_per_image(config: LlavaConfig) -> int:
    """Return how many image-feature tokens one image contributes to the language model's sequence.

    The vision tower produces `(image_size // patch_size) ** 2` patch tokens (per axis for a (height, width)
    size), plus one class token for CLIP; SigLIP has none. The strategy "full" keeps every token,
    "default" drops the first one. A list of `vision_feature_layer` indices concatenates the selected
    layers along the hidden axis, so it leaves the count unchanged.

    transformers 5.25 drops the first token under "default" whatever the tower, so for a tower without
    a class token (SigLIP) it drops a real patch. This function follows the forward pass, returns
    `patches - 1` in that case and logs a warning.
    """
    vision_config = config.vision_config
    vision_type = vision_config.model_type
    if vision_type not in CLASS_TOKENS_BY_VISION_TYPE:
        raise InvalidInputError(
            f"vision tower type {vision_type!r} is not supported: image-token counts are known for "
            f"{', '.join(CLASS_TOKENS_BY_VISION_TYPE)}; use a LLaVA model with one of these towers"
        )

    tokens = _num_patches(vision_config) + CLASS_TOKENS_BY_VISION_TYPE[vision_type]

    strategy = config.vision_feature_select_strategy
    if strategy == "full":
        return tokens
    if strategy != "default":
        raise InvalidInputError(
            f"vision_feature_select_strategy {strategy!r} is invalid; set it to 'default' or 'full'"
        )

    if CLASS_TOKENS_BY_VISION_TYPE[vision_type] == 0:
        logger.warning(
            "vision_feature_select_strategy 'default' on a %s tower, which has no class token, drops the first "
            "image patch; 'full' keeps every patch",
            vision_type,
        )
    return tokens - 1


def _num_patches(vision_config: Any) -> int:
    image_size = vision_config.image_size
    patch_size = vision_config.patch_size
    if isinstance(image_size, (list, tuple)):
        height, width = image_size
        return (height // patch_size) * (width // patch_size)
    return (image_size // patch_size) ** 2


# ---------------------------------------------------------------------------------------------------
# Model shapes read from a meta-device model


@dataclass(frozen=True)
class _ModelShapes:
    """Sizes of one LLaVA model, read from its meta-device instance. MACs are multiply-accumulates per token."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    image_tokens: int
    total_parameters: int
    vision_parameters: int
    projector_parameters: int
    layer_parameters: tuple[int, ...]
    layer_linear_macs: tuple[int, ...]
    lm_head_macs: int
    vision_positions: int
    vision_patches: int
    vision_layers: int
    vision_heads: int
    vision_head_dim: int
    vision_layer_linear_macs: int
    patch_embedding_macs: int
    projector_macs: int


def _build_meta_model(config: LlavaConfig) -> LlavaForConditionalGeneration:
    """Build the model on the meta device: shapes and parameter counts, no weight storage."""
    with torch.device("meta"):
        return LlavaForConditionalGeneration(copy.deepcopy(config))


def _linear_macs(module: nn.Module) -> int:
    """Return the multiply-accumulates per token of every `nn.Linear` in `module` (in x out each)."""
    return sum(child.weight.numel() for child in module.modules() if isinstance(child, nn.Linear))


def _parameter_count(module: nn.Module) -> int:
    # `parameters()` yields a shared (tied) tensor once, so tied embeddings count once.
    return sum(parameter.numel() for parameter in module.parameters())


def _measure(config: LlavaConfig) -> _ModelShapes:
    image_tokens = image_tokens_per_image(config)
    model = _build_meta_model(config)

    text_config = config.text_config
    num_heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads

    layers = model.model.language_model.layers
    vision_tower = model.model.vision_tower
    vision_config = config.vision_config
    vision_heads = vision_config.num_attention_heads
    vision_encoder_layers = vision_tower.encoder.layers
    patch_embedding = vision_tower.embeddings.patch_embedding
    vision_patches = _num_patches(vision_config)

    return _ModelShapes(
        num_layers=len(layers),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_size=text_config.hidden_size,
        vocab_size=text_config.vocab_size,
        image_tokens=image_tokens,
        total_parameters=_parameter_count(model),
        vision_parameters=_parameter_count(vision_tower),
        projector_parameters=_parameter_count(model.model.multi_modal_projector),
        layer_parameters=tuple(_parameter_count(layer) for layer in layers),
        layer_linear_macs=tuple(_linear_macs(layer) for layer in layers),
        lm_head_macs=_linear_macs(model.lm_head),
        vision_positions=vision_patches + CLASS_TOKENS_BY_VISION_TYPE[vision_config.model_type],
        vision_patches=vision_patches,
        vision_layers=len(vision_encoder_layers),
        vision_heads=vision_heads,
        vision_head_dim=vision_config.hidden_size // vision_heads,
        vision_layer_linear_macs=_linear_macs(vision_encoder_layers[0]),
        patch_embedding_macs=patch_embedding.weight.numel(),
        projector_macs=_linear_macs(model.model.multi_modal_projector),
    )


# ---------------------------------------------------------------------------------------------------
# Parameters


def count_parameters(config: LlavaConfig, settings: PlanSettings) -> dict:
    """Count the parameters of the source and converted models, from a meta-device model.

    Returns a dict of counts. `source_total` counts tied embeddings once and splits into
    `language_model`, `vision_tower` and `projector`. `decoder_layer` is layer 0. `side_branch` is the
    `d_v` new layers, shaped like the layers they copy. `converted_total` is source plus side branch.
    `trainable` is the side branch (the default training setup). `trainable_fraction_of_source` and
    `trainable_fraction_of_converted` are fractions in 0..1.
    """
    shapes = _measure(config)
    settings.validate(shapes.num_layers)
    return _count_parameters(shapes, settings)


def _count_parameters(shapes: _ModelShapes, settings: PlanSettings) -> dict:
    side_branch_layers = _side_branch_shape_layers(settings, shapes.num_layers)
    side_branch = sum(shapes.layer_parameters[index] for index in side_branch_layers)
    converted_total = shapes.total_parameters + side_branch
    trainable = side_branch

    return {
        "source_total": shapes.total_parameters,
        "language_model": shapes.total_parameters - shapes.vision_parameters - shapes.projector_parameters,
        "vision_tower": shapes.vision_parameters,
        "projector": shapes.projector_parameters,
        "decoder_layer": shapes.layer_parameters[0],
        "side_branch": side_branch,
        "converted_total": converted_total,
        "trainable": trainable,
        "trainable_fraction_of_source": trainable / shapes.total_parameters,
        "trainable_fraction_of_converted": trainable / converted_total,
    }


# ---------------------------------------------------------------------------------------------------
# Prefill cost


def prefill_cost(
    config: LlavaConfig,
    settings: PlanSettings,
    *,
    image_tokens: int | None = None,
    text_tokens: int = 64,
    num_images: int = 1,
    batch_size: int = 1,
    dtype_bytes: int = 2,
) -> dict:
    """Estimate the prefill compute and KV-cache size of the original and the converted model.

    Every row of the batch contains `num_images` images of `I` tokens each (`image_tokens`, default
    `image_tokens_per_image(config)`) and `t` text tokens (`text_tokens`), with no padding, so a row
    has `T = num_images * I + t` positions. `B` is the batch size, `h` the attention heads, `d` the
    head dimension, `kv` the key/value heads, and `L`, `s`, `d_v`, `K` are as in the module docstring.

    Decoder token-layers (tokens times layers, summed over the batch):
      original  `L * B * T`;
      converted `s * B * T` (shared) + `d_v * B * num_images * I` (side branch)
                + `(L-K-s) * B * t` (deep text) + `K * B * T` (fusion).

    Linear FLOPs: `2 * MACs` per token-layer. MACs (multiply-accumulates per token) is `in * out`
    summed over every `nn.Linear` in the decoder layer: for Llama the q, k, v, o, gate, up and down
    projections. Biases are left out.

    Attention FLOPs: `4 * h * d` per (query, key) pair, because `Q K^T` and `A V` each cost `2 * d`
    per pair and head. Pairs follow the causal key counts that each group attends to, per row:
    `T (T+1) / 2` for the full sequence, `num_images * I (I+1) / 2` for the side branch (each image
    attends only to its own tokens) and `t (t+1) / 2` for the deep text stack.
    Softmax, norms, activations and rotary embeddings are left out.

    `lm_head` FLOPs: `2 * hidden * vocab * B`, for the last position of each row only.

    Vision encoder FLOPs are the same for both models and reported once. Per image, with `P` patches,
    `P + c` tower positions (`c` class tokens), `n_v` tower layers of `MACs_v` each, `h_v` heads of
    dimension `d_head_v`: patch embedding `2 * P * MACs_conv`, encoder
    `n_v * (2 * (P + c) * MACs_v + 4 * h_v * d_head_v * (P + c)^2)` (bidirectional attention) and
    projector `2 * image_tokens_per_image(config) * MACs_projector`. transformers 5.25 runs every
    tower layer, including those after `vision_feature_layer`. The total is multiplied by
    `num_images * B`. An `image_tokens` override leaves it unchanged.

    KV-cache bytes after prefill: `2 * kv * d * dtype_bytes` per cached token-layer (keys and values).
    In the original every layer caches every position. In the converted model shared and fusion
    layers cache every position, deep text layers text positions only, the side branch nothing.

    Returns a dict with `shape` (the resolved sizes), `vision_encoder` (`tower_flops`,
    `projector_flops`, `flops`) and, for `original` and `converted`: `token_layers` (and per group),
    `linear_flops`, `attention_flops`, `decoder_flops`, `lm_head_flops`, `prefill_flops` (decoder,
    `lm_head` and vision encoder) and `kv_cache_bytes` (and per group). FLOPs count floating-point
    operations, not multiply-accumulates. Every value is an int.
    """
    shapes = _measure(config)
    settings.validate(shapes.num_layers)
    return _prefill_cost(
        shapes,
        settings,
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        num_images=num_images,
        batch_size=batch_size,
        dtype_bytes=dtype_bytes,
    )


@dataclass(frozen=True)
class _PrefillShape:
    image_tokens_per_image: int
    num_images: int
    text_tokens: int
    batch_size: int
    dtype_bytes: int

    @property
    def image_tokens(self) -> int:
        return self.num_images * self.image_tokens_per_image

    @property
    def sequence_length(self) -> int:
        return self.image_tokens + self.text_tokens


def _check_shape(
    shapes: _ModelShapes,
    image_tokens: int | None,
    text_tokens: int,
    num_images: int,
    batch_size: int,
    dtype_bytes: int,
) -> _PrefillShape:
    if image_tokens is None:
        image_tokens = shapes.image_tokens

    minimums = {"image_tokens": 1, "text_tokens": 1, "num_images": 0, "batch_size": 1, "dtype_bytes": 1}
    values = {
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "num_images": num_images,
        "batch_size": batch_size,
        "dtype_bytes": dtype_bytes,
    }
    for name, value in values.items():
        _check_integer(name, value)
        if value < minimums[name]:
            raise InvalidInputError(
                f"{name} {value} is invalid: it must be at least {minimums[name]}; pass a larger value"
            )

    return _PrefillShape(image_tokens, num_images, text_tokens, batch_size, dtype_bytes)


def _causal_pairs(length: int) -> int:
    """Return the (query, key) pairs of causal attention over `length` tokens."""
    return length * (length + 1) // 2


def _prefill_cost(
    shapes: _ModelShapes,
    settings: PlanSettings,
    *,
    image_tokens: int | None = None,
    text_tokens: int = 64,
    num_images: int = 1,
    batch_size: int = 1,
    dtype_bytes: int = 2,
) -> dict:
    shape = _check_shape(shapes, image_tokens, text_tokens, num_images, batch_size, dtype_bytes)
    original_layers, converted_groups = _layer_groups(shapes, settings, shape)

    vision = _vision_encoder_flops(shapes, shape)
    lm_head_flops = 2 * shapes.lm_head_macs * shape.batch_size

    original = _path_cost({"decoder": original_layers}, shapes, shape)
    converted = _path_cost(converted_groups, shapes, shape)
    for path in (original, converted):
        path["lm_head_flops"] = lm_head_flops
        path["prefill_flops"] = path["decoder_flops"] + lm_head_flops + vision["flops"]

    return {
        "shape": {
            "image_tokens_per_image": shape.image_tokens_per_image,
            "num_images": shape.num_images,
            "text_tokens": shape.text_tokens,
            "sequence_length": shape.sequence_length,
            "batch_size": shape.batch_size,
            "dtype_bytes": shape.dtype_bytes,
        },
        "vision_encoder": vision,
        "original": original,
        "converted": converted,
    }


@dataclass(frozen=True)
class _LayerGroup:
    """Decoder layers that see the same tokens: `tokens` and causal `pairs` per row, `caches` if they keep KV."""

    layers: tuple[int, ...]
    tokens: int
    pairs: int
    caches: bool


def _layer_groups(
    shapes: _ModelShapes, settings: PlanSettings, shape: _PrefillShape
) -> tuple[_LayerGroup, dict[str, _LayerGroup]]:
    num_layers = shapes.num_layers
    fusion_start = num_layers - settings.num_fusion_layers
    full_tokens = shape.sequence_length
    # NOTE: sliding-window attention is not modelled, so for such text models the pairs are an upper bound.
    full_pairs = _causal_pairs(full_tokens)

    original = _LayerGroup(tuple(range(num_layers)), full_tokens, full_pairs, caches=True)

    converted = {
        "shared": _LayerGroup(tuple(range(settings.split_layer)), full_tokens, full_pairs, caches=True),
        "side_branch": _LayerGroup(
            _side_branch_shape_layers(settings, num_layers),
            shape.image_tokens,
            shape.num_images * _causal_pairs(shape.image_tokens_per_image),
            caches=False,
        ),
        "deep_text": _LayerGroup(
            tuple(range(settings.split_layer, fusion_start)),
            shape.text_tokens,
            _causal_pairs(shape.text_tokens),
            caches=True,
        ),
        "fusion": _LayerGroup(tuple(range(fusion_start, num_layers)), full_tokens, full_pairs, caches=True),
    }
    return original, converted


def _path_cost(groups: dict[str, _LayerGroup], shapes: _ModelShapes, shape: _PrefillShape) -> dict:
    """Sum token-layers, FLOPs and KV-cache bytes over the layer groups of one model, for the whole batch."""
    batch_size = shape.batch_size
    kv_bytes_per_token_layer = 2 * shapes.num_kv_heads * shapes.head_dim * shape.dtype_bytes
    attention_flops_per_pair = 4 * shapes.num_heads * shapes.head_dim

    token_layers_by_group = {}
    kv_bytes_by_group = {}
    linear_flops = 0
    attention_flops = 0
    for name, group in groups.items():
        token_layers = len(group.layers) * group.tokens * batch_size
        token_layers_by_group[name] = token_layers
        kv_bytes_by_group[name] = token_layers * kv_bytes_per_token_layer if group.caches else 0

        layer_macs = sum(shapes.layer_linear_macs[index] for index in group.layers)
        linear_flops += 2 * layer_macs * group.tokens * batch_size
        attention_flops += len(group.layers) * attention_flops_per_pair * group.pairs * batch_size

    return {
        "token_layers": sum(token_layers_by_group.values()),
        "token_layers_by_group": token_layers_by_group,
        "linear_flops": linear_flops,
        "attention_flops": attention_flops,
        "decoder_flops": linear_flops + attention_flops,
        "kv_cache_bytes": sum(kv_bytes_by_group.values()),
        "kv_cache_bytes_by_group": kv_bytes_by_group,
    }


def _vision_encoder_flops(shapes: _ModelShapes, shape: _PrefillShape) -> dict:
    images = shape.num_images * shape.batch_size
    positions = shapes.vision_positions

    patch_embedding = 2 * shapes.patch_embedding_macs * shapes.vision_patches
    linear = 2 * shapes.vision_layer_linear_macs * positions
    attention = 4 * shapes.vision_heads * shapes.vision_head_dim * positions * positions
    tower = images * (patch_embedding + shapes.vision_layers * (linear + attention))
    projector = images * 2 * shapes.projector_macs * shapes.image_tokens

    return {"tower_flops": tower, "projector_flops": projector, "flops": tower + projector}


# ---------------------------------------------------------------------------------------------------
# Report


def plan_report(config: LlavaConfig, settings: PlanSettings, **shape: int | None) -> dict:
    """Build the JSON-serialisable plan that `convert` would make: architecture, parameters, costs, ratios.

    `shape` takes the keyword arguments of `prefill_cost` (`image_tokens`, `text_tokens`, `num_images`,
    `batch_size`, `dtype_bytes`). Ratios are converted / original.
    """
    shapes = _measure(config)
    settings.validate(shapes.num_layers)

    parameters = _count_parameters(shapes, settings)
    costs = _prefill_cost(shapes, settings, **shape)
    original = costs["original"]
    converted = costs["converted"]

    return {
        "architecture": _architecture(config, shapes),
        "plan": _plan_layout(settings, shapes.num_layers),
        "parameters": parameters,
        "costs": costs,
        "ratios": {
            "parameters": parameters["converted_total"] / parameters["source_total"],
            "token_layers": converted["token_layers"] / original["token_layers"],
            "decoder_flops": converted["decoder_flops"] / original["decoder_flops"],
            "prefill_flops": converted["prefill_flops"] / original["prefill_flops"],
            "kv_cache_bytes": converted["kv_cache_bytes"] / original["kv_cache_bytes"],
        },
    }


def _architecture(config: LlavaConfig, shapes: _ModelShapes) -> dict:
    configured_tokens = getattr(config, "image_seq_length", None)
    if configured_tokens is not None and configured_tokens != shapes.image_tokens:
        logger.warning(
            "config image_seq_length %d differs from the %d image tokens per image that the vision tower produces",
            configured_tokens,
            shapes.image_tokens,
        )

    return {
        "text_model_type": config.text_config.model_type,
        "num_layers": shapes.num_layers,
        "num_attention_heads": shapes.num_heads,
        "num_key_value_heads": shapes.num_kv_heads,
        "head_dim": shapes.head_dim,
        "hidden_size": shapes.hidden_size,
        "vocab_size": shapes.vocab_size,
        "image_tokens_per_image": shapes.image_tokens,
        "vision_model_type": config.vision_config.model_type,
        "vision_num_layers": shapes.vision_layers,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }


def _plan_layout(settings: PlanSettings, num_layers: int) -> dict:
    """Describe the layer groups as inclusive [first, last] index ranges of the source language model."""
    fusion_start = num_layers - settings.num_fusion_layers
    source = side_branch_source_layers(settings, num_layers)
    copied = None if source is None else list(source)

    return {
        **asdict(settings),
        "shared_layers": [0, settings.split_layer - 1],
        "side_branch_source_layers": copied,
        "deep_text_layers": [settings.split_layer, fusion_start - 1],
        "fusion_layers": [fusion_start, num_layers - 1],
    }


def format_plan_report(report: dict) -> str:
    """Format a `plan_report` result as an aligned text table for a terminal."""
    sections = [
        _format_architecture(report["architecture"]),
        _format_plan(report["plan"]),
        _format_parameters(report["parameters"]),
        _format_costs(report["costs"]),
    ]
    return "\n\n".join(sections) + "\n"


def _format_pairs(title: str, pairs: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in pairs)
    lines = [title] + [f"  {label:<{width}}  {value}" for label, value in pairs]
    return "\n".join(lines)


def _format_architecture(architecture: dict) -> str:
    language_model = (
        f"{architecture['text_model_type']}, {architecture['num_layers']} layers, "
        f"hidden {architecture['hidden_size']:,}, {architecture['num_attention_heads']} heads, "
        f"{architecture['num_key_value_heads']} KV heads, head dim {architecture['head_dim']}, "
        f"vocab {architecture['vocab_size']:,}"
    )
    vision_tower = (
        f"{architecture['vision_model_type']}, {architecture['vision_num_layers']} layers, "
        f"feature layer {architecture['vision_feature_layer']}, "
        f"strategy {architecture['vision_feature_select_strategy']}"
    )
    pairs = [
        ("language model", language_model),
        ("vision tower", vision_tower),
        ("image tokens per image", f"{architecture['image_tokens_per_image']:,}"),
    ]
    return _format_pairs("Architecture", pairs)


def _format_layer_range(first_last: list[int]) -> str:
    first, last = first_last
    count = last - first + 1
    if count == 1:
        return f"layer {first} (1 layer)"
    return f"layers {first}-{last} ({count} layers)"


def _format_plan(plan: dict) -> str:
    depth = plan["side_branch_depth"]
    if plan["side_branch_source_layers"] is None:
        init = "random weights"
    else:
        first, last = plan["side_branch_source_layers"]
        init = f"copy of layer {first}" if first == last else f"copy of layers {first}-{last}"
    side_branch = f"{depth} new {'layer' if depth == 1 else 'layers'} ({init}), image tokens, each image on its own"

    pairs = [
        ("shared stack", f"{_format_layer_range(plan['shared_layers'])}, full sequence"),
        ("side branch", side_branch),
        ("deep text stack", f"{_format_layer_range(plan['deep_text_layers'])}, text tokens only"),
        ("fusion", f"{_format_layer_range(plan['fusion_layers'])}, full sequence"),
        ("trainable", "side branch"),
    ]
    return _format_pairs(f"DPVR-LF plan (split layer {plan['split_layer']})", pairs)


def _format_parameters(parameters: dict) -> str:
    rows = [
        ("source model", parameters["source_total"]),
        ("  language model", parameters["language_model"]),
        ("  vision tower", parameters["vision_tower"]),
        ("  projector", parameters["projector"]),
        ("one decoder layer", parameters["decoder_layer"]),
        ("side branch", parameters["side_branch"]),
        ("converted model", parameters["converted_total"]),
        ("trainable", parameters["trainable"]),
    ]
    number_width = max(len(f"{count:,}") for _, count in rows)
    pairs = [(label, f"{count:>{number_width},}") for label, count in rows]

    share_of_source = 100 * parameters["trainable_fraction_of_source"]
    share_of_converted = 100 * parameters["trainable_fraction_of_converted"]
    label, value = pairs[-1]
    pairs[-1] = (label, f"{value}  ({share_of_source:.2f} % of source, {share_of_converted:.2f} % of converted)")
    return _format_pairs("Parameters", pairs)


def _format_change(original: float, converted: float) -> str:
    if original == 0:
        return "n/a"
    if original == converted:
        return "0.00 %"
    return f"{100 * (converted / original - 1):+.2f} %"


def _format_costs(costs: dict) -> str:
    shape = costs["shape"]
    original = costs["original"]
    converted = costs["converted"]
    vision_flops = costs["vision_encoder"]["flops"]

    def gflops(value: int) -> str:
        return f"{value / 1e9:,.2f}"

    def mib(value: int) -> str:
        return f"{value / MIB:,.1f}"

    rows = [
        ("decoder token-layers", original["token_layers"], converted["token_layers"], lambda value: f"{value:,}"),
        ("decoder linear GFLOPs", original["linear_flops"], converted["linear_flops"], gflops),
        ("decoder attention GFLOPs", original["attention_flops"], converted["attention_flops"], gflops),
        ("lm_head GFLOPs (last position)", original["lm_head_flops"], converted["lm_head_flops"], gflops),
        ("vision tower + projector GFLOPs", vision_flops, vision_flops, gflops),
        ("prefill GFLOPs", original["prefill_flops"], converted["prefill_flops"], gflops),
        ("KV cache MiB", original["kv_cache_bytes"], converted["kv_cache_bytes"], mib),
    ]
    table = [("", "original", "converted", "change")]
    for label, original_value, converted_value, formatter in rows:
        change = _format_change(original_value, converted_value)
        table.append((label, formatter(original_value), formatter(converted_value), change))

    widths = [max(len(row[column]) for row in table) for column in range(4)]
    lines = [
        f"  {label:<{widths[0]}}  {first:>{widths[1]}}  {second:>{widths[2]}}  {change:>{widths[3]}}"
        for label, first, second, change in table
    ]

    images = shape["num_images"]
    title = (
        f"Prefill estimate: batch {shape['batch_size']}, {images} {'image' if images == 1 else 'images'} x "
        f"{shape['image_tokens_per_image']:,} tokens + {shape['text_tokens']:,} text tokens "
        f"= {shape['sequence_length']:,} positions per row, {shape['dtype_bytes']} bytes per KV value"
    )
    return "\n".join([title] + lines)
