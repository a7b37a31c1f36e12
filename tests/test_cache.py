"""The dual-path KV cache: cached decoding against full recomputation, beams, batches and multi-turn use."""

import pytest
import torch
from test_modeling import images_for, make_row, pad_rows, random_text
from tiny_models import IMAGE_TOKEN_ID, make_tiny_llava
from transformers import DynamicCache

from dpvr_surgery.modeling import DpvrCache
from dpvr_surgery.surgery import convert_model

LOGITS_ATOL = 1e-4
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def model():
    source = make_tiny_llava(seed=20)
    return convert_model(source, split_layer=2, side_branch_depth=1, num_fusion_layers=1)


def batch_of(layouts, model, seed, side="left"):
    generator = torch.Generator().manual_seed(seed)
    length = model.config.image_seq_length
    rows = [make_row(segments, length, generator) for segments in layouts]
    input_ids, attention_mask = pad_rows(rows, side)
    pixel_values, _ = images_for(rows, length, generator)
    return input_ids, attention_mask, pixel_values


def recompute_greedy(model, input_ids, attention_mask, pixel_values, steps):
    """Greedy decoding that recomputes the whole context at every step, with no cache at all."""
    all_logits = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=False
            ).logits[:, -1]
        logits[:, IMAGE_TOKEN_ID] = float("-inf")
        all_logits.append(logits)
        next_tokens = logits.argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_tokens], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)], dim=1)
    return input_ids, torch.stack(all_logits, dim=1)


def cached_greedy(model, input_ids, attention_mask, pixel_values, steps, **kwargs):
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            bad_words_ids=[[IMAGE_TOKEN_ID]],
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    return output


@pytest.mark.parametrize(
    "layouts",
    [
        [[4, "image", 6]],
        [[9]],
        [[5, "image", 3], [12], [2, "image", 2, "image", 3]],
    ],
    ids=["one-image", "text-only", "batch-0-1-2-images"],
)
def test_cached_greedy_matches_recompute(model, layouts):
    input_ids, attention_mask, pixel_values = batch_of(layouts, model, seed=21)
    expected_ids, expected_logits = recompute_greedy(model, input_ids, attention_mask, pixel_values, NEW_TOKENS)

    output = cached_greedy(model, input_ids, attention_mask, pixel_values, NEW_TOKENS)
    assert isinstance(output.cache, DpvrCache)
    assert torch.equal(output.sequences, expected_ids)
    cached_logits = torch.stack(output.logits, dim=1)
    finite = torch.isfinite(expected_logits)
    assert (cached_logits[finite] - expected_logits[finite]).abs().max() <= LOGITS_ATOL


def test_cache_lengths_per_layer_group(model):
    input_ids, attention_mask, pixel_values = batch_of([[5, "image", 3], [12], [2, "image", 2, "image", 3]], model, seed=22)
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=True)
    cache = output.cache
    full = input_ids.shape[1]
    text_slots = 12  # the most text tokens of any row: 8, 12 and 7
    config = model.config
    num_layers = config.text_config.num_hidden_layers
    assert len(cache.layers) == num_layers
    for layer in range(num_layers):
        expected = text_slots if layer in config.deep_layers else full
        assert cache.get_seq_length(layer) == expected, f"layer {layer}"
    assert cache.text_attention_mask.sum(dim=1).tolist() == [8, 12, 7]

    step = input_ids[:, -1:]
    mask = torch.cat([attention_mask, torch.ones_like(step)], dim=1)
    with torch.no_grad():
        model(input_ids=step, attention_mask=mask, cache=cache, use_cache=True)
    for layer in range(num_layers):
        expected = text_slots + 1 if layer in config.deep_layers else full + 1
        assert cache.get_seq_length(layer) == expected, f"layer {layer} after one step"


def test_beam_search_cache_matches_no_cache(model):
    input_ids, attention_mask, pixel_values = batch_of([[4, "image", 5], [2, "image", 1, "image", 6]], model, seed=23)
    common = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        max_new_tokens=12,
        num_beams=3,
        do_sample=False,
        bad_words_ids=[[IMAGE_TOKEN_ID]],
    )
    with torch.no_grad():
        cached = model.generate(**common, use_cache=True)
        uncached = model.generate(**common, use_cache=False)
    assert torch.equal(cached, uncached)

    # Every beam of the two-image row must see that row's own two images.
    row = input_ids[1][attention_mask[1].bool()][None]
    alone = dict(common, input_ids=row, attention_mask=torch.ones_like(row), pixel_values=pixel_values[1:])
    with torch.no_grad():
        expected = model.generate(**alone, use_cache=True)
    assert torch.equal(cached[1, -12:], expected[0, -12:])


