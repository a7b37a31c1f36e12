"""Tests of the conversion plan: presets, settings, image-token counts, parameter counts and prefill costs."""

import json
import logging

import psutil
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaConfig, LlavaForConditionalGeneration

from dpvr_surgery.errors import InvalidInputError
from dpvr_surgery.plan import (
    PRESET_NAMES,
    PlanSettings,
    count_parameters,
    format_plan_report,
    image_tokens_per_image,
    load_preset,
    plan_report,
    prefill_cost,
)

LLAVA_7B_PARAMETERS = 7_063_427_072
LLAVA_7B_LAYER_PARAMETERS = 202_383_360
LLAVA_13B_PARAMETERS = 13_351_494_656
LLAVA_13B_LAYER_PARAMETERS = 317_204_480

IMAGE_TOKEN_ID = 100


def preset_config(name: str) -> LlavaConfig:
    return LlavaConfig.from_dict(load_preset(name))


def tiny_config(
    *,
    vision_type: str = "clip_vision_model",
    strategy: str = "default",
    feature_layer: int | list[int] = -2,
    num_kv_heads: int = 2,
    tie_embeddings: bool = False,
) -> LlavaConfig:
    """Return a LLaVA config with a 4-layer Llama (4 heads, head dim 8) and a 2-layer vision tower of 5 x 5 patches."""
    text_config = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": num_kv_heads,
        "vocab_size": 128,
        "tie_word_embeddings": tie_embeddings,
    }
    # 32 // 6 = 5 patches per side: the floor division matters.
    vision_config = {
        "model_type": vision_type,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 6,
    }
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
        tie_word_embeddings=tie_embeddings,
    )


def tiny_input_ids(config: LlavaConfig, *, batch_size: int, num_images: int, text_tokens: int) -> torch.Tensor:
    """Return prompts with `num_images` image spans of the config's image-token count and `text_tokens` text ids."""
    image_tokens = image_tokens_per_image(config)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch_size):
        text = torch.randint(0, IMAGE_TOKEN_ID, (text_tokens,), generator=generator)
        pieces = [text[:2]]
        for _ in range(num_images):
            pieces.append(torch.full((image_tokens,), IMAGE_TOKEN_ID))
        pieces.append(text[2:])
        rows.append(torch.cat(pieces))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------
# Presets


def test_preset_names_list_both_sizes():
    assert PRESET_NAMES == ("llava-1.5-13b", "llava-1.5-7b")


@pytest.mark.parametrize(
    ("name", "hidden", "layers", "intermediate"),
    [("llava-1.5-7b", 4096, 32, 11008), ("llava-1.5-13b", 5120, 40, 13824)],
)
def test_preset_config_fields(name, hidden, layers, intermediate):
    config = preset_config(name)
    text = config.text_config
    vision = config.vision_config

    assert config.model_type == "llava"
    assert text.model_type == "llama"
    assert text.hidden_size == hidden
    assert text.num_hidden_layers == layers
    assert text.num_attention_heads == hidden // 128
    assert text.num_key_value_heads == hidden // 128
    assert text.intermediate_size == intermediate
    assert text.vocab_size == 32064
    assert text.rms_norm_eps == 1e-5
    assert text.max_position_embeddings == 4096
    assert config.tie_word_embeddings is False
    assert vision.model_type == "clip_vision_model"
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
    assert (vision.intermediate_size, vision.patch_size, vision.image_size) == (4096, 14, 336)
    assert vision.projection_dim == 768
    assert config.image_token_index == 32000
    assert config.pad_token_id == 32001
    assert config.projector_hidden_act == "gelu"
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"
    assert config.image_seq_length == 576
    assert image_tokens_per_image(config) == 576


def test_load_preset_unknown_name():
    message = r"unknown preset 'llava-2': available presets are llava-1\.5-13b, llava-1\.5-7b"
    with pytest.raises(InvalidInputError, match=message):
        load_preset("llava-2")


# ---------------------------------------------------------------------------------------------------
# Parameters


def test_parameters_llava_7b():
    parameters = count_parameters(preset_config("llava-1.5-7b"), PlanSettings(split_layer=18))

    assert parameters["source_total"] == LLAVA_7B_PARAMETERS
    assert parameters["decoder_layer"] == LLAVA_7B_LAYER_PARAMETERS
    assert parameters["side_branch"] == LLAVA_7B_LAYER_PARAMETERS
    assert parameters["trainable"] == LLAVA_7B_LAYER_PARAMETERS
    assert parameters["converted_total"] == LLAVA_7B_PARAMETERS + LLAVA_7B_LAYER_PARAMETERS
    assert round(100 * parameters["trainable_fraction_of_source"], 2) == 2.87
    assert round(100 * parameters["trainable_fraction_of_converted"], 2) == 2.79
    assert parameters["language_model"] + parameters["vision_tower"] + parameters["projector"] == LLAVA_7B_PARAMETERS


