"""Measure the lenses layer by layer, reading one part of a safetensors checkpoint at a time.

For models larger than memory. The model is built with its parameters on the meta device (buffers
such as the rotary frequencies are real), and parts are filled from the checkpoint only while they
run:

1. vision tower and projector: image features of every sample, then freed;
2. token embeddings: the input hidden states of every batch (image features scattered in), then freed;
3. each decoder layer in turn: every batch runs through it with the lens hooks attached, then it is freed;
4. final norm and `lm_head`: the logit lens.

Peak memory is the largest of these parts plus the hidden states of every sample and the image
tokens the logit lens keeps (samples x layers x logit-lens tokens x hidden size x 4 bytes).
"""

import ctypes
import logging
import sys
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.masking_utils import create_causal_mask

from ..checkpoint import WeightFiles, find_weight_files, list_tensor_names, normalize_llava_key
from ..errors import InvalidInputError
from .batches import Batch
from .lenses import LensMeasurements, LogitHead, SaturationLenses

logger = logging.getLogger(__name__)

LANGUAGE_MODEL = "model.language_model"


class CheckpointParts:
    """A LLaVA model skeleton whose submodules are loaded from a safetensors checkpoint on request."""

    def __init__(self, path: Path, config: LlavaConfig, *, dtype: torch.dtype, device: torch.device):
        files = find_weight_files(path)
        if files.format != "safetensors":
            raise InvalidInputError(
                f"Layer-by-layer analysis reads safetensors files, but {path} has .bin weights only. Convert them "
                "to safetensors, or run the analysis without --sequential."
            )
        self.dtype = dtype
        self.device = device
        self._locations: dict[str, tuple[Path, str]] = {}
        for file in files.files:
            for name in list_tensor_names(WeightFiles(folder=files.folder, files=[file], format="safetensors")):
                key = normalize_llava_key(name)
                if key is not None:
                    self._locations[key] = (file, name)

        with init_empty_weights(include_buffers=False):
            self.model = LlavaForConditionalGeneration(config)
        self.model.eval()
        self._tied_head = "lm_head.weight" not in self._locations

    def load(self, module_name: str) -> torch.nn.Module:
        """Fill every parameter of the submodule `module_name` from the checkpoint and return the submodule."""
        module = self.model.get_submodule(module_name)
        keys = {name: f"{module_name}.{name}" for name, _ in module.named_parameters()}
        by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
        for name, key in keys.items():
            if key == "lm_head.weight" and self._tied_head:
                key = f"{LANGUAGE_MODEL}.embed_tokens.weight"
            if key not in self._locations:
                raise InvalidInputError(
                    f"Checkpoint tensor {key} not found: the weights do not match config.json. Check that the "
                    "download is complete."
                )
            file, source_name = self._locations[key]
            by_file[file].append((name, source_name))

        # Copies own their memory: a tensor that still points into the memory-mapped file made
        # torch.nn.functional.linear about 15x slower on CPU (torch 2.13, safetensors 0.8).
        state = {}
        for file, entries in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name, source_name in entries:
                    tensor = handle.get_tensor(source_name)
                    state[name] = tensor.to(device=self.device, dtype=self.dtype, copy=True)
                    del tensor
        module.load_state_dict(state, strict=False, assign=True)
        return module

    def unload(self, module: torch.nn.Module) -> None:
        """Free the parameters of a loaded submodule by moving them back to the meta device."""
        module.to("meta")
        release_freed_memory()


