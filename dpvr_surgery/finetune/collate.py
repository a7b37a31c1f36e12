"""Batch encoded samples: right padding, -100 labels on padding, and the images of all rows in row order."""

import torch

from .data import IGNORE_INDEX, EncodedSample


def collate_samples(samples: list[EncodedSample], pad_token_id: int) -> dict[str, torch.Tensor | None]:
    """Pad a list of samples on the right into one batch.

    Returns `input_ids` and `attention_mask` (b, t), and `labels` (b, t) with -100 on padding when the
    samples have labels. `loss_mask` (b, t) is false on padding, or None when no sample has one.
    `pixel_values` (n, 3, h, w) holds the images of row 0 first, then row 1, and so on, because LLaVA
    models fill image tokens in that order. It is None when no row has an image.
    """
    width = max(sample.input_ids.shape[0] for sample in samples)
    batch_size = len(samples)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    loss_mask = torch.zeros((batch_size, width), dtype=torch.bool)

    for row, sample in enumerate(samples):
        length = sample.input_ids.shape[0]
        input_ids[row, :length] = sample.input_ids
        attention_mask[row, :length] = 1
        if sample.labels is not None:
            labels[row, :length] = sample.labels
        if sample.loss_mask is not None:
            loss_mask[row, :length] = sample.loss_mask

    images = [sample.pixel_values for sample in samples if sample.pixel_values is not None]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels if any(sample.labels is not None for sample in samples) else None,
        "loss_mask": loss_mask if any(sample.loss_mask is not None for sample in samples) else None,
        "pixel_values": torch.cat(images, dim=0) if images else None,
        "indices": torch.tensor([sample.index for sample in samples], dtype=torch.long),
    }