def test_parameters_llava_13b():
    parameters = count_parameters(preset_config("llava-1.5-13b"), PlanSettings(split_layer=20))

    assert parameters["source_total"] == LLAVA_13B_PARAMETERS
    assert parameters["decoder_layer"] == LLAVA_13B_LAYER_PARAMETERS
    assert parameters["trainable"] == LLAVA_13B_LAYER_PARAMETERS
    assert parameters["converted_total"] == LLAVA_13B_PARAMETERS + LLAVA_13B_LAYER_PARAMETERS
    assert round(100 * parameters["trainable_fraction_of_source"], 2) == 2.38


def test_parameters_side_branch_depth():
    parameters = count_parameters(preset_config("llava-1.5-7b"), PlanSettings(split_layer=18, side_branch_depth=3))

    assert parameters["side_branch"] == 3 * LLAVA_7B_LAYER_PARAMETERS
    assert parameters["converted_total"] == LLAVA_7B_PARAMETERS + 3 * LLAVA_7B_LAYER_PARAMETERS


def test_parameters_match_real_model():
    config = tiny_config()
    model = LlavaForConditionalGeneration(config)

    parameters = count_parameters(config, PlanSettings(split_layer=1))

    assert parameters["source_total"] == sum(parameter.numel() for parameter in model.parameters())
    assert parameters["decoder_layer"] == sum(p.numel() for p in model.model.language_model.layers[0].parameters())


def test_parameters_tied_embeddings_counted_once():
    untied = count_parameters(tiny_config(), PlanSettings(split_layer=1))
    tied_config = tiny_config(tie_embeddings=True)
    tied_model = LlavaForConditionalGeneration(tied_config)

    tied = count_parameters(tied_config, PlanSettings(split_layer=1))

    assert tied_model.lm_head.weight is tied_model.model.language_model.embed_tokens.weight
    assert tied["source_total"] == untied["source_total"] - 128 * 32
    assert tied["source_total"] == sum(parameter.numel() for parameter in tied_model.parameters())


def test_plan_13b_allocates_no_weights():
    process = psutil.Process()
    plan_report(preset_config("llava-1.5-7b"), PlanSettings(split_layer=18))
    rss_before = process.memory_info().rss

    report = plan_report(preset_config("llava-1.5-13b"), PlanSettings(split_layer=20))

    rss_growth = process.memory_info().rss - rss_before
    assert report["parameters"]["source_total"] == LLAVA_13B_PARAMETERS
    # One 13B decoder layer in bf16 alone would be 634 MB.
    assert rss_growth < 128 * 1024**2


# ---------------------------------------------------------------------------------------------------
# Image tokens


@pytest.mark.parametrize(
    ("vision_type", "strategy", "feature_layer", "expected"),
    [
        ("clip_vision_model", "default", -2, 25),
        ("clip_vision_model", "full", -2, 26),
        ("clip_vision_model", "default", [-3, -1], 25),
        ("clip_vision_model", "full", [-2, -1], 26),
        ("siglip_vision_model", "full", -1, 25),
        ("siglip_vision_model", "full", [-3, -1], 25),
    ],
)
def test_image_tokens_match_forward(vision_type, strategy, feature_layer, expected):
    config = tiny_config(vision_type=vision_type, strategy=strategy, feature_layer=feature_layer)
    model = LlavaForConditionalGeneration(config).eval()

    with torch.no_grad():
        features = model.get_image_features(torch.randn(2, 3, 32, 32)).pooler_output

    assert image_tokens_per_image(config) == expected
    assert [feature.shape[0] for feature in features] == [expected, expected]


def test_image_tokens_siglip_default_drops_patch(caplog):
    config = tiny_config(vision_type="siglip_vision_model", strategy="default", feature_layer=-1)
    model = LlavaForConditionalGeneration(config).eval()

    with torch.no_grad():
        features = model.get_image_features(torch.randn(1, 3, 32, 32)).pooler_output
    with caplog.at_level(logging.WARNING, logger="dpvr_surgery.plan"):
        tokens = image_tokens_per_image(config)

    assert features[0].shape[0] == 24
    assert tokens == 24
    assert "drops the first image patch" in caplog.text


