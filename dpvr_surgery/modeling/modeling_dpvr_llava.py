"""DPVR-LF LLaVA: image tokens leave the deep decoder stack and rejoin the text at the last layers.

With `L` language-model layers, split layer `s`, side-branch depth `d_v` and `K` fusion layers, one
forward pass runs:

1. shared stack, layers `0 .. s-1`: every token, ordinary causal mask;
2. side branch, `d_v` new layers of the language model's own layer class: the image tokens only,
   each image attending causally to its own tokens, at their original positions;
3. deep text stack, layers `s .. L-K-1`: the text tokens only, gathered into a compact sequence
   (original RoPE positions, causal over text positions, padding excluded);
4. fusion, layers `L-K .. L-1`: every token again, image tokens from the side branch and text
   tokens from the deep stack, scattered back into their original order.

Image tokens therefore really skip layers `s .. L-K-1`: nothing computes them there.

The KV cache (`DpvrCache`) keeps every position for shared and fusion layers, text positions
only for deep layers, and nothing for side-branch layers.

This file is copied next to the weights of every converted model and loaded there with
`trust_remote_code=True`, so it imports only `torch` and `transformers`.

Shape legend: b batch rows, t tokens of the current chunk, d hidden size, n images in the chunk,
v tokens of the longest image, x compact text slots of the chunk, p cached text slots.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, LlavaForConditionalGeneration, LlavaModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.auto import AutoModel
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaModelOutputWithPast,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)

from .configuration_dpvr_llava import DpvrLlavaConfig


class DpvrCache(DynamicCache):
    """
    A `DynamicCache` whose layers hold different lengths: shared and fusion layers every position,
    deep text-only layers text positions only.

    Besides keys and values it stores `text_attention_mask` (b, p): True where a deep-layer slot
    holds a real text token. Rows of one chunk hold different numbers of text tokens, so a chunk
    leaves unused slots at the end of the shorter rows; they stay masked for every later step.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_attention_mask: torch.Tensor | None = None

    def append_text_mask(self, chunk_mask: torch.Tensor) -> torch.Tensor:
        """Append the slot mask (b, x) of a new chunk and return the mask of every cached slot (b, p + x)."""
        if self.text_attention_mask is None:
            self.text_attention_mask = chunk_mask
        else:
            self.text_attention_mask = torch.cat([self.text_attention_mask, chunk_mask.to(torch.bool)], dim=1)
        return self.text_attention_mask

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.text_attention_mask is not None:
            self.text_attention_mask = self.text_attention_mask.index_select(
                0, beam_idx.to(self.text_attention_mask.device)
            )

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.text_attention_mask is not None:
            self.text_attention_mask = self.text_attention_mask.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.text_attention_mask is not None:
            self.text_attention_mask = self.text_attention_mask[indices]

    def crop(self, tokens_to_remove: int) -> None:
        # Tokens removed by a crop are always recent text tokens (assisted decoding drafts), which
        # every layer holds, so each layer and the slot mask lose the same number of entries.
        super().crop(tokens_to_remove)
        if self.text_attention_mask is not None and tokens_to_remove < 0:
            self.text_attention_mask = self.text_attention_mask[:, :tokens_to_remove]

    def reset(self):
        super().reset()
        self.text_attention_mask = None


@dataclass
class TokenRoutes:
    """
    Where the tokens of one chunk go after the shared stack.

    `text_index` (b, x) lists, per row, the chunk positions of its text tokens in order, followed by
    unused slots where `text_valid` is False; it is None when every position of the chunk is text,
    so no gather is needed. `image_index` (n, v) holds flat positions into the (b * t) chunk, one
    image per row, with `image_valid` False after an image's last token; None without images.
    """

    text_index: torch.Tensor | None
    text_valid: torch.Tensor
    image_index: torch.Tensor | None
    image_valid: torch.Tensor | None

    @property
    def num_text_slots(self) -> int:
        return self.text_valid.shape[1]


