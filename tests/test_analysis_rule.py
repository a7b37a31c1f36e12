"""The split rule on known curves, and the report, table, config summary and plot built from a decision."""

import json

import pytest
import torch

from dpvr_surgery.analysis import SplitRule, choose_split, format_table, saturation_summary
from dpvr_surgery.analysis.lenses import LENS_NAMES, LensMeasurements
from dpvr_surgery.analysis.plots import plot_saturation
from dpvr_surgery.analysis.report import SCHEMA_VERSION, layer_statistics, mean_curves, per_sample_values, write_report
from dpvr_surgery.errors import InvalidInputError


def curves(attention, cosine=None, top1=None) -> dict[str, list[float]]:
    layers = len(attention)
    return {
        "attention_mass": list(attention),
        "cosine_similarity": list(cosine or [0.99] * layers),
        "logit_lens_kl": [float(layers - layer) for layer in range(layers)],
        "logit_lens_top1": list(top1 or [1.0] * layers),
    }


def test_attention_collapse_gives_its_layer():
    attention = [0.9, 0.8, 0.85, 0.02, 0.01, 0.02, 0.02, 0.5]
    decision = choose_split(curves(attention), SplitRule())
    assert decision.split_layer == 3
    assert decision.saturated
    assert decision.deciding_lens == "attention"
    proposal = decision.proposals[0]
    assert proposal.threshold == pytest.approx(0.01 + 0.02 * (0.9 - 0.01))
    assert proposal.value_at_split == 0.02
    assert proposal.value_before_split == 0.85
    assert "Split 3, set by the attention lens" in decision.explanation


def test_fusion_layers_are_not_judged():
    # The last two layers read the image again, but with two fusion layers they see image tokens anyway.
    attention = [0.9, 0.5, 0.01, 0.01, 0.01, 0.01, 0.6, 0.7]
    assert choose_split(curves(attention), SplitRule(num_fusion_layers=2)).split_layer == 2
    unsaturated = choose_split(curves(attention), SplitRule(num_fusion_layers=1))
    assert not unsaturated.saturated
    assert unsaturated.split_layer == 6


def test_split_after_late_attention_bump():
    attention = [0.9, 0.01, 0.01, 0.01, 0.3, 0.01, 0.01, 0.02]
    assert choose_split(curves(attention), SplitRule()).split_layer == 5


def test_absolute_threshold_and_min_split():
    attention = [0.9, 0.2, 0.1, 0.06, 0.04, 0.04, 0.04, 0.04]
    assert choose_split(curves(attention), SplitRule()).split_layer == 4
    assert choose_split(curves(attention), SplitRule(attention_threshold=0.15)).split_layer == 2
    assert choose_split(curves(attention), SplitRule(attention_threshold=0.15, min_split=3)).split_layer == 3


def test_all_used_lenses_must_agree():
    attention = [0.9, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]
    cosine = [0.2, 0.5, 0.7, 0.8, 0.95, 0.96, 0.97, 0.5]
    top1 = [0.0, 0.0, 0.1, 0.2, 0.3, 0.6, 0.9, 1.0]
    data = curves(attention, cosine, top1)
    assert choose_split(data, SplitRule(lenses=("attention",))).split_layer == 1

    with_cosine = choose_split(data, SplitRule(lenses=("attention", "cosine")))
    assert with_cosine.split_layer == 4
    assert with_cosine.deciding_lens == "cosine"

    every_lens = choose_split(data, SplitRule(lenses=("attention", "cosine", "logit_lens")))
    assert every_lens.split_layer == 5
    assert every_lens.deciding_lens == "logit_lens"
    assert [proposal.split_layer for proposal in every_lens.proposals] == [1, 4, 5]


def test_unsaturated_lens_falls_back_to_last_split(caplog):
    attention = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    decision = choose_split(curves(attention), SplitRule(attention_threshold=0.1))
    assert decision.split_layer == 6
    assert not decision.saturated
    assert decision.deciding_lens is None
    assert "No saturation found by lens(es) attention over layers 1..6" in decision.explanation
    assert "No saturation found" in caplog.text