def test_image_tokens_unsupported_tower():
    config = tiny_config()
    config.vision_config.model_type = "pixtral"

    with pytest.raises(InvalidInputError, match=r"vision tower type 'pixtral' is not supported"):
        image_tokens_per_image(config)


# ---------------------------------------------------------------------------------------------------
# Prefill cost


def test_token_layers_llava_7b():
    costs = prefill_cost(preset_config("llava-1.5-7b"), PlanSettings(split_layer=18), text_tokens=64)

    original = costs["original"]
    converted = costs["converted"]
    assert costs["shape"]["image_tokens_per_image"] == 576
    assert original["token_layers"] == 32 * 640 == 20_480
    assert converted["token_layers"] == 18 * 640 + 1 * 576 + 13 * 64 + 1 * 640 == 13_568
    assert converted["token_layers_by_group"] == {"shared": 11_520, "side_branch": 576, "deep_text": 832, "fusion": 640}
    assert round(100 * (converted["token_layers"] / original["token_layers"] - 1), 2) == -33.75


def test_flops_llava_7b_by_hand():
    costs = prefill_cost(preset_config("llava-1.5-7b"), PlanSettings(split_layer=18), text_tokens=64)
    layer_macs = 4 * 4096 * 4096 + 3 * 4096 * 11008
    per_pair = 4 * 32 * 128
    full_pairs = 640 * 641 // 2

    original = costs["original"]
    converted = costs["converted"]
    assert original["linear_flops"] == 2 * layer_macs * 20_480
    assert converted["linear_flops"] == 2 * layer_macs * 13_568
    assert original["attention_flops"] == 32 * per_pair * full_pairs
    expected_pairs = 18 * full_pairs + 576 * 577 // 2 + 13 * (64 * 65 // 2) + 1 * full_pairs
    assert converted["attention_flops"] == per_pair * expected_pairs
    assert original["lm_head_flops"] == converted["lm_head_flops"] == 2 * 4096 * 32064

    vision_layer = 2 * 577 * (4 * 1024 * 1024 + 2 * 1024 * 4096) + 4 * 16 * 64 * 577 * 577
    assert costs["vision_encoder"]["tower_flops"] == 2 * 576 * (3 * 14 * 14 * 1024) + 24 * vision_layer
    assert costs["vision_encoder"]["projector_flops"] == 2 * 576 * (1024 * 4096 + 4096 * 4096)


def test_kv_cache_llava_7b_by_hand():
    costs = prefill_cost(preset_config("llava-1.5-7b"), PlanSettings(split_layer=18), text_tokens=64)
    per_token_layer = 2 * 32 * 128 * 2

    assert costs["original"]["kv_cache_bytes"] == 32 * 640 * per_token_layer == 335_544_320
    assert costs["converted"]["kv_cache_bytes"] == (19 * 640 + 13 * 64) * per_token_layer == 212_860_928
    assert costs["converted"]["kv_cache_bytes_by_group"]["side_branch"] == 0


def test_gqa_kv_cache_and_flops():
    config = preset_config("llava-1.5-7b")
    config.text_config.num_key_value_heads = 8
    dense = prefill_cost(preset_config("llava-1.5-7b"), PlanSettings(split_layer=18))

    grouped = prefill_cost(config, PlanSettings(split_layer=18))

    assert grouped["original"]["kv_cache_bytes"] == 32 * 640 * (2 * 8 * 128 * 2)
    assert grouped["converted"]["kv_cache_bytes"] * 4 == dense["converted"]["kv_cache_bytes"]
    assert grouped["original"]["attention_flops"] == dense["original"]["attention_flops"]
    layer_macs = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 11008
    assert grouped["original"]["linear_flops"] == 2 * layer_macs * 20_480


@pytest.mark.parametrize(("batch_size", "num_images"), [(1, 1), (2, 1), (2, 2)])
def test_kv_cache_matches_dynamic_cache(batch_size, num_images):
    config = tiny_config(num_kv_heads=2)
    model = LlavaForConditionalGeneration(config).eval()
    input_ids = tiny_input_ids(config, batch_size=batch_size, num_images=num_images, text_tokens=7)
    pixel_values = torch.randn(batch_size * num_images, 3, 32, 32)

    with torch.no_grad():
        output = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
    cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in output.cache.layers)
    costs = prefill_cost(
        config, PlanSettings(split_layer=1), text_tokens=7, num_images=num_images, batch_size=batch_size, dtype_bytes=4
    )

    assert output.cache.layers[0].keys.shape[1] == 2
    assert costs["original"]["kv_cache_bytes"] == cache_bytes
    per_token_layer = 2 * 2 * 8 * 4
    sequence = num_images * 25 + 7
    assert costs["converted"]["kv_cache_bytes"] == batch_size * (2 * sequence + 2 * 7) * per_token_layer