def route_tokens(
    chunk_mask: torch.Tensor, image_token_mask: torch.Tensor | None, image_lengths: list[int] | None
) -> TokenRoutes:
    """
    Build the gather indices of the text and image tokens of a chunk.

    `chunk_mask` (b, t) is True for non-padding positions, `image_token_mask` (b, t) for positions
    that hold image features, filled in row-major order by images of `image_lengths` tokens each.
    """
    batch_size, num_tokens = chunk_mask.shape
    if image_token_mask is None and num_tokens == 1:
        # A decode step: the only position is the only slot, and a padding token stays masked
        # through `text_valid`. Returning early skips the device sync of the `.all()` below.
        return TokenRoutes(None, chunk_mask, None, None)
    if image_token_mask is None:
        text_mask = chunk_mask
    else:
        text_mask = chunk_mask & ~image_token_mask

    if bool(text_mask.all()):
        text_index = None
        text_valid = text_mask
    else:
        num_text = text_mask.sum(dim=1)
        num_slots = int(num_text.max())
        # A stable sort on "is not text" puts each row's text positions first, in order.
        order = torch.sort((~text_mask).to(torch.uint8), dim=1, stable=True).indices
        text_index = order[:, :num_slots]
        text_valid = torch.arange(num_slots, device=chunk_mask.device)[None, :] < num_text[:, None]

    if image_token_mask is None or not image_lengths:
        return TokenRoutes(text_index, text_valid, None, None)

    flat_positions = image_token_mask.reshape(-1).nonzero().squeeze(1)
    per_image = flat_positions.split(image_lengths)
    image_index = nn.utils.rnn.pad_sequence(per_image, batch_first=True)
    lengths = torch.tensor(image_lengths, device=chunk_mask.device)
    image_valid = torch.arange(image_index.shape[1], device=chunk_mask.device)[None, :] < lengths[:, None]
    return TokenRoutes(text_index, text_valid, image_index, image_valid)


def check_image_spans(image_token_mask: torch.Tensor, image_lengths: list[int], image_token_id: int) -> None:
    """Raise a ValueError unless the image tokens of every row are filled by whole images."""
    num_tokens = int(image_token_mask.sum())
    num_features = sum(image_lengths)
    if num_tokens != num_features:
        raise ValueError(
            f"Image tokens and image features do not match: the input holds {num_tokens} image tokens (id "
            f"{image_token_id}) but the {len(image_lengths)} image(s) give {num_features} features "
            f"({', '.join(str(n) for n in image_lengths)} per image). Build the prompt with the model's "
            "processor, which expands each <image> placeholder to the right number of tokens, and pass one "
            "image per placeholder."
        )
    image_boundaries = {0, *torch.tensor(image_lengths).cumsum(0).tolist()}
    row_ends = image_token_mask.sum(dim=1).cumsum(0).tolist()
    for row, row_end in enumerate(row_ends):
        if row_end not in image_boundaries:
            raise ValueError(
                f"Row {row} ends in the middle of an image: its image tokens do not add up to whole images "
                f"({', '.join(str(n) for n in image_lengths)} tokens per image). Build each row with the processor."
            )


class DpvrSideBranch(nn.Module):
    """The new decoder layers that carry image tokens past the deep text stack."""

    def __init__(self, config: DpvrLlavaConfig, layer_class: type[nn.Module]):
        super().__init__()
        text_config = config.text_config
        self.layers = nn.ModuleList(
            [layer_class(text_config, config.split_layer + i) for i in range(config.side_branch_depth)]
        )


class DpvrLlavaPreTrainedModel(LlavaPreTrainedModel):
    config: DpvrLlavaConfig
    config_class = DpvrLlavaConfig
    # Routing, gather and scatter are written for eager, sdpa and flash attention; flex attention
    # and compilation are untested with ragged routes.
    _supports_flex_attn = False
    _can_compile_fullgraph = False