def test_sampling_cache_matches_no_cache(model):
    input_ids, attention_mask, pixel_values = batch_of([[3, "image", 4], [10]], model, seed=24)
    common = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        max_new_tokens=16,
        do_sample=True,
        top_k=20,
        bad_words_ids=[[IMAGE_TOKEN_ID]],
    )
    with torch.no_grad():
        torch.manual_seed(0)
        cached = model.generate(**common, use_cache=True)
        torch.manual_seed(0)
        uncached = model.generate(**common, use_cache=False)
    assert torch.equal(cached, uncached)


def test_multi_turn_with_new_image_matches_full_context(model):
    generator = torch.Generator().manual_seed(25)
    length = model.config.image_seq_length
    first_turn = torch.tensor([make_row([3, "image", 6], length, generator)])
    second_turn = torch.tensor([make_row([4, "image", 5], length, generator)])
    first_image = torch.randn(1, 3, 32, 32, generator=generator)
    second_image = torch.randn(1, 3, 32, 32, generator=generator)
    conversation = torch.cat([first_turn, second_turn], dim=1)

    with torch.no_grad():
        first = model(input_ids=first_turn, pixel_values=first_image, use_cache=True)
        continued = model(
            input_ids=second_turn,
            attention_mask=torch.ones_like(conversation),
            pixel_values=second_image,
            cache=first.cache,
            use_cache=True,
        )
        whole = model(input_ids=conversation, pixel_values=torch.cat([first_image, second_image]), use_cache=False)
    expected = whole.logits[:, first_turn.shape[1] :]
    assert (continued.logits - expected).abs().max() <= LOGITS_ATOL
    # The second image's tokens never enter the deep layers' cache: 6 + 4 + 5 text tokens.
    assert continued.cache.get_seq_length(model.config.split_layer) == 3 + 6 + 4 + 5


def test_generate_continues_from_returned_cache(model):
    generator = torch.Generator().manual_seed(26)
    length = model.config.image_seq_length
    first_turn = torch.tensor([make_row([3, "image", 6], length, generator)])
    first_image = torch.randn(1, 3, 32, 32, generator=generator)
    first = cached_greedy(model, first_turn, torch.ones_like(first_turn), first_image, 8)

    second_turn = torch.tensor([make_row([2, "image", 3], length, generator)])
    second_image = torch.randn(1, 3, 32, 32, generator=generator)
    conversation = torch.cat([first.sequences, second_turn], dim=1)
    # The cache holds everything but the last generated token, which generate() feeds again.
    continued = cached_greedy(model, conversation, torch.ones_like(conversation), second_image, 10, cache=first.cache)

    both_images = torch.cat([first_image, second_image])
    expected_ids, expected_logits = recompute_greedy(model, conversation, torch.ones_like(conversation), both_images, 10)
    assert torch.equal(continued.sequences, expected_ids)
    cached_logits = torch.stack(continued.logits, dim=1)
    finite = torch.isfinite(expected_logits)
    assert (cached_logits[finite] - expected_logits[finite]).abs().max() <= LOGITS_ATOL


def test_cache_continuation_names(model):
    input_ids = torch.tensor([random_text(6, torch.Generator().manual_seed(27))])
    with torch.no_grad():
        first = model(input_ids=input_ids[:, :4], use_cache=True)
        by_cache = model(input_ids=input_ids[:, 4:], cache=first.cache, use_cache=True).logits
        # `past_key_values` remains accepted as the older name of the same argument.
        first = model(input_ids=input_ids[:, :4], use_cache=True)
        by_past = model(input_ids=input_ids[:, 4:], past_key_values=first.cache, use_cache=True).logits
    assert torch.equal(by_cache, by_past)


def test_foreign_filled_cache_rejected(model):
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(ValueError, match="already holds tokens cannot continue a dual-path model"):
        model(input_ids=torch.tensor([[1, 2]]), cache=cache, use_cache=True)