def test_flops_match_flop_counter():
    config = tiny_config()
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    input_ids = tiny_input_ids(config, batch_size=2, num_images=1, text_tokens=7)

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, pixel_values=torch.randn(2, 3, 32, 32), logits_to_keep=1)
    counts = counter.get_flop_counts()
    costs = prefill_cost(config, PlanSettings(split_layer=1), text_tokens=7, batch_size=2, dtype_bytes=4)

    def measured(module: str, op: str) -> int:
        return int(counts[f"LlavaForConditionalGeneration.{module}"].get(getattr(torch.ops.aten, op), 0))

    original = costs["original"]
    vision = costs["vision_encoder"]
    sequence = 32
    assert original["linear_flops"] == measured("model.language_model", "mm")
    # Eager attention multiplies the full square and masks afterwards; the estimate counts causal pairs only.
    causal_share = (sequence + 1) / (2 * sequence)
    assert original["attention_flops"] == measured("model.language_model", "bmm") * causal_share
    assert original["lm_head_flops"] == measured("lm_head", "mm")
    tower = ("convolution", "addmm", "bmm")
    assert vision["tower_flops"] == sum(measured("model.vision_tower", op) for op in tower)
    assert vision["projector_flops"] == sum(measured("model.multi_modal_projector", op) for op in ("mm", "addmm"))


def test_side_branch_attends_per_image():
    config = preset_config("llava-1.5-7b")

    costs = prefill_cost(config, PlanSettings(split_layer=18), num_images=2, batch_size=3, text_tokens=40)

    converted = costs["converted"]
    assert costs["shape"]["sequence_length"] == 2 * 576 + 40
    assert converted["token_layers_by_group"]["side_branch"] == 3 * 2 * 576
    full_pairs = 1192 * 1193 // 2
    expected_pairs = 19 * full_pairs + 2 * (576 * 577 // 2) + 13 * (40 * 41 // 2)
    assert converted["attention_flops"] == 3 * 4 * 32 * 128 * expected_pairs


def test_image_tokens_override():
    costs = prefill_cost(preset_config("llava-1.5-7b"), PlanSettings(split_layer=18), image_tokens=100, text_tokens=10)

    assert costs["original"]["token_layers"] == 32 * 110
    assert costs["converted"]["token_layers"] == 19 * 110 + 100 + 13 * 10


def test_prefill_shape_invalid():
    config = preset_config("llava-1.5-7b")

    with pytest.raises(InvalidInputError, match=r"text_tokens 0 is invalid: it must be at least 1"):
        prefill_cost(config, PlanSettings(split_layer=18), text_tokens=0)
    with pytest.raises(InvalidInputError, match=r"batch_size 2.5 is invalid: it must be an integer"):
        prefill_cost(config, PlanSettings(split_layer=18), batch_size=2.5)


# ---------------------------------------------------------------------------------------------------
# Settings


def test_validate_split_range_message():
    message = (
        r"split layer 31 is outside the valid range 1\.\.30 for a language model with 32 layers and 1 fusion layer; "
        r"pick a split in 1\.\.30"
    )
    with pytest.raises(InvalidInputError, match=message):
        PlanSettings(split_layer=31).validate(32)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (PlanSettings(split_layer=0), r"split layer 0 is outside the valid range 1\.\.30"),
        (
            PlanSettings(split_layer=29, num_fusion_layers=3),
            r"split layer 29 is outside the valid range 1\.\.28 .* and 3 fusion layers; pick a split in 1\.\.28",
        ),
        (PlanSettings(split_layer=5, num_fusion_layers=31), r"num_fusion_layers 31 is outside the valid range 1\.\.30"),
        (PlanSettings(split_layer=5, num_fusion_layers=0), r"num_fusion_layers 0 is outside the valid range 1\.\.30"),
        (PlanSettings(split_layer=5, side_branch_depth=0), r"side_branch_depth 0 is invalid: the side branch needs"),
        (
            PlanSettings(split_layer=5, side_branch_init="zeros"),
            r"side_branch_init 'zeros' is invalid; choose one of copy, copy-last, random",
        ),
        (PlanSettings(split_layer="5"), r"split_layer '5' is invalid: it must be an integer"),
        (
            PlanSettings(split_layer=30, side_branch_depth=3),
            r"side_branch_depth 3 with side_branch_init 'copy' needs source layers 30\.\.32, .* at most 2",
        ),
        (
            PlanSettings(split_layer=5, side_branch_depth=32, side_branch_init="copy-last"),
            r"side_branch_depth 32 with side_branch_init 'copy-last' needs source layers -1\.\.30, .* at most 31",
        ),
    ],
)
def test_validate_rejects(settings, message):
    with pytest.raises(InvalidInputError, match=message):
        settings.validate(32)