def test_published_llava_curve_shape():
    # Text-to-image attention of LLaVA-1.5-7B as described for its 32 layers: 0.68 at layer 0, about
    # 0.07 by layer 4 and near 0.04 from layer 18 on. The layers in between are interpolated geometrically.
    attention = [0.68, 0.4, 0.2, 0.11, 0.07]
    attention += [0.04 + 0.03 * (0.003 / 0.03) ** ((layer - 4) / 14) for layer in range(5, 18)]
    attention += [0.04] * 14
    decision = choose_split(curves(attention), SplitRule())
    assert decision.saturated
    assert 9 <= decision.split_layer <= 12


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (SplitRule(lenses=("attention", "colour")), "Invalid split-rule lenses attention,colour"),
        (SplitRule(lenses=()), "Invalid split-rule lenses"),
        (SplitRule(attention_tolerance=1.5), "Invalid attention_tolerance 1.5"),
        (SplitRule(cosine_threshold=2.0), "Invalid cosine_threshold 2.0"),
        (SplitRule(min_split=7), "Invalid min_split 7: it must lie in 1..6"),
        (SplitRule(num_fusion_layers=7), "Invalid num_fusion_layers 7"),
    ],
)
def test_invalid_rules(rule, message):
    with pytest.raises(InvalidInputError, match=message):
        choose_split(curves([0.5] * 8), rule)


# --------------------------------------------------------------------------- report, table and plot


def measurements() -> LensMeasurements:
    generator = torch.Generator().manual_seed(0)
    attention = torch.tensor([[0.9, 0.8, 0.05, 0.04, 0.05, 0.3], [0.7, 0.6, 0.03, 0.04, 0.03, 0.4]], dtype=torch.float64)
    values = {name: torch.rand(2, 6, generator=generator, dtype=torch.float64) for name in LENS_NAMES}
    values["attention_mass"] = attention
    return LensMeasurements(["a", "b"], values)


def report_for(measured: LensMeasurements) -> dict:
    layers = layer_statistics(measured)
    decision = choose_split(mean_curves(layers), SplitRule())
    return {
        "schema_version": SCHEMA_VERSION,
        "version": "0.1.0",
        "model": {"model": "tiny"},
        "calibration": {"source": "builtin", "num_samples": 2},
        "layers": layers,
        "split": decision.to_dict(),
        "samples": per_sample_values(measured),
    }


def test_layer_statistics_mean_and_spread():
    layers = layer_statistics(measurements())
    assert layers[0]["layer"] == 0
    assert layers[0]["attention_mass"] == {"mean": 0.8, "std": 0.1, "min": 0.7, "max": 0.9}
    assert layers[5]["attention_mass"]["mean"] == pytest.approx(0.35)
    assert set(layers[3]) == {"layer", *LENS_NAMES}


def test_report_summary_table_and_json(tmp_path):
    report = report_for(measurements())
    assert report["split"]["split_layer"] == 2
    assert report["samples"]["attention_mass"][1][5] == 0.4

    summary = saturation_summary(report)
    assert summary["split_layer"] == 2
    assert summary["calibration_source"] == "builtin"
    assert summary["curves"]["attention_mass"] == [0.8, 0.7, 0.04, 0.04, 0.04, 0.35]
    assert summary["rule"]["lenses"] == ["attention"]

    table = format_table(report)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["layer", "text->image"]
    assert lines[2].startswith("0      0.8000 +- 0.1000")
    assert lines[2].endswith("shared")
    assert lines[4].endswith("text only  <- split")
    assert lines[7].endswith("fusion")
    assert "Split 2, set by the attention lens" in table

    path = write_report(report, tmp_path / "out")
    assert json.loads(path.read_text()) == report


def test_plot_writes_png(tmp_path):
    path = plot_saturation(report_for(measurements()), tmp_path / "plots" / "saturation.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert 10_000 < len(data) < 200_000
