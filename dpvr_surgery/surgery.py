"""The weight surgery itself: the dual-path config and the side-branch weights, for files and for models."""

import re

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from .modeling import DpvrLlavaConfig, DpvrLlavaForConditionalGeneration
from .modeling.modeling_dpvr_llava import DpvrSideBranch
from .plan import PlanSettings
from .plan import side_branch_source_layers as plan_side_branch_source_layers

SIDE_BRANCH_PREFIX = "model.side_branch.layers."
LANGUAGE_LAYER_PATTERN = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.+)$")

AUTO_MAP = {
    "AutoConfig": "configuration_dpvr_llava.DpvrLlavaConfig",
    "AutoModel": "modeling_dpvr_llava.DpvrLlavaModel",
    "AutoModelForImageTextToText": "modeling_dpvr_llava.DpvrLlavaForConditionalGeneration",
}


def build_dpvr_config(
    source: LlavaConfig | dict,
    *,
    split_layer: int,
    side_branch_depth: int = 1,
    num_fusion_layers: int = 1,
    side_branch_init: str = "copy",
    saturation: dict | None = None,
) -> DpvrLlavaConfig:
    """Return the dual-path config of a LLaVA config: every source field plus the routing fields and `auto_map`."""
    fields = source.to_dict() if isinstance(source, LlavaConfig) else dict(source)
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    config = DpvrLlavaConfig(
        **fields,
        split_layer=split_layer,
        side_branch_depth=side_branch_depth,
        num_fusion_layers=num_fusion_layers,
        side_branch_init=side_branch_init,
        saturation=saturation,
    )
    config.architectures = [DpvrLlavaForConditionalGeneration.__name__]
    config.auto_map = dict(AUTO_MAP)
    return config


def side_branch_source_layers(config: DpvrLlavaConfig) -> list[int] | None:
    """Return the language-model layers that side-branch layers 0, 1, ... copy, or None for random init."""
    settings = PlanSettings(
        config.split_layer, config.side_branch_depth, config.num_fusion_layers, config.side_branch_init
    )
    first_last = plan_side_branch_source_layers(settings, config.text_config.num_hidden_layers)
    if first_last is None:
        return None
    return list(range(first_last[0], first_last[1] + 1))


def side_branch_keys_for(name: str, source_layers: list[int] | None) -> list[str]:
    """Return the side-branch keys that copy the tensor `name` (a current-layout LLaVA key), if any."""
    if source_layers is None:
        return []
    match = LANGUAGE_LAYER_PATTERN.match(name)
    if match is None:
        return []
    layer, suffix = int(match.group(1)), match.group(2)
    return [f"{SIDE_BRANCH_PREFIX}{i}.{suffix}" for i, source in enumerate(source_layers) if source == layer]


def random_side_branch_state(config: DpvrLlavaConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Initialise side-branch layers as `transformers` initialises new decoder layers; return their state dict."""
    with torch.device("meta"):
        holder = DpvrLlavaForConditionalGeneration(config)
    layer_class = type(holder.model.language_model.layers[0])
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        side_branch = DpvrSideBranch(config, layer_class)
        for module in side_branch.modules():
            holder._init_weights(module)
    finally:
        torch.random.set_rng_state(generator_state)
    return {f"model.side_branch.{key}": value for key, value in side_branch.state_dict().items()}


def convert_model(
    source: LlavaForConditionalGeneration,
    *,
    split_layer: int,
    side_branch_depth: int = 1,
    num_fusion_layers: int = 1,
    side_branch_init: str = "copy",
    seed: int = 0,
) -> DpvrLlavaForConditionalGeneration:
    """Convert a loaded LLaVA model in memory (for tests and notebooks; `convert_checkpoint` streams files)."""
    config = build_dpvr_config(
        source.config,
        split_layer=split_layer,
        side_branch_depth=side_branch_depth,
        num_fusion_layers=num_fusion_layers,
        side_branch_init=side_branch_init,
    )
    config._attn_implementation = source.config._attn_implementation
    state = dict(source.state_dict())
    source_layers = side_branch_source_layers(config)
    if source_layers is None:
        state.update(random_side_branch_state(config, seed=seed))
    else:
        for name in list(state):
            for key in side_branch_keys_for(name, source_layers):
                state[key] = state[name].clone()

    model = DpvrLlavaForConditionalGeneration(config).to(source.dtype)
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
