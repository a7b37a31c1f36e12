"""Check that a model folder's weights match its config: every key present, none extra, shapes equal.

`transformers` 5 silently initialises weights that a folder lacks, so a folder that would load with
random weights must be caught before it is shipped. The check reads safetensors headers only and
builds the model on the meta device, so it costs no weight memory.
"""

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText

from .. import modeling  # noqa: F401  (registers the dual-path classes with the Auto classes)
from ..checkpoint import find_weight_files, list_tensor_names, normalize_llava_key
from ..errors import InvalidInputError

logger = logging.getLogger(__name__)

PREVIEW_LIMIT = 8


def model_key(name: str) -> str | None:
    """Return the current `transformers` key of a checkpoint tensor name, or None for a recomputed buffer.

    LLaVA keys in either llava-hf layout are normalised; other keys (the side branch) stay as they are.
    """
    try:
        return normalize_llava_key(name)
    except InvalidInputError:
        return name


def expected_weight_shapes(folder: Path) -> dict[str, torch.Size]:
    """Return the key and shape of every weight that the folder's model class loads from a checkpoint."""
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise InvalidInputError(
            f"Cannot read the config of {folder}: {error}. The folder must hold the config.json of a LLaVA or "
            "converted dual-path model."
        ) from error
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    text_config = getattr(config, "text_config", config)
    if getattr(config, "tie_word_embeddings", False) or getattr(text_config, "tie_word_embeddings", False):
        # A tied head is the embedding matrix; checkpoints leave it out.
        expected.pop("lm_head.weight", None)
    return expected


def found_weight_shapes(folder: Path) -> dict[str, torch.Size | None]:
    """Return the current key and shape of every tensor in the folder's weights (shape None for `.bin` files)."""
    files = find_weight_files(folder)
    found: dict[str, torch.Size | None] = {}
    if files.format == "safetensors":
        for file in files.files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    key = model_key(name)
                    if key is not None:
                        found[key] = torch.Size(handle.get_slice(name).get_shape())
        return found
    for name in list_tensor_names(files):
        key = model_key(name)
        if key is not None:
            found[key] = None
    return found


def check_weight_keys(folder: str | Path) -> dict:
    """Raise InvalidInputError unless the folder's weights load into its model with no missing or unexpected keys.

    Returns a summary with the number of tensors checked.
    """
    folder = Path(folder)
    expected = expected_weight_shapes(folder)
    found = found_weight_shapes(folder)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{key} {tuple(found[key])} (expected {tuple(expected[key])})"
        for key in set(expected) & set(found)
        if found[key] is not None and found[key] != expected[key]
    )
    if missing or unexpected or mismatched:
        parts = [f"The weights in {folder} do not match its config.json."]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_preview(missing)}.")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}.")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_preview(mismatched)}.")
        parts.append("Write the folder again with `dpvr-surgery convert` or `export safetensors`.")
        raise InvalidInputError(" ".join(parts))
    logger.debug("All %d weights of %s match its config", len(expected), folder)
    return {"tensors": len(expected)}


def _preview(items: list[str]) -> str:
    text = ", ".join(items[:PREVIEW_LIMIT])
    if len(items) > PREVIEW_LIMIT:
        text += f", ... and {len(items) - PREVIEW_LIMIT} more"
    return text


__all__ = ["check_weight_keys", "expected_weight_shapes", "found_weight_shapes", "model_key"]