class DpvrLlavaModel(DpvrLlavaPreTrainedModel, LlavaModel):
    """LLaVA base model (vision tower, projector, language model) with a side branch for image tokens."""

    def __init__(self, config: DpvrLlavaConfig):
        DpvrLlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self._check_text_backbone()
        layer_class = type(self.language_model.layers[0])
        self.side_branch = DpvrSideBranch(config, layer_class)
        self.post_init()

    def _check_text_backbone(self) -> None:
        for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(self.language_model, name):
                raise ValueError(
                    f"The language model {type(self.language_model).__name__} has no `{name}`: DPVR routing drives "
                    "the decoder layers, rotary embedding and norm of a Llama-style backbone (Llama, Mistral, Qwen2)."
                )
        layer_types = getattr(self.config.text_config, "layer_types", None) or []
        unsupported = sorted({kind for kind in layer_types if kind != "full_attention"})
        if unsupported:
            raise ValueError(
                f"The language model has layers of type {', '.join(unsupported)}; DPVR routing supports "
                "full-attention layers only, because a window over compacted text slots would not match the "
                "original window over positions."
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> LlavaModelOutputWithPast:
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("Pass the cache as `cache` or as `past_key_values`, not both.")
            cache = past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(flag, None):
                raise ValueError(
                    f"{flag}=True is not supported by the dual-path model, because image and text tokens run "
                    "through different layers; analyse the source model instead (`dpvr-surgery analyze`)."
                )
        kwargs.pop("return_dict", None)

        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        inputs_embeds, image_token_mask, image_outputs, image_lengths = self._merge_image_features(
            input_ids,
            inputs_embeds,
            pixel_values,
            vision_feature_layer,
            vision_feature_select_strategy,
            image_sizes,
            kwargs.pop("mm_encoder_outputs", None),
        )

        use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        if self.language_model.gradient_checkpointing and self.training:
            use_cache = False
        cache = self._prepare_cache(cache, use_cache)

        hidden_states = self._run_decoder(
            inputs_embeds, attention_mask, position_ids, cache, image_token_mask, image_lengths, **kwargs
        )
        return LlavaModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, image_outputs=image_outputs)

    def _merge_image_features(
        self,
        input_ids,
        inputs_embeds,
        pixel_values,
        vision_feature_layer,
        vision_feature_select_strategy,
        image_sizes,
        mm_encoder_outputs,
    ):
        """Put the projected image features into the embeddings; return them with the image token mask."""
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("Pass either pixel_values or mm_encoder_outputs, not both.")
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                return_dict=True,
            )
        if image_outputs is None:
            return inputs_embeds, None, None, None

        per_image = image_outputs.pooler_output
        image_lengths = [int(features.shape[0]) for features in per_image]
        image_features = torch.cat(list(per_image), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        if input_ids is not None:
            image_token_mask = input_ids == self.config.image_token_id
        else:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            )
            image_token_mask = (inputs_embeds == image_embedding).all(-1)
        check_image_spans(image_token_mask, image_lengths, self.config.image_token_id)
        inputs_embeds = inputs_embeds.masked_scatter(image_token_mask.unsqueeze(-1), image_features)
        return inputs_embeds, image_token_mask, image_outputs, image_lengths

    def _prepare_cache(self, cache: Cache | None, use_cache: bool) -> DpvrCache | None:
        if not use_cache:
            return None
        if cache is None:
            return DpvrCache(config=self.config.text_config)
        if isinstance(cache, DpvrCache):
            return cache
        if isinstance(cache, DynamicCache) and cache.get_seq_length() == 0:
            # `generate()` and users create a plain DynamicCache; an empty one is replaced, and
            # `generate()` continues with the cache returned in the output.
            return DpvrCache(config=self.config.text_config)
        raise ValueError(
            f"A {type(cache).__name__} that already holds tokens cannot continue a dual-path model, because its "
            "deep layers must hold text positions only. Continue from the `cache` that this model returned, or "
            "start with an empty DynamicCache."
        )

    def _run_decoder(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: DpvrCache | None,
        image_token_mask: torch.Tensor | None,
        image_lengths: list[int] | None,
        **kwargs,
    ) -> torch.Tensor:
        """Run the shared stack, the side branch, the deep text stack and the fusion layers; return normed states."""
        language_model = self.language_model
        text_config = self.config.text_config
        layers = language_model.layers
        batch_size, num_tokens, _ = inputs_embeds.shape
        device = inputs_embeds.device
        past_length = cache.get_seq_length() if cache is not None else 0

        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be 2D (batch, past + new tokens), got shape {tuple(attention_mask.shape)}: "
                "the dual-path model builds its own masks for each group of layers."
            )
        full_mask = attention_mask
        if full_mask is None:
            full_mask = torch.ones(batch_size, past_length + num_tokens, dtype=torch.bool, device=device)
        full_mask = full_mask.to(device=device, dtype=torch.bool)
        chunk_mask = full_mask[:, -num_tokens:]
        position_ids = self._position_ids(position_ids, full_mask, batch_size, num_tokens, past_length, device)

        # 1. Shared stack: every position, ordinary causal mask.
        shared_mask = create_causal_mask(
            config=text_config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            layer_idx=0,
        )
        position_embeddings = language_model.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden_states = inputs_embeds
        for layer in layers[: self.config.split_layer]:
            hidden_states = layer(
                hidden_states,
                attention_mask=shared_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
                **kwargs,
            )

        routes = route_tokens(chunk_mask, image_token_mask, image_lengths)
        fused = hidden_states
        # (b * t, d): one row per chunk position, for the image gather and scatter.
        flat_states = hidden_states.reshape(batch_size * num_tokens, -1)

        # 2. Side branch: each image alone, no cache.
        if routes.image_index is not None:
            image_states = self._run_side_branch(flat_states, position_ids, routes, **kwargs)

        # 3. Deep text stack: text positions only.
        if routes.num_text_slots > 0:
            text_states = self._run_deep_stack(
                hidden_states, position_ids, routes, cache, shared_position_embeddings=position_embeddings, **kwargs
            )
            if routes.text_index is None:
                fused = text_states
            else:
                # Unused slots map to non-text positions; they carry the shared output back unchanged,
                # and image positions are overwritten below.
                index = routes.text_index.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
                shared_at_slots = torch.gather(hidden_states, 1, index)
                text_states = torch.where(routes.text_valid.unsqueeze(-1), text_states, shared_at_slots)
                fused = hidden_states.scatter(1, index, text_states)

        if routes.image_index is not None:
            flat_fused = fused.reshape(batch_size * num_tokens, -1)
            valid = routes.image_valid
            flat_fused = flat_fused.index_put((routes.image_index[valid],), image_states[valid])
            fused = flat_fused.reshape(batch_size, num_tokens, -1)

        # 4. Fusion: every position again. Layer 0 and the fusion layers cache the same positions,
        # so the shared mask fits.
        hidden_states = fused
        for layer in layers[self.config.fusion_layers.start :]:
            hidden_states = layer(
                hidden_states,
                attention_mask=shared_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        return language_model.norm(hidden_states)

    @staticmethod
    def _position_ids(position_ids, full_mask, batch_size, num_tokens, past_length, device) -> torch.Tensor:
        """Per-row RoPE positions (b, t): a cumulative sum of the padding mask, as `generate()` computes them."""
        if position_ids is not None:
            return position_ids.expand(batch_size, -1)
        positions = full_mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(~full_mask, 0)
        return positions[:, -num_tokens:].to(device)

    def _run_side_branch(self, flat_states, position_ids, routes: TokenRoutes, **kwargs) -> torch.Tensor:
        """Run the side-branch layers over one row per image; return states (n, v, d)."""
        image_states = flat_states[routes.image_index]
        image_positions = position_ids.reshape(-1)[routes.image_index]
        image_mask = create_causal_mask(
            config=self.config.text_config,
            inputs_embeds=image_states,
            attention_mask=routes.image_valid,
            cache=None,
        )
        position_embeddings = self.language_model.rotary_emb(image_states, position_ids=image_positions)
        for layer in self.side_branch.layers:
            image_states = layer(
                image_states,
                attention_mask=image_mask,
                position_ids=image_positions,
                cache=None,
                use_cache=False,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        return image_states

    def _run_deep_stack(
        self,
        hidden_states,
        position_ids,
        routes: TokenRoutes,
        cache: DpvrCache | None,
        shared_position_embeddings=None,
        **kwargs,
    ) -> torch.Tensor:
        """Run the deep text-only layers over the compact text slots; return states (b, x, d).

        Without a gather the slots are the chunk positions, so the shared stack's rotary embeddings
        (`shared_position_embeddings`) are reused.
        """
        position_embeddings = None
        if routes.text_index is None:
            text_states = hidden_states
            text_positions = position_ids
            position_embeddings = shared_position_embeddings
        else:
            index = routes.text_index.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
            text_states = torch.gather(hidden_states, 1, index)
            text_positions = torch.gather(position_ids, 1, routes.text_index)

        slot_mask = routes.text_valid
        if cache is not None:
            slot_mask = cache.append_text_mask(routes.text_valid)
        first_deep = self.config.split_layer
        text_mask = create_causal_mask(
            config=self.config.text_config,
            inputs_embeds=text_states,
            attention_mask=slot_mask,
            cache=cache,
            layer_idx=first_deep,
        )
        if position_embeddings is None:
            position_embeddings = self.language_model.rotary_emb(text_states, position_ids=text_positions)
        for layer in self.language_model.layers[first_deep : self.config.fusion_layers.start]:
            text_states = layer(
                text_states,
                attention_mask=text_mask,
                position_ids=text_positions,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        return text_states


class DpvrLlavaForConditionalGeneration(DpvrLlavaPreTrainedModel, LlavaForConditionalGeneration):
    """DPVR-LF LLaVA with a language-modelling head; loads and generates like `LlavaForConditionalGeneration`."""

    def __init__(self, config: DpvrLlavaConfig):
        DpvrLlavaPreTrainedModel.__init__(self, config)
        self.model = DpvrLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> LlavaCausalLMOutputWithPast:
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            use_cache=use_cache,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=num_items_in_batch,
            )
        return LlavaCausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, image_outputs=outputs.image_outputs
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # NOTE: overrides a private `generate()` hook. The upstream version repeats each image
        # `expand_size` times in a row, which hands a row with two images the wrong pair of images
        # once beams or return sequences expand it; here each row's own images repeat together.
        pixel_values = model_kwargs.pop("pixel_values", None)
        image_sizes = model_kwargs.pop("image_sizes", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None and expand_size > 1:
            order = expanded_image_order(input_ids, self.config.image_token_id, pixel_values.shape[0], expand_size)
            pixel_values = pixel_values[order]
            image_sizes = image_sizes[order] if image_sizes is not None else None
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        if image_sizes is not None:
            model_kwargs["image_sizes"] = image_sizes
        return input_ids, model_kwargs


def expanded_image_order(
    expanded_input_ids: torch.Tensor, image_token_id: int, num_images: int, expand_size: int
) -> torch.Tensor:
    """Return the image indices for rows that `generate()` repeated `expand_size` times each."""
    counts = (expanded_input_ids[::expand_size] == image_token_id).sum(dim=1).tolist()
    total = sum(counts)
    tokens_per_image = total // num_images if num_images else 0
    if num_images == 0 or total % num_images or any(count % tokens_per_image for count in counts):
        raise ValueError(
            f"Cannot assign {num_images} image(s) to rows holding {counts} image tokens: every image must fill "
            "the same number of tokens to expand rows for beam search or several return sequences."
        )
    order = []
    first = 0
    for count in counts:
        images = list(range(first, first + count // tokens_per_image))
        order += images * expand_size
        first += len(images)
    return torch.tensor(order, dtype=torch.long, device=expanded_input_ids.device)


__all__ = [
    "DpvrCache",
    "DpvrLlavaForConditionalGeneration",
    "DpvrLlavaModel",
    "DpvrLlavaPreTrainedModel",
    "TokenRoutes",
    "route_tokens",
]
