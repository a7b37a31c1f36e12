"""Measure the lenses on a LLaVA model that is loaded whole (on one device or spread by accelerate)."""

import logging

import torch
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration

from .batches import Batch
from .lenses import LensMeasurements, LogitHead, SaturationLenses

logger = logging.getLogger(__name__)


def measure_loaded_model(
    model: LlavaForConditionalGeneration,
    batches: list[Batch],
    sample_ids: list[str],
    *,
    show_progress: bool = True,
) -> LensMeasurements:
    """Run every batch through `model` with the lens hooks attached; return the per-sample measurements.

    The forward pass stops at the last decoder layer's hidden states, so no logits are computed for
    the whole sequence. The logit lens applies the final norm and `lm_head` to the image tokens it reads.
    """
    language_model = model.model.language_model
    lenses = SaturationLenses(sample_ids, len(language_model.layers))
    head = LogitHead(language_model.norm, model.lm_head)
    input_device = model.get_input_embeddings().weight.device
    vision_dtype = next(model.model.vision_tower.parameters()).dtype

    progress = tqdm(total=len(sample_ids), desc="Analysing samples", unit="sample", disable=not show_progress)
    lenses.attach(language_model.layers)
    try:
        with progress, torch.no_grad():
            for batch in batches:
                progress.set_postfix_str(f"samples {batch.sample_indices[0] + 1}-{batch.sample_indices[-1] + 1}")
                with lenses.collect(batch):
                    model.model(
                        input_ids=batch.input_ids.to(input_device),
                        pixel_values=batch.pixel_values.to(input_device, vision_dtype),
                        attention_mask=batch.attention_mask.to(input_device),
                        position_ids=batch.position_ids.to(input_device),
                        use_cache=False,
                    )
                lenses.compute_logit_lens(head)
                progress.update(len(batch.sample_indices))
                logger.debug("Measured samples %s", batch.sample_indices)
    finally:
        lenses.remove()
    return lenses.finalize()
