"""Routing inputs of the exported decoder graph, computed with numpy from token ids and masks.

The routed decoder graph does not find image tokens itself: gathering from a boolean mask inside
the graph makes the shapes data-dependent, which `torch.export` cannot trace through the attention
code of `transformers`. The caller passes the positions instead, computed here exactly as
`route_tokens` in the model code computes them:

- `text_index` (b, x): per row, the chunk positions of its text tokens in order, then unused slots
  that point at other (non-text) positions of the row, each position at most once;
- `text_valid` (b, x): True for the slots that hold a text token;
- `image_index` (n, v): one row per image, the flat position `row * t + column` of each of its
  tokens in the (b, t) chunk; entries after an image's last token are unused;
- `image_attention_mask` (n, v): 1 for the entries that hold an image token.

A chunk always gets at least one text slot and one image row, because a decoder layer called with
zero tokens fails in PyTorch and in onnxruntime. A chunk without text gets one unused text slot, and
a chunk without images (every decode step) gets one fully masked image entry. The graph runs the
side branch on that entry and drops its output.
"""

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError


@dataclass
class ChunkRoutes:
    """Gather indices of the text and image tokens of one chunk, as the decoder graph takes them."""

    text_index: np.ndarray
    text_valid: np.ndarray
    image_index: np.ndarray
    image_attention_mask: np.ndarray


def position_ids_from_mask(full_mask: np.ndarray, num_new: int) -> np.ndarray:
    """Return the RoPE positions (b, num_new) of the last `num_new` tokens: a cumulative sum of the padding mask."""
    full_mask = full_mask.astype(bool)
    positions = np.cumsum(full_mask, axis=1, dtype=np.int64) - 1
    positions = np.where(full_mask, positions, 0)
    return positions[:, full_mask.shape[1] - num_new :]


def route_chunk(chunk_mask: np.ndarray, image_token_mask: np.ndarray, image_lengths: list[int]) -> ChunkRoutes:
    """
    Build the routing inputs of a chunk.

    `chunk_mask` (b, t) is True for non-padding positions, `image_token_mask` (b, t) for positions that
    hold image features, filled in row-major order by images of `image_lengths` tokens each.
    """
    chunk_mask = chunk_mask.astype(bool)
    image_token_mask = image_token_mask.astype(bool)
    text_mask = chunk_mask & ~image_token_mask

    num_text = text_mask.sum(axis=1)
    num_slots = max(int(num_text.max(initial=0)), 1)
    # A stable sort on "is not text" puts each row's text positions first, in order, and the other
    # positions after them, so every position appears once per row.
    order = np.argsort(~text_mask, axis=1, kind="stable")
    text_index = order[:, :num_slots].astype(np.int64)
    text_valid = np.arange(num_slots)[None, :] < num_text[:, None]

    if not image_lengths:
        empty_index = np.zeros((1, 1), dtype=np.int64)
        return ChunkRoutes(text_index, text_valid, empty_index, np.zeros((1, 1), dtype=np.int64))

    flat_positions = np.flatnonzero(image_token_mask.reshape(-1))
    longest = max(image_lengths)
    image_index = np.zeros((len(image_lengths), longest), dtype=np.int64)
    image_attention_mask = np.zeros((len(image_lengths), longest), dtype=np.int64)
    start = 0
    for row, length in enumerate(image_lengths):
        image_index[row, :length] = flat_positions[start : start + length]
        image_attention_mask[row, :length] = 1
        start += length
    return ChunkRoutes(text_index, text_valid, image_index, image_attention_mask)


def check_image_spans(image_token_mask: np.ndarray, image_lengths: list[int], image_token_id: int) -> None:
    """Raise InvalidInputError unless the image tokens of every row are filled by whole images."""
    num_tokens = int(image_token_mask.sum())
    num_features = sum(image_lengths)
    if num_tokens != num_features:
        raise InvalidInputError(
            f"Image tokens and image features do not match: the input holds {num_tokens} image tokens (id "
            f"{image_token_id}) but the {len(image_lengths)} image(s) give {num_features} features. Build the "
            "prompt with the model's processor, which expands each <image> placeholder to the right number of "
            "tokens, and pass one image per placeholder."
        )
    boundaries = {0, *np.cumsum(image_lengths).tolist()}
    row_ends = np.cumsum(image_token_mask.sum(axis=1)).tolist()
    for row, row_end in enumerate(row_ends):
        if row_end not in boundaries:
            raise InvalidInputError(
                f"Row {row} ends in the middle of an image: its image tokens do not add up to whole images of "
                f"{image_lengths[0]} tokens. Build each row with the processor."
            )


__all__ = ["ChunkRoutes", "check_image_spans", "position_ids_from_mask", "route_chunk"]
