"""The dual-path model classes, registered with the `transformers` Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_dpvr_llava import SIDE_BRANCH_INITS, DpvrLlavaConfig
from .modeling_dpvr_llava import (
    DpvrCache,
    DpvrLlavaForConditionalGeneration,
    DpvrLlavaModel,
    DpvrLlavaPreTrainedModel,
    TokenRoutes,
    route_tokens,
)

AutoConfig.register(DpvrLlavaConfig.model_type, DpvrLlavaConfig, exist_ok=True)
AutoModel.register(DpvrLlavaConfig, DpvrLlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(DpvrLlavaConfig, DpvrLlavaForConditionalGeneration, exist_ok=True)

__all__ = [
    "SIDE_BRANCH_INITS",
    "DpvrCache",
    "DpvrLlavaConfig",
    "DpvrLlavaForConditionalGeneration",
    "DpvrLlavaModel",
    "DpvrLlavaPreTrainedModel",
    "TokenRoutes",
    "route_tokens",
]
