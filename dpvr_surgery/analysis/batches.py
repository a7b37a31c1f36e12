"""Turn calibration samples into token ids and pixel values, and group them into right-padded batches.

Each batch carries the token classes that the lenses need: image positions, text query positions
(text tokens after the first image token) and the image positions that the logit lens reads.
Padding goes on the right, so the real tokens of a row keep the positions and the causal context
they have when the row runs alone.
"""

import logging
from dataclasses import dataclass

import torch

from ..errors import InvalidInputError
from .data import CalibrationSample

logger = logging.getLogger(__name__)

# The prompt format of LLaVA-1.5, used when the processor has no chat template.
FALLBACK_USER_PREFIX = "USER: "
FALLBACK_ASSISTANT_PREFIX = " ASSISTANT:"


@dataclass
class EncodedSample:
    """One sample as model inputs: token ids (t,) and the pixel values of its images (n, c, h, w)."""

    sample_id: str
    input_ids: torch.Tensor
    pixel_values: torch.Tensor


@dataclass
class Batch:
    """Right-padded model inputs of several samples, with the token classes of every row."""

    sample_indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_mask: torch.Tensor
    text_query_mask: torch.Tensor
    lens_positions: list[torch.Tensor]

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions 0..t-1 of every row: right padding leaves the real tokens where they are alone."""
        length = self.input_ids.shape[1]
        return torch.arange(length).unsqueeze(0).expand(self.input_ids.shape[0], length)


def render_prompt(processor, sample: CalibrationSample) -> str:
    """Render a sample through the processor's chat template, or in LLaVA-1.5's format without one."""
    messages = sample.messages()
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=sample.answer is None)

    image_token = getattr(processor, "image_token", "<image>")
    parts = [f"{image_token}\n" if item["type"] == "image" else item["text"] for item in sample.content]
    prompt = FALLBACK_USER_PREFIX + "".join(parts) + FALLBACK_ASSISTANT_PREFIX
    if sample.answer:
        prompt += " " + sample.answer
    return prompt


def encode_samples(
    processor,
    samples: list[CalibrationSample],
    *,
    image_token_id: int,
    image_tokens_per_image: int,
    max_seq_length: int,
) -> list[EncodedSample]:
    """Tokenize every sample and check its image-token count; shorten or drop the ones that are too long.

    A sample longer than `max_seq_length` is cut at the end when the cut leaves its images whole and
    at least one text token after the first image. Otherwise it is dropped, because attention mass
    needs text queries after the image. Dropped samples are counted in one warning.
    Raises InvalidInputError when no sample remains or a sample's image-token count is wrong.
    """
    if getattr(processor, "chat_template", None) is None:
        logger.info("The processor has no chat template: prompts use LLaVA-1.5's 'USER: ... ASSISTANT:' format")

    encoded = []
    dropped = []
    for sample in samples:
        inputs = processor(images=sample.images, text=render_prompt(processor, sample), return_tensors="pt")
        input_ids = inputs["input_ids"][0]
        _check_image_tokens(input_ids, sample, image_token_id, image_tokens_per_image)
        input_ids = _fit_length(input_ids, image_token_id, max_seq_length)
        if input_ids is None or not _text_query_mask(input_ids, image_token_id).any():
            dropped.append(sample.sample_id)
            continue
        encoded.append(EncodedSample(sample.sample_id, input_ids, inputs["pixel_values"]))

    if dropped:
        logger.warning(
            "Dropped %d sample(s) without a text token after the first image within --max-seq-length %d: %s",
            len(dropped),
            max_seq_length,
            ", ".join(dropped[:5]),
        )
    if not encoded:
        raise InvalidInputError(
            f"No calibration sample fits --max-seq-length {max_seq_length} with text after its image. Raise "
            "--max-seq-length (one image takes "
            f"{image_tokens_per_image} tokens) or use shorter prompts."
        )
    return encoded


def _check_image_tokens(input_ids: torch.Tensor, sample: CalibrationSample, image_token_id: int, per_image: int):
    found = int((input_ids == image_token_id).sum())
    expected = per_image * len(sample.images)
    if found != expected:
        raise InvalidInputError(
            f"Sample {sample.sample_id}: the processor produced {found} image tokens for {len(sample.images)} "
            f"image(s), but the model expects {per_image} per image ({expected}). Check that the processor "
            "files belong to this model (patch size, vision_feature_select_strategy)."
        )


def _fit_length(input_ids: torch.Tensor, image_token_id: int, max_seq_length: int) -> torch.Tensor | None:
    if input_ids.shape[0] <= max_seq_length:
        return input_ids
    image_positions = (input_ids == image_token_id).nonzero().flatten()
    if int(image_positions[-1]) + 1 >= max_seq_length:
        return None
    return input_ids[:max_seq_length]


def _text_query_mask(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Text positions after the first image token (the padding mask is applied by the batch)."""
    is_image = input_ids == image_token_id
    after_first_image = torch.cumsum(is_image.long(), dim=-1) > 0
    return after_first_image & ~is_image


def lens_positions(image_mask: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """Return up to `max_tokens` image positions of one row, evenly spaced over its image tokens."""
    positions = image_mask.nonzero().flatten()
    if positions.numel() <= max_tokens:
        return positions
    picks = torch.linspace(0, positions.numel() - 1, steps=max_tokens).round().long()
    return positions[picks]


def make_batches(
    encoded: list[EncodedSample],
    *,
    batch_size: int,
    image_token_id: int,
    pad_token_id: int,
    logit_lens_tokens: int,
) -> list[Batch]:
    """Group encoded samples, in order, into right-padded batches of up to `batch_size` rows."""
    batches = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        length = max(row.input_ids.shape[0] for row in rows)
        input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : row.input_ids.shape[0]] = row.input_ids
            attention_mask[index, : row.input_ids.shape[0]] = 1

        real = attention_mask.bool()
        image_mask = (input_ids == image_token_id) & real
        batches.append(
            Batch(
                sample_indices=list(range(start, start + len(rows))),
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=torch.cat([row.pixel_values for row in rows]),
                image_mask=image_mask,
                text_query_mask=_text_query_mask(input_ids, image_token_id) & real,
                lens_positions=[lens_positions(image_mask[index], logit_lens_tokens) for index in range(len(rows))],
            )
        )
    return batches