def test_validate_too_few_layers():
    with pytest.raises(InvalidInputError, match=r"2 decoder layers is too small for DPVR-LF: it needs at least 3"):
        PlanSettings(split_layer=1).validate(2)


def test_validate_accepts_bounds():
    PlanSettings(split_layer=1).validate(32)
    PlanSettings(split_layer=30).validate(32)
    PlanSettings(split_layer=30, side_branch_depth=30, side_branch_init="random").validate(32)
    PlanSettings(split_layer=1, num_fusion_layers=1).validate(3)


def test_count_parameters_validates_settings():
    with pytest.raises(InvalidInputError, match=r"split layer 40 is outside the valid range 1\.\.38"):
        count_parameters(preset_config("llava-1.5-13b"), PlanSettings(split_layer=40))


# ---------------------------------------------------------------------------------------------------
# Report


def test_plan_report_json_round_trip():
    report = plan_report(preset_config("llava-1.5-7b"), PlanSettings(split_layer=18), text_tokens=64)

    assert json.loads(json.dumps(report)) == report
    assert report["architecture"]["num_layers"] == 32
    assert report["architecture"]["image_tokens_per_image"] == 576
    assert report["architecture"]["vision_model_type"] == "clip_vision_model"
    assert report["plan"]["deep_text_layers"] == [18, 30]
    assert report["plan"]["fusion_layers"] == [31, 31]
    assert report["plan"]["side_branch_source_layers"] == [18, 18]
    assert report["ratios"]["token_layers"] == 0.6625
    assert report["ratios"]["kv_cache_bytes"] == 212_860_928 / 335_544_320


def test_plan_report_copy_last_and_random():
    config = preset_config("llava-1.5-7b")

    copy_last = plan_report(config, PlanSettings(split_layer=18, side_branch_depth=2, side_branch_init="copy-last"))
    random = plan_report(config, PlanSettings(split_layer=18, side_branch_init="random"))

    assert copy_last["plan"]["side_branch_source_layers"] == [29, 30]
    assert copy_last["parameters"]["side_branch"] == 2 * LLAVA_7B_LAYER_PARAMETERS
    assert random["plan"]["side_branch_source_layers"] is None
    assert random["parameters"]["side_branch"] == LLAVA_7B_LAYER_PARAMETERS


def test_random_side_branch_deeper_than_stack():
    settings = PlanSettings(split_layer=30, side_branch_depth=5, side_branch_init="random")

    report = plan_report(preset_config("llava-1.5-7b"), settings, text_tokens=64)

    assert report["parameters"]["side_branch"] == 5 * LLAVA_7B_LAYER_PARAMETERS
    assert report["costs"]["converted"]["token_layers_by_group"]["side_branch"] == 5 * 576


def test_text_only_prompt_costs():
    costs = prefill_cost(preset_config("llava-1.5-7b"), PlanSettings(split_layer=18), num_images=0, text_tokens=64)

    assert costs["original"]["token_layers"] == 32 * 64
    assert costs["converted"]["token_layers"] == 32 * 64
    assert costs["converted"]["kv_cache_bytes"] == costs["original"]["kv_cache_bytes"]
    assert costs["vision_encoder"]["flops"] == 0


def test_plan_report_warns_on_image_seq_length(caplog):
    config = preset_config("llava-1.5-7b")
    config.image_seq_length = 577

    with caplog.at_level(logging.WARNING, logger="dpvr_surgery.plan"):
        plan_report(config, PlanSettings(split_layer=18))

    assert "image_seq_length 577 differs from the 576 image tokens" in caplog.text


def test_format_plan_report_table():
    report = plan_report(preset_config("llava-1.5-7b"), PlanSettings(split_layer=18), text_tokens=64)

    text = format_plan_report(report)

    assert "7,063,427,072" in text
    assert "202,383,360  (2.87 % of source, 2.79 % of converted)" in text
    assert "layers 18-30 (13 layers), text tokens only" in text
    token_line = next(line for line in text.splitlines() if "decoder token-layers" in line)
    assert token_line.split()[-4:] == ["20,480", "13,568", "-33.75", "%"]
    kv_line = next(line for line in text.splitlines() if "KV cache MiB" in line)
    assert kv_line.split()[-4:-2] == ["320.0", "203.0"]
