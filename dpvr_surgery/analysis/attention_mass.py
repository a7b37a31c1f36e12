"""Text-to-image attention mass of one attention layer, recomputed from the layer's own input.

The attention probabilities of text queries are rebuilt from the hidden states that enter the
attention module. The rebuild uses the module's own `q_proj` and `k_proj` (and `q_norm`/`k_norm`
where the model has them), the rotary embedding function of the module's modeling file and its
`scaling`, then a causal softmax over the real keys. So it needs no attention map from the kernel
the model runs (eager, sdpa or flash). It keeps only the rows of the text queries in memory:
heads x text queries x keys, in chunks of `QUERY_CHUNK` queries.
"""

import sys

import torch
from torch import nn

from ..errors import InvalidInputError
from .batches import Batch

QUERY_CHUNK = 256

# NOTE: the softmax covers every earlier key. Sliding-window attention (Mistral-style backbones with a
# window shorter than the sequence) and attention-logit soft-capping are not modelled.


def rotary_function(attention: nn.Module):
    """Return `apply_rotary_pos_emb` of the modeling file that defines `attention`'s class."""
    module = sys.modules.get(type(attention).__module__)
    function = getattr(module, "apply_rotary_pos_emb", None)
    required = ("q_proj", "k_proj", "head_dim", "scaling")
    if function is None or not all(hasattr(attention, name) for name in required):
        raise InvalidInputError(
            f"Unsupported attention module {type(attention).__name__}: the analysis recomputes queries and keys "
            "with the module's q_proj, k_proj, head_dim, scaling and its modeling file's apply_rotary_pos_emb, "
            "and this module lacks some of them. Use a LLaVA model whose language model is Llama-like "
            "(Llama, Mistral, Qwen2, ...)."
        )
    return function


def _project(projection: nn.Module, norm: nn.Module | None, hidden: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Project (1, n, d) hidden states to (1, heads, n, head_dim)."""
    states = projection(hidden).view(1, hidden.shape[1], -1, head_dim)
    if norm is not None:
        states = norm(states)
    return states.transpose(1, 2)


def _rotary_rows(position_embeddings: tuple[torch.Tensor, torch.Tensor], row: int, positions: torch.Tensor):
    cos, sin = position_embeddings
    source_row = row if cos.shape[0] > 1 else 0
    return cos[source_row, positions].unsqueeze(0), sin[source_row, positions].unsqueeze(0)


def text_to_image_attention_mass(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    batch: Batch,
) -> torch.Tensor:
    """Return, per batch row, the attention probability that text queries put on image keys.

    `hidden_states` (b, t, d) is the attention module's input (after the layer's input norm). For
    each text query after the first image, the softmax runs over the keys at or before the query
    that are not padding. The image keys' share is then averaged over query heads and text queries.
    """
    apply_rotary = rotary_function(attention)
    device = hidden_states.device
    query_norm = getattr(attention, "q_norm", None)
    key_norm = getattr(attention, "k_norm", None)
    masses = torch.zeros(hidden_states.shape[0], dtype=torch.float64)

    for row in range(hidden_states.shape[0]):
        queries = batch.text_query_mask[row].nonzero().flatten().to(device)
        key_length = int(queries.max()) + 1
        key_positions = torch.arange(key_length, device=device)

        query_states = _project(attention.q_proj, query_norm, hidden_states[row : row + 1, queries], attention.head_dim)
        cos, sin = _rotary_rows(position_embeddings, row, queries)
        # The rotary function rotates a query and a key tensor, so an empty slice fills the unused argument.
        query_states = apply_rotary(query_states, query_states[:, :0], cos, sin)[0].float()

        keys = _project(attention.k_proj, key_norm, hidden_states[row : row + 1, :key_length], attention.head_dim)
        cos, sin = _rotary_rows(position_embeddings, row, key_positions)
        keys = apply_rotary(keys[:, :0], keys, cos, sin)[1].float()
        # Grouped-query attention: each key head serves a group of consecutive query heads.
        keys = keys.repeat_interleave(query_states.shape[1] // keys.shape[1], dim=1)

        real_keys = batch.attention_mask[row, :key_length].to(device).bool()
        image_keys = batch.image_mask[row, :key_length].to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, queries.numel(), QUERY_CHUNK):
            chunk = slice(start, start + QUERY_CHUNK)
            scores = torch.matmul(query_states[:, :, chunk], keys.transpose(-1, -2)) * attention.scaling
            allowed = (key_positions.unsqueeze(0) <= queries[chunk].unsqueeze(1)) & real_keys.unsqueeze(0)
            scores = scores.masked_fill(~allowed, float("-inf"))
            probabilities = torch.softmax(scores, dim=-1)
            total += probabilities[..., image_keys].sum(dim=-1).sum(dtype=torch.float64)
        masses[row] = (total / (query_states.shape[1] * queries.numel())).cpu()
    return masses
