"""The three `torch.nn.Module` graphs that are exported to ONNX, built around a loaded dual-path model.

They compute what `DpvrLlavaForConditionalGeneration` computes, split the way optimum and
transformers.js split vision-language models: the vision encoder with the projector, the token
embedding, and the decoder with its KV cache. Only plain tensors cross the export boundary, so the
decoder takes and returns one key and one value tensor per language-model layer, never a Cache
object. It also takes the routing of the chunk (`text_index`, `image_index` and their masks, see
`routing.py`) as inputs instead of finding the image tokens itself.

The decoder builds its own additive float attention masks and is exported with eager attention, so a
fully masked query row (a padding position, an unused slot) gives a finite uniform average instead of
NaN, and the cached keys and values of such positions stay finite for later steps.
"""

import torch
from torch import nn


class VisionEncoderGraph(nn.Module):
    """`pixel_values` (n, c, h, w) to `image_features` (n, v, d): the vision tower, feature selection and projector."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.feature_layer = model.config.vision_feature_layer
        self.select_strategy = model.config.vision_feature_select_strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Mirrors `LlavaModel.get_image_features` without its final split into a Python list of
        # images, which `torch.export` cannot trace for a dynamic number of images.
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        selected = [outputs.hidden_states[layer] for layer in layers]
        if self.select_strategy == "default":
            selected = [states[:, 1:] for states in selected]
        return self.projector(torch.cat(selected, dim=-1))


class EmbedTokensGraph(nn.Module):
    """`input_ids` (b, t) to `inputs_embeds` (b, t, d)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.embed_tokens = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class PastKeyValues:
    """
    The minimal cache interface that a `transformers` attention layer calls: `update` appends the new
    keys and values of one layer to its past tensors and keeps the result as that layer's present.
    """

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        past_keys, past_values = self.past[layer_idx]
        keys = torch.cat([past_keys, key_states], dim=2)
        values = torch.cat([past_values, value_states], dim=2)
        self.present[layer_idx] = (keys, values)
        return keys, values


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, q, k) allowed pairs as a (b, 1, q, k) float mask: 0 where allowed, a large negative value elsewhere."""
    # Half the dtype's minimum, so that adding an attention score cannot overflow to -inf in fp16.
    blocked = torch.tensor(torch.finfo(dtype).min / 2, dtype=dtype, device=allowed.device)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), blocked)[:, None]


def causal_padding_mask(key_mask: torch.Tensor, num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """
    Mask of the last `num_queries` entries of a sequence over all of its `key_mask.shape[1]` entries:
    causal by cache index, and blocking keys where `key_mask` (b, k) is 0.
    """
    num_keys = key_mask.shape[1]
    key_index = torch.arange(num_keys, device=key_mask.device)
    query_index = torch.arange(num_queries, device=key_mask.device) + (num_keys - num_queries)
    causal = key_index[None, :] <= query_index[:, None]
    return additive_mask(causal[None] & key_mask.bool()[:, None, :], dtype)


class RoutedDecoderGraph(nn.Module):
    """
    The dual-path decoder over one chunk of tokens with a KV cache, returning logits and the new cache.

    Inputs (`routing.py` describes the routing ones):

    - `inputs_embeds` (b, t, d), with the image features already in place;
    - `attention_mask` (b, p + t) and `position_ids` (b, t);
    - `text_index` (b, x) and `text_attention_mask` (b, q + x), the slot mask of the deep layers'
      cache followed by the chunk's text slots;
    - `image_index` and `image_attention_mask` (n, v);
    - `past_key_values`, a flat list `[key_0, value_0, key_1, ...]` of (b, h, p, e) tensors for
      shared and fusion layers and (b, h, q, e) tensors for deep layers.

    Returns `logits` (b, t, vocab) and the present keys and values in the same flat order, each with
    the chunk appended.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        config = model.config
        self.language_model = model.model.language_model
        self.side_branch = model.model.side_branch
        self.lm_head = model.lm_head
        self.split_layer = config.split_layer
        self.fusion_start = config.fusion_layers.start
        self.num_layers = config.text_config.num_hidden_layers

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        text_index: torch.Tensor,
        text_attention_mask: torch.Tensor,
        image_index: torch.Tensor,
        image_attention_mask: torch.Tensor,
        past_key_values: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        layers = self.language_model.layers
        batch_size, num_tokens, hidden_size = inputs_embeds.shape
        cache = PastKeyValues(
            {layer: (past_key_values[2 * layer], past_key_values[2 * layer + 1]) for layer in range(self.num_layers)}
        )

        # 1. Shared stack: every position, causal over the cache, padding excluded.
        full_mask = causal_padding_mask(attention_mask, num_tokens, inputs_embeds.dtype)
        position_embeddings = self.language_model.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden_states = inputs_embeds
        for layer in layers[: self.split_layer]:
            hidden_states = self._run_layer(layer, hidden_states, full_mask, position_ids, position_embeddings, cache)

        # 2. Side branch over one row per image. Masked entries read and write a scratch row at flat
        # index b * t, which is dropped afterwards, so unused entries never touch real positions.
        scratch_index = batch_size * num_tokens
        image_valid = image_attention_mask.bool()
        image_index = torch.where(image_valid, image_index, torch.full_like(image_index, scratch_index))
        image_states = self._run_side_branch(hidden_states, position_ids, image_index, image_valid)

        # 3. Deep text stack over the compact text slots.
        slot_index = text_index.unsqueeze(-1).expand(-1, -1, hidden_size)
        text_states = self._run_deep_stack(hidden_states, position_ids, text_index, text_attention_mask, cache)
        num_slots = text_index.shape[1]
        text_valid = text_attention_mask[:, text_attention_mask.shape[1] - num_slots :].bool().unsqueeze(-1)
        # Unused slots carry the shared output back unchanged; image positions are overwritten below.
        text_states = torch.where(text_valid, text_states, torch.gather(hidden_states, 1, slot_index))
        fused = hidden_states.scatter(1, slot_index, text_states)

        flat = torch.cat([fused.reshape(scratch_index, hidden_size), fused.new_zeros(1, hidden_size)])
        flat = flat.index_put((image_index.reshape(-1),), image_states.reshape(-1, hidden_size))
        hidden_states = flat[:scratch_index].reshape(batch_size, num_tokens, hidden_size)

        # 4. Fusion layers: every position again, with the shared mask.
        for layer in layers[self.fusion_start :]:
            hidden_states = self._run_layer(layer, hidden_states, full_mask, position_ids, position_embeddings, cache)

        logits = self.lm_head(self.language_model.norm(hidden_states))
        present = []
        for layer in range(self.num_layers):
            present.extend(cache.present[layer])
        return (logits, *present)

    @staticmethod
    def _run_layer(layer, hidden_states, mask, position_ids, position_embeddings, cache):
        return layer(
            hidden_states,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
        )

    def _run_side_branch(self, hidden_states, position_ids, image_index, image_valid) -> torch.Tensor:
        batch_size, num_tokens, hidden_size = hidden_states.shape
        flat_states = torch.cat([hidden_states.reshape(-1, hidden_size), hidden_states.new_zeros(1, hidden_size)])
        flat_positions = torch.cat([position_ids.reshape(-1), position_ids.new_zeros(1)])
        image_states = flat_states[image_index]
        image_positions = flat_positions[image_index]
        image_mask = causal_padding_mask(image_valid, image_index.shape[1], hidden_states.dtype)
        position_embeddings = self.language_model.rotary_emb(image_states, position_ids=image_positions)
        for layer in self.side_branch.layers:
            image_states = self._run_layer(layer, image_states, image_mask, image_positions, position_embeddings, None)
        return image_states

    def _run_deep_stack(self, hidden_states, position_ids, text_index, text_attention_mask, cache) -> torch.Tensor:
        hidden_size = hidden_states.shape[-1]
        text_states = torch.gather(hidden_states, 1, text_index.unsqueeze(-1).expand(-1, -1, hidden_size))
        text_positions = torch.gather(position_ids, 1, text_index)
        text_mask = causal_padding_mask(text_attention_mask, text_index.shape[1], hidden_states.dtype)
        position_embeddings = self.language_model.rotary_emb(text_states, position_ids=text_positions)
        for layer in self.language_model.layers[self.split_layer : self.fusion_start]:
            text_states = self._run_layer(layer, text_states, text_mask, text_positions, position_embeddings, cache)
        return text_states


__all__ = [
    "EmbedTokensGraph",
    "PastKeyValues",
    "RoutedDecoderGraph",
    "VisionEncoderGraph",
    "additive_mask",
    "causal_padding_mask",
]
