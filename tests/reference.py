"""A slow reference for the dual-path graph: every layer runs on the full sequence with a 4D mask.

The converted model gathers text and image tokens into separate compact sequences. This reference
never gathers: it keeps two full-length streams (text and image) and encodes the routing in the
attention masks alone, so it shares no routing code with the model it checks.
"""

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def image_ids(image_token_mask: torch.Tensor, image_lengths: list[int]) -> torch.Tensor:
    """Number each image position with the index of its image (row-major fill order); -1 elsewhere."""
    ids = torch.full(image_token_mask.shape, -1, dtype=torch.long)
    flat = ids.view(-1)
    positions = image_token_mask.reshape(-1).nonzero().squeeze(1).tolist()
    labels = [image for image, length in enumerate(image_lengths) for _ in range(length)]
    assert len(positions) == len(labels), "image tokens and features differ"
    for position, label in zip(positions, labels):
        flat[position] = label
    return ids


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, t, t) allowed pairs, plus each query on itself so that no row is empty, as a (b, 1, t, t) float mask."""
    size = allowed.shape[-1]
    allowed = allowed | torch.eye(size, dtype=torch.bool)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@torch.no_grad()
def reference_logits(model, input_ids, attention_mask=None, pixel_values=None) -> torch.Tensor:
    """Logits (b, t, vocab) of a DpvrLlavaForConditionalGeneration, computed without gather or scatter."""
    config = model.config
    language_model = model.model.language_model
    layers = language_model.layers
    batch_size, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    valid = attention_mask.bool()

    embeds = language_model.embed_tokens(input_ids)
    image_token_mask = torch.zeros_like(valid)
    image_index = torch.full_like(input_ids, -1)
    if pixel_values is not None:
        features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        lengths = [int(f.shape[0]) for f in features]
        image_token_mask = input_ids == config.image_token_id
        embeds = embeds.clone()
        embeds[image_token_mask] = torch.cat(list(features)).to(embeds.dtype)
        image_index = image_ids(image_token_mask, lengths)
    text_mask = valid & ~image_token_mask
    positions = position_ids_from_mask(attention_mask)

    causal = torch.ones(length, length, dtype=torch.bool).tril()[None]
    full_allowed = causal & valid[:, None, :]
    same_image = (image_index[:, :, None] == image_index[:, None, :]) & image_token_mask[:, :, None]
    image_allowed = causal & same_image
    text_allowed = causal & text_mask[:, None, :] & text_mask[:, :, None]
    dtype = embeds.dtype
    full_mask = additive_mask(full_allowed, dtype)
    image_mask = additive_mask(image_allowed, dtype)
    text_mask_4d = additive_mask(text_allowed, dtype)

    position_embeddings = language_model.rotary_emb(embeds, position_ids=positions)

    def run(states, stack, mask):
        for layer in stack:
            states = layer(states, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings)
        return states

    split = config.split_layer
    fusion_start = config.fusion_layers.start
    shared = run(embeds, layers[:split], full_mask)
    image_stream = run(shared, model.model.side_branch.layers, image_mask)
    text_stream = run(shared, layers[split:fusion_start], text_mask_4d)
    fused = torch.where(image_token_mask[..., None], image_stream, torch.where(text_mask[..., None], text_stream, shared))
    fused = run(fused, layers[fusion_start:], full_mask)
    return model.lm_head(language_model.norm(fused))
