"""Saturation lenses on tiny real LLaVA models: against direct computations, across attention kernels,
layer by layer against in memory, and on a model whose attention collapses at a known layer."""

from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import torch.nn.functional as F
from tiny_models import IMAGE_TOKEN_ID, make_tiny_llava, tiny_processor
from transformers import LlavaConfig

from dpvr_surgery.analysis import AnalysisRequest, SplitRule, choose_split, run_analysis
from dpvr_surgery.analysis.batches import EncodedSample, lens_positions, make_batches
from dpvr_surgery.analysis.in_memory import measure_loaded_model
from dpvr_surgery.analysis.report import layer_statistics, mean_curves
from dpvr_surgery.analysis.sequential import CheckpointParts, measure_sequential
from dpvr_surgery.errors import InvalidInputError

IMAGE_TOKENS = 16
NUM_LAYERS = 6
ATOL = 1e-5


def encoded_samples(seed: int = 0) -> list[EncodedSample]:
    """Rows of different lengths, with text before and after the image, so batches need padding."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, 5), (4, 9), (1, 3), (3, 12)]
    samples = []
    for index, (before, after) in enumerate(shapes):
        text = torch.randint(1, 100, (before + after,), generator=generator)
        input_ids = torch.cat([text[:before], torch.full((IMAGE_TOKENS,), IMAGE_TOKEN_ID), text[before:]])
        pixel_values = torch.randn(1, 3, 32, 32, generator=generator)
        samples.append(EncodedSample(f"sample{index}", input_ids, pixel_values))
    return samples


def batches_of(samples: list[EncodedSample], batch_size: int, logit_lens_tokens: int = 64):
    return make_batches(
        samples,
        batch_size=batch_size,
        image_token_id=IMAGE_TOKEN_ID,
        pad_token_id=0,
        logit_lens_tokens=logit_lens_tokens,
    )


def measure(model, samples, batch_size: int = 1, logit_lens_tokens: int = 64):
    batches = batches_of(samples, batch_size, logit_lens_tokens)
    return measure_loaded_model(model, batches, [sample.sample_id for sample in samples], show_progress=False)


def direct_lenses(model, sample: EncodedSample) -> dict[str, torch.Tensor]:
    """The four curves of one sample from `output_attentions`, `output_hidden_states` and plain layer outputs."""
    language_model = model.model.language_model
    outputs = {}
    handles = [
        layer.register_forward_hook(lambda module, args, output, index=index: outputs.__setitem__(index, output))
        for index, layer in enumerate(language_model.layers)
    ]
    with torch.no_grad():
        result = model(
            input_ids=sample.input_ids[None],
            pixel_values=sample.pixel_values,
            output_attentions=True,
            output_hidden_states=True,
        )
    for handle in handles:
        handle.remove()

    is_image = sample.input_ids == IMAGE_TOKEN_ID
    first_image = int(is_image.nonzero()[0])
    text_queries = ~is_image & (torch.arange(sample.input_ids.shape[0]) > first_image)
    last = len(language_model.layers) - 1
    with torch.no_grad():
        final = torch.log_softmax(model.lm_head(language_model.norm(outputs[last][0, is_image])), dim=-1)
        curves = {name: [] for name in ("attention_mass", "cosine_similarity", "logit_lens_kl", "logit_lens_top1")}
        for layer in range(len(language_model.layers)):
            attention = result.attentions[layer][0]
            curves["attention_mass"].append(attention[:, text_queries][:, :, is_image].sum(-1).mean())
            before, after = result.hidden_states[layer][0, is_image], outputs[layer][0, is_image]
            curves["cosine_similarity"].append(F.cosine_similarity(before, after, dim=-1).mean())
            current = torch.log_softmax(model.lm_head(language_model.norm(after)), dim=-1)
            curves["logit_lens_kl"].append((final.exp() * (final - current)).sum(-1).mean())
            curves["logit_lens_top1"].append((final.argmax(-1) == current.argmax(-1)).float().mean())
    return {name: torch.stack(values).double() for name, values in curves.items()}


@pytest.fixture(scope="module")
def eager_model():
    return make_tiny_llava(seed=1, attn_implementation="eager")


@pytest.fixture(scope="module")
def samples():
    return encoded_samples()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_lenses_match_direct_computation(eager_model, samples, batch_size):
    measured = measure(eager_model, samples, batch_size=batch_size)
    for row, sample in enumerate(samples):
        expected = direct_lenses(eager_model, sample)
        for name, values in expected.items():
            difference = (measured.values[name][row] - values).abs().max().item()
            assert difference <= ATOL, f"{name} of {sample.sample_id}: {difference}"


def test_direct_curves_are_not_trivial(eager_model, samples):
    expected = direct_lenses(eager_model, samples[0])
    assert expected["attention_mass"].min() > 0.05
    assert expected["cosine_similarity"].std() > 0.01
    assert expected["logit_lens_kl"][0] > expected["logit_lens_kl"][-1] == 0
    assert expected["logit_lens_top1"][-1] == 1


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_lenses_independent_of_kernel(eager_model, samples, attn_implementation):
    model = make_tiny_llava(seed=1, attn_implementation=attn_implementation)
    measured = measure(model, samples, batch_size=2)
    reference = measure(eager_model, samples, batch_size=1)
    for name in reference.values:
        assert torch.allclose(measured.values[name], reference.values[name], atol=ATOL), name


def test_logit_lens_token_subset(eager_model, samples):
    subset = measure(eager_model, samples[:1], logit_lens_tokens=4)
    full = direct_lenses(eager_model, samples[0])
    assert subset.values["logit_lens_kl"][0, -1] == 0
    assert not torch.allclose(subset.values["logit_lens_kl"][0, :-1], full["logit_lens_kl"][:-1], atol=ATOL)


def test_lens_positions_evenly_spaced():
    mask = torch.zeros(40, dtype=torch.bool)
    mask[10:30] = True
    assert lens_positions(mask, 5).tolist() == [10, 15, 20, 24, 29]
    assert lens_positions(mask, 64).tolist() == list(range(10, 30))


@pytest.mark.parametrize("tied", [False, True])
def test_sequential_equals_in_memory(tmp_path, samples, tied):
    model = make_tiny_llava(seed=2, tie_word_embeddings=tied, attn_implementation="sdpa")
    model.save_pretrained(tmp_path)
    config = LlavaConfig.from_pretrained(tmp_path)
    batches = batches_of(samples, 2)
    ids = [sample.sample_id for sample in samples]
    layered = measure_sequential(
        Path(tmp_path), config, batches, ids, dtype=torch.float32, device=torch.device("cpu"), show_progress=False
    )
    in_memory = measure_loaded_model(model, batches, ids, show_progress=False)
    for name in in_memory.values:
        assert torch.allclose(layered.values[name], in_memory.values[name], atol=ATOL), name


# --------------------------------------------------------------------------- a model with a known split

FLAG_DIM, CONSTANT_DIM = 0, 1
# With the default head size of 16, rotary pair (7, 15) turns by 10000 ** (-14 / 16) rad per position,
# under 0.03 rad over these sequences, so its query-key product barely depends on the distance.
SLOW_ROTARY_DIM = 7


def make_collapse_model(collapse_layer: int, attn_implementation: str = "eager"):
    """A tiny LLaVA whose text queries attend almost only to image keys before `collapse_layer`, and
    almost never from it on.

    Hidden dimension 0 flags image tokens: the projector writes 4 there and the embeddings 0.
    Dimension 1 is 4 for every token, and no layer writes to either dimension. In every head, the slow
    rotary dimension of the query reads the constant. That of the key reads the flag with weight +3
    before the collapse layer and -3 from it on, which adds a large positive, then a large negative
    term to the scores of image keys.
    """
    model = make_tiny_llava(seed=4, attn_implementation=attn_implementation)
    language_model = model.model.language_model
    projector = model.model.multi_modal_projector.linear_2
    head_dim = language_model.config.head_dim
    with torch.no_grad():
        language_model.embed_tokens.weight[:, FLAG_DIM] = 0.0
        language_model.embed_tokens.weight[:, CONSTANT_DIM] = 4.0
        projector.weight[[FLAG_DIM, CONSTANT_DIM]] = 0.0
        projector.bias[FLAG_DIM] = 4.0
        projector.bias[CONSTANT_DIM] = 4.0
        for index, layer in enumerate(language_model.layers):
            layer.self_attn.o_proj.weight[[FLAG_DIM, CONSTANT_DIM]] = 0.0
            layer.mlp.down_proj.weight[[FLAG_DIM, CONSTANT_DIM]] = 0.0
            query_rows = list(range(SLOW_ROTARY_DIM, layer.self_attn.q_proj.out_features, head_dim))
            key_rows = list(range(SLOW_ROTARY_DIM, layer.self_attn.k_proj.out_features, head_dim))
            layer.self_attn.q_proj.weight[query_rows] = 0.0
            layer.self_attn.q_proj.weight[query_rows, CONSTANT_DIM] = 3.0
            layer.self_attn.k_proj.weight[key_rows] = 0.0
            layer.self_attn.k_proj.weight[key_rows, FLAG_DIM] = 3.0 if index < collapse_layer else -3.0
    return model


@pytest.mark.parametrize("collapse_layer", [1, 2, 4])
def test_rule_finds_constructed_collapse(samples, collapse_layer):
    model = make_collapse_model(collapse_layer)
    measured = measure(model, samples, batch_size=2)
    masses = measured.values["attention_mass"]
    assert masses[:, :collapse_layer].min() > 0.95
    assert masses[:, collapse_layer:].max() < 0.05

    decision = choose_split(mean_curves(layer_statistics(measured)), SplitRule(lenses=("attention",)))
    assert decision.saturated
    assert decision.split_layer == collapse_layer
    assert decision.deciding_lens == "attention"


def test_constructed_collapse_under_sdpa(samples):
    measured = measure(make_collapse_model(3, "sdpa"), samples, batch_size=4)
    reference = measure(make_collapse_model(3, "eager"), samples)
    assert torch.allclose(measured.values["attention_mass"], reference.values["attention_mass"], atol=ATOL)


def test_run_analysis_finds_collapse_and_repeats(tmp_path):
    make_collapse_model(3).save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    request = AnalysisRequest(model=str(tmp_path), num_calibration_samples=5, batch_size=2, seed=7, command_line="x")
    first = run_analysis(request, show_progress=False)
    second = run_analysis(request, show_progress=False)

    assert first.decision.split_layer == 3
    assert first.report["split"]["split_layer"] == 3
    assert first.report["calibration"]["num_samples"] == 5
    for key in ("layers", "split", "samples", "calibration", "model"):
        assert first.report[key] == second.report[key], key


def test_run_analysis_seed_changes_samples(tmp_path):
    make_tiny_llava(seed=5).save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    reports = [
        run_analysis(
            AnalysisRequest(model=str(tmp_path), num_calibration_samples=3, seed=seed, command_line="x"),
            show_progress=False,
        ).report
        for seed in (0, 1)
    ]
    assert reports[0]["calibration"]["sample_ids"] != reports[1]["calibration"]["sample_ids"]
    assert reports[0]["samples"]["attention_mass"] != reports[1]["samples"]["attention_mass"]


def test_sequential_needs_safetensors(tmp_path):
    model = make_tiny_llava(seed=2)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(InvalidInputError, match="Layer-by-layer analysis reads safetensors files"):
        CheckpointParts(tmp_path, model.config, dtype=torch.float32, device=torch.device("cpu"))


def test_short_memory_selects_sequential(tmp_path, monkeypatch):
    make_tiny_llava(seed=5).save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    request = AnalysisRequest(model=str(tmp_path), num_calibration_samples=1, command_line="x")
    assert run_analysis(request, show_progress=False).report["model"]["mode"] == "in_memory"

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=100_000))
    assert run_analysis(request, show_progress=False).report["model"]["mode"] == "sequential"
