"""Check a converted folder against its source: text-only logits must match, image prompts must run."""

import gc
import logging
from pathlib import Path

import psutil
import torch
from transformers import LlavaForConditionalGeneration

from .errors import VerificationError
from .modeling import DpvrLlavaForConditionalGeneration

logger = logging.getLogger(__name__)

NUM_CHECK_TOKENS = 16
# Text-only rows run the same layers on the same tokens in both models, so the logits agree to
# rounding; half-precision rounding differs more between kernels.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def verify_conversion(source: Path, converted: Path, *, dtype: torch.dtype | None = None) -> dict:
    """Compare text-only logits of `converted` with `source` and run one image prompt; return the result.

    The two models are loaded one after the other, so peak memory is one model. The check is skipped
    (and the result records why) when the larger model does not fit in the available memory.
    """
    needed = _weight_bytes(converted)
    available = psutil.virtual_memory().available
    if needed * 1.3 > available:
        reason = f"the model needs about {needed / 1e9:.1f} GB and {available / 1e9:.1f} GB are free"
        logger.warning("Skipping the logit check: %s. Rerun on a larger machine or pass --no-verify.", reason)
        return {"skipped": True, "reason": reason}

    load_dtype = dtype if dtype is not None else "auto"
    source_model = LlavaForConditionalGeneration.from_pretrained(source, dtype=load_dtype).eval()
    input_ids = _check_input_ids(source_model.config)
    with torch.no_grad():
        expected = source_model(input_ids=input_ids).logits.float()
    model_dtype = source_model.dtype
    del source_model
    gc.collect()

    model = DpvrLlavaForConditionalGeneration.from_pretrained(converted, dtype=model_dtype).eval()
    with torch.no_grad():
        actual = model(input_ids=input_ids, use_cache=False).logits.float()
        image_logits = _image_prompt_logits(model)
    del model
    gc.collect()

    max_abs_diff = float((actual - expected).abs().max())
    atol = ATOL.get(model_dtype, 1e-5)
    result = {
        "skipped": False,
        "dtype": str(model_dtype).removeprefix("torch."),
        "num_tokens": NUM_CHECK_TOKENS,
        "max_abs_diff": max_abs_diff,
        "atol": atol,
        "image_prompt_finite": bool(torch.isfinite(image_logits).all()),
    }
    if max_abs_diff > atol:
        raise VerificationError(
            f"Text-only logits of the converted model differ from the source by {max_abs_diff:.3g} (tolerance "
            f"{atol:g}, {result['dtype']}): the conversion changed weights it must keep. Nothing was written."
        )
    if not result["image_prompt_finite"]:
        raise VerificationError("The converted model gave non-finite logits for an image prompt. Nothing was written.")
    logger.info("Verified: text-only logits match the source's (max abs diff %.3g)", max_abs_diff)
    return result


def _weight_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


def _check_input_ids(config) -> torch.Tensor:
    """Deterministic text tokens that avoid the image and padding tokens."""
    vocab_size = config.text_config.vocab_size
    excluded = {config.image_token_id, config.text_config.pad_token_id}
    tokens = []
    candidate = 1
    while len(tokens) < NUM_CHECK_TOKENS:
        token = (candidate * 7919) % vocab_size
        if token not in excluded:
            tokens.append(token)
        candidate += 1
    return torch.tensor([tokens])


def _image_prompt_logits(model: DpvrLlavaForConditionalGeneration) -> torch.Tensor:
    config = model.config
    vision_config = config.vision_config
    image_size = vision_config.image_size
    num_image_tokens = model.model.get_image_features(
        pixel_values=torch.zeros(1, vision_config.num_channels, image_size, image_size, dtype=model.dtype),
        return_dict=True,
    ).pooler_output[0].shape[0]
    text = _check_input_ids(config)[0, :4].tolist()
    input_ids = torch.tensor([text[:2] + [config.image_token_id] * num_image_tokens + text[2:]])
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, vision_config.num_channels, image_size, image_size, generator=generator)
    return model(input_ids=input_ids, pixel_values=pixel_values.to(model.dtype), use_cache=False).logits