def release_freed_memory() -> None:
    """Return freed heap memory to the operating system (glibc only; elsewhere a no-op).

    glibc keeps freed blocks under its dynamic mmap threshold (up to 32 MB, so most weights of a
    vision tower) in the heap. Without a trim, the vision tower's 1.2 GB (llava-1.5-7b, fp32) stayed
    resident for the whole layer-by-layer run.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        logger.debug("malloc_trim is not available; freed memory stays with the allocator")


def measure_sequential(
    path: Path,
    config: LlavaConfig,
    batches: list[Batch],
    sample_ids: list[str],
    *,
    dtype: torch.dtype,
    device: torch.device,
    show_progress: bool = True,
) -> LensMeasurements:
    """Measure the lenses of the checkpoint at `path`, holding one part of the model in memory at a time."""
    parts = CheckpointParts(path, config, dtype=dtype, device=device)
    language_model = parts.model.model.language_model
    num_layers = config.text_config.num_hidden_layers

    image_features = _image_features(parts, batches, show_progress=show_progress)
    hidden = _input_embeddings(parts, batches, image_features)
    del image_features
    rotary = language_model.rotary_emb.to(device)
    masks = [_causal_mask(config, hidden[index], batch, device) for index, batch in enumerate(batches)]

    lenses = SaturationLenses(sample_ids, num_layers)
    progress = tqdm(total=num_layers, desc="Analysing layers", unit="layer", disable=not show_progress)
    with progress, torch.no_grad():
        for layer_index in range(num_layers):
            layer = parts.load(f"{LANGUAGE_MODEL}.layers.{layer_index}")
            lenses.attach_layer(layer_index, layer)
            try:
                for index, batch in enumerate(batches):
                    progress.set_postfix_str(
                        f"layer {layer_index + 1}/{num_layers}, sample {batch.sample_indices[-1] + 1}/{len(sample_ids)}"
                    )
                    position_ids = batch.position_ids.to(device)
                    with lenses.collect(batch):
                        output = layer(
                            hidden[index],
                            attention_mask=masks[index],
                            position_ids=position_ids,
                            position_embeddings=rotary(hidden[index], position_ids),
                        )
                    hidden[index] = output[0] if isinstance(output, tuple) else output
            finally:
                lenses.remove()
                parts.unload(layer)
            progress.update()
            logger.debug("Layer %d/%d done", layer_index + 1, num_layers)

    del hidden
    norm = parts.load(f"{LANGUAGE_MODEL}.norm")
    lm_head = parts.load("lm_head")
    lenses.compute_logit_lens(LogitHead(norm, lm_head))
    return lenses.finalize()


def _image_features(parts: CheckpointParts, batches: list[Batch], *, show_progress: bool) -> list[torch.Tensor]:
    """Return the projected image features of each batch, (images x tokens, hidden), in token order."""
    vision_tower = parts.load("model.vision_tower")
    projector = parts.load("model.multi_modal_projector")
    features = []
    with torch.no_grad():
        for batch in tqdm(batches, desc="Image features", unit="batch", disable=not show_progress, leave=False):
            output = parts.model.model.get_image_features(
                pixel_values=batch.pixel_values.to(parts.device, parts.dtype), return_dict=True
            )
            features.append(torch.cat(list(output.pooler_output), dim=0))
    parts.unload(vision_tower)
    parts.unload(projector)
    return features


def _input_embeddings(
    parts: CheckpointParts, batches: list[Batch], image_features: list[torch.Tensor]
) -> list[torch.Tensor]:
    embed_tokens = parts.load(f"{LANGUAGE_MODEL}.embed_tokens")
    hidden = []
    with torch.no_grad():
        for batch, features in zip(batches, image_features, strict=True):
            embeddings = embed_tokens(batch.input_ids.to(parts.device))
            image_mask = batch.image_mask.to(parts.device).unsqueeze(-1).expand_as(embeddings)
            hidden.append(embeddings.masked_scatter(image_mask, features.to(embeddings.dtype)))
    parts.unload(embed_tokens)
    return hidden


def _causal_mask(config: LlavaConfig, hidden: torch.Tensor, batch: Batch, device: torch.device):
    return create_causal_mask(
        config=config.text_config,
        inputs_embeds=hidden,
        attention_mask=batch.attention_mask.to(device),
        cache=None,
        position_ids=batch.position_ids.to(device),
    )
