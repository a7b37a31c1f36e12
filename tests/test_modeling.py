"""The dual-path forward pass against the source model, a masked reference and per-row runs (fp32, CPU)."""

import pytest
import torch
from reference import position_ids_from_mask, reference_logits
from tiny_models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, make_tiny_llava

from dpvr_surgery.surgery import convert_model

TEXT_ONLY_ATOL = 1e-5
ROUTED_ATOL = 1e-4


def random_text(length: int, generator: torch.Generator) -> list[int]:
    return torch.randint(1, 100, (length,), generator=generator).tolist()


def make_row(segments: list, image_length: int, generator: torch.Generator) -> list[int]:
    """Token ids from segments: an int n is n random text tokens, the string "image" one image span."""
    ids = []
    for segment in segments:
        if segment == "image":
            ids += [IMAGE_TOKEN_ID] * image_length
        else:
            ids += random_text(segment, generator)
    return ids


def pad_rows(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if side == "left":
            input_ids[i, width - len(row) :] = torch.tensor(row)
            attention_mask[i, width - len(row) :] = 1
        else:
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def images_for(rows: list[list[int]], image_length: int, generator: torch.Generator, size: int = 32):
    per_row = [row.count(IMAGE_TOKEN_ID) // image_length for row in rows]
    total = sum(per_row)
    if total == 0:
        return None, per_row
    return torch.randn(total, 3, size, size, generator=generator), per_row


def forward_logits(model, input_ids, attention_mask=None, pixel_values=None) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=False
        ).logits


@pytest.fixture(scope="module")
def source():
    return make_tiny_llava(seed=0)


@pytest.fixture(scope="module")
def converted(source):
    return convert_model(source, split_layer=2, side_branch_depth=1, num_fusion_layers=1)


@pytest.mark.parametrize(
    "split, depth, fusion, init",
    [(1, 1, 1, "copy"), (2, 2, 1, "copy-last"), (3, 1, 2, "random"), (4, 1, 1, "copy")],
)
def test_text_only_matches_source(source, split, depth, fusion, init):
    model = convert_model(source, split_layer=split, side_branch_depth=depth, num_fusion_layers=fusion, side_branch_init=init)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.tensor([random_text(17, generator)])
    difference = (forward_logits(model, input_ids) - forward_logits(source, input_ids)).abs().max()
    assert difference <= TEXT_ONLY_ATOL


def test_text_only_padded_batch_matches_source(source, converted):
    generator = torch.Generator().manual_seed(2)
    rows = [random_text(9, generator), random_text(14, generator)]
    input_ids, attention_mask = pad_rows(rows, "left")
    position_ids = position_ids_from_mask(attention_mask)
    with torch.no_grad():
        expected = source(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    actual = forward_logits(converted, input_ids, attention_mask)
    valid = attention_mask.bool()
    assert (actual[valid] - expected[valid]).abs().max() <= TEXT_ONLY_ATOL


def test_image_prompt_differs_from_source(source, converted):
    # The routing must change image prompts: a model that silently ran the plain graph would pass
    # every text-only check.
    generator = torch.Generator().manual_seed(3)
    length = source.config.image_seq_length
    input_ids = torch.tensor([make_row([3, "image", 6], length, generator)])
    pixel_values = torch.randn(1, 3, 32, 32, generator=generator)
    difference = (forward_logits(converted, input_ids, None, pixel_values) - forward_logits(source, input_ids, None, pixel_values)).abs().max()
    assert difference > 1e-3


ROW_LAYOUTS = [
    [[4, "image", 7]],
    [[2, "image", 3, "image", 5]],
    [["image", 6]],
    [[5, "image", 2], [11], [3, "image", 4, "image", 2]],
    [[8], [2, "image", 9], [1, "image", "image", 3]],
]


@pytest.mark.parametrize("layout", ROW_LAYOUTS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_matches_masked_reference(converted, layout, side):
    generator = torch.Generator().manual_seed(4)
    length = converted.config.image_seq_length
    rows = [make_row(segments, length, generator) for segments in layout]
    input_ids, attention_mask = pad_rows(rows, side)
    pixel_values, _ = images_for(rows, length, generator)

    actual = forward_logits(converted, input_ids, attention_mask, pixel_values)
    expected = reference_logits(converted, input_ids, attention_mask, pixel_values)
    valid = attention_mask.bool()
    assert (actual[valid] - expected[valid]).abs().max() <= ROUTED_ATOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_matches_rows_run_alone(converted, side):
    generator = torch.Generator().manual_seed(5)
    length = converted.config.image_seq_length
    layouts = [[6, "image", 4], [13], [2, "image", 3, "image", 1], [1, "image", 20]]
    rows = [make_row(segments, length, generator) for segments in layouts]
    input_ids, attention_mask = pad_rows(rows, side)
    pixel_values, per_row = images_for(rows, length, generator)
    batch_logits = forward_logits(converted, input_ids, attention_mask, pixel_values)

    first_image = 0
    for i, row in enumerate(rows):
        row_pixels = None
        if per_row[i]:
            row_pixels = pixel_values[first_image : first_image + per_row[i]]
        first_image += per_row[i]
        alone = forward_logits(converted, torch.tensor([row]), None, row_pixels)[0]
        batch_row = batch_logits[i][attention_mask[i].bool()]
        assert (batch_row - alone).abs().max() <= ROUTED_ATOL, f"row {i}"


def test_eager_and_sdpa_agree(source):
    generator = torch.Generator().manual_seed(6)
    length = source.config.image_seq_length
    rows = [make_row([3, "image", 5], length, generator), make_row([9], length, generator)]
    input_ids, attention_mask = pad_rows(rows, "left")
    pixel_values, _ = images_for(rows, length, generator)
    eager = convert_model(source, split_layer=2)
    sdpa = convert_model(source, split_layer=2)
    sdpa.set_attn_implementation("sdpa")
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    valid = attention_mask.bool()
    eager_logits = forward_logits(eager, input_ids, attention_mask, pixel_values)[valid]
    sdpa_logits = forward_logits(sdpa, input_ids, attention_mask, pixel_values)[valid]
    assert (eager_logits - sdpa_logits).abs().max() <= ROUTED_ATOL


def test_image_tokens_skip_deep_layers(converted):
    generator = torch.Generator().manual_seed(7)
    length = converted.config.image_seq_length
    rows = [make_row([3, "image", 5], length, generator), make_row([2, "image", 2, "image", 4], length, generator)]
    input_ids, attention_mask = pad_rows(rows, "left")
    pixel_values, _ = images_for(rows, length, generator)
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = tuple(args[0].shape[:2])

        return hook

    layers = converted.model.language_model.layers
    handles = [layers[i].register_forward_pre_hook(record(f"layer{i}")) for i in range(len(layers))]
    handles.append(converted.model.side_branch.layers[0].register_forward_pre_hook(record("side")))
    try:
        forward_logits(converted, input_ids, attention_mask, pixel_values)
    finally:
        for handle in handles:
            handle.remove()

    width = input_ids.shape[1]
    assert seen["layer0"] == (2, width)
    assert seen["layer1"] == (2, width)
    # Deep layers see the text tokens only: 8 in both rows (the second row's padding is dropped too).
    for i in range(2, len(layers) - 1):
        assert seen[f"layer{i}"] == (2, 8)
    # One side-branch row per image.
    assert seen["side"] == (3, length)
    assert seen[f"layer{len(layers) - 1}"] == (2, width)


def test_loss_matches_cross_entropy(converted):
    generator = torch.Generator().manual_seed(8)
    length = converted.config.image_seq_length
    input_ids = torch.tensor([make_row([3, "image", 7], length, generator)])
    pixel_values = torch.randn(1, 3, 32, 32, generator=generator)
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, -100)
    with torch.no_grad():
        output = converted(input_ids=input_ids, pixel_values=pixel_values, labels=labels, use_cache=False)
    expected = torch.nn.functional.cross_entropy(output.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    assert torch.isclose(output.loss, expected, atol=1e-6)


def test_inputs_embeds_match_input_ids(converted):
    generator = torch.Generator().manual_seed(9)
    length = converted.config.image_seq_length
    input_ids = torch.tensor([make_row([2, "image", 4], length, generator)])
    pixel_values = torch.randn(1, 3, 32, 32, generator=generator)
    embeds = converted.get_input_embeddings()(input_ids)
    with torch.no_grad():
        from_ids = converted(input_ids=input_ids, pixel_values=pixel_values, use_cache=False).logits
        from_embeds = converted(inputs_embeds=embeds, pixel_values=pixel_values, use_cache=False).logits
    assert (from_ids - from_embeds).abs().max() <= TEXT_ONLY_ATOL


def test_image_token_count_mismatch_names_counts(converted):
    length = converted.config.image_seq_length
    input_ids = torch.tensor([[5] + [IMAGE_TOKEN_ID] * (length - 1) + [6]])
    pixel_values = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=rf"holds {length - 1} image tokens .* give {length} features"):
        converted(input_ids=input_ids, pixel_values=pixel_values)


def test_row_split_inside_image_rejected(converted):
    length = converted.config.image_seq_length
    half = length // 2
    rows = [[5] + [IMAGE_TOKEN_ID] * (length + half), [6] + [IMAGE_TOKEN_ID] * (length - half)]
    input_ids, attention_mask = pad_rows(rows, "right")
    pixel_values = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="Row 0 ends in the middle of an image"):
        converted(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)


def test_hidden_state_output_rejected(converted):
    with pytest.raises(ValueError, match="output_hidden_states=True is not supported"):
        converted(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)


@pytest.mark.parametrize(
    "config_kwargs",
    [
        {"select_strategy": "full"},
        {"feature_layer": [-2, -1]},
        {"select_strategy": "full", "feature_layer": [-3, -1]},
        {"num_kv_heads": 4},
        {"num_kv_heads": 1, "tie_word_embeddings": True},
    ],
)
def test_config_variants_match_reference(config_kwargs):
    source = make_tiny_llava(seed=10, **config_kwargs)
    converted = convert_model(source, split_layer=3, side_branch_depth=2)
    generator = torch.Generator().manual_seed(11)
    length = source.config.image_seq_length
    rows = [make_row([3, "image", 5], length, generator), make_row([7], length, generator)]
    input_ids, attention_mask = pad_rows(rows, "left")
    pixel_values, _ = images_for(rows, length, generator)
    valid = attention_mask.bool()

    actual = forward_logits(converted, input_ids, attention_mask, pixel_values)
    expected = reference_logits(converted, input_ids, attention_mask, pixel_values)
    assert (actual[valid] - expected[valid]).abs().max() <= ROUTED_ATOL

    text_ids = torch.tensor([rows[1]])
    assert (forward_logits(converted, text_ids) - forward_logits(source, text_ids)).abs().max() <= TEXT_ONLY_ATOL


def test_side_branch_initialisation(source):
    language_layers = source.model.language_model.layers
    copied = convert_model(source, split_layer=2, side_branch_depth=2, side_branch_init="copy")
    for i, layer in enumerate(copied.model.side_branch.layers):
        expected = language_layers[2 + i].state_dict()
        for key, value in layer.state_dict().items():
            assert torch.equal(value, expected[key]), f"copy: side layer {i} {key}"

    last = convert_model(source, split_layer=2, side_branch_depth=2, num_fusion_layers=1, side_branch_init="copy-last")
    num_layers = len(language_layers)
    for i, layer in enumerate(last.model.side_branch.layers):
        expected = language_layers[num_layers - 1 - 2 + i].state_dict()
        for key, value in layer.state_dict().items():
            assert torch.equal(value, expected[key]), f"copy-last: side layer {i} {key}"

    random = convert_model(source, split_layer=2, side_branch_init="random")
    weight = random.model.side_branch.layers[0].self_attn.q_proj.weight
    assert not torch.equal(weight, language_layers[2].self_attn.q_proj.weight)
    assert weight.std() < 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_half_precision_padded_batch_finite(source, dtype, attn_implementation):
    # Padding and the unused text slots of shorter rows are fully masked queries; they must stay finite
    # in half precision, where a masked row can overflow.
    model = convert_model(source, split_layer=2).to(dtype)
    model.set_attn_implementation(attn_implementation)
    generator = torch.Generator().manual_seed(12)
    length = source.config.image_seq_length
    rows = [make_row(["image", 2], length, generator), make_row([14], length, generator)]
    input_ids, attention_mask = pad_rows(rows, "left")
    pixel_values, _ = images_for(rows, length, generator)
    logits = forward_logits(model, input_ids, attention_mask, pixel_values.to(dtype))
    assert torch.isfinite(logits).all()
