"""`dpvr-surgery analyze` and `convert --split auto` on tiny real checkpoints with a processor."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import yaml
from click.testing import CliRunner
from test_analysis_lenses import make_collapse_model
from tiny_models import make_tiny_llava, tiny_processor

from dpvr_surgery.analysis import PLOT_FILE_NAME, REPORT_FILE_NAME
from dpvr_surgery.cli import main

NUM_LAYERS = 6


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def save_with_processor(model, folder):
    model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_with_processor(make_tiny_llava(seed=3), tmp_path_factory.mktemp("analyze") / "source")


@pytest.fixture(scope="module")
def collapse_source(tmp_path_factory):
    return save_with_processor(make_collapse_model(3), tmp_path_factory.mktemp("analyze") / "collapse")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(4):
        pixels = rng.integers(0, 255, (30 + index, 40, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f"image{index}.png")
    return folder


def test_analyze_table_report_and_plot(source, images, tmp_path):
    output = tmp_path / "analysis"
    result = run("analyze", source, "--data", images, "--prompt", "w3 w4 w5", "-o", output, "-q")
    assert result.exit_code == 0, result.output
    assert "text->image attention" in result.output
    assert "<- split" in result.output
    assert f"Wrote {output / REPORT_FILE_NAME}" in result.output
    assert (output / PLOT_FILE_NAME).read_bytes().startswith(b"\x89PNG")

    report = json.loads((output / REPORT_FILE_NAME).read_text())
    assert report["schema_version"] == 1
    assert report["model"]["num_layers"] == NUM_LAYERS
    assert report["model"]["image_tokens_per_image"] == 16
    assert report["model"]["mode"] == "in_memory"
    assert report["calibration"]["source"] == "image_folder"
    assert sorted(report["calibration"]["sample_ids"]) == [f"image{index}.png" for index in range(4)]
    assert len(report["layers"]) == NUM_LAYERS
    assert len(report["samples"]["attention_mass"]) == 4
    assert 1 <= report["split"]["split_layer"] <= NUM_LAYERS - 2


def test_analyze_json_and_overwrite(source, tmp_path):
    output = tmp_path / "analysis"
    first = run("analyze", source, "--num-calibration-samples", "2", "-o", output, "--json", "-q")
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["calibration"]["source"] == "builtin"
    assert report["calibration"]["num_samples"] == 2

    again = run("analyze", source, "--num-calibration-samples", "2", "-o", output, "-q")
    assert again.exit_code == 2
    assert f"Output {output / REPORT_FILE_NAME} already exists. Pass --overwrite" in again.output

    replaced = run("analyze", source, "--num-calibration-samples", "2", "-o", output, "--overwrite", "--json", "-q")
    assert replaced.exit_code == 0, replaced.output
    second = json.loads(replaced.stdout)
    for key in ("layers", "split", "samples", "calibration"):
        assert second[key] == report[key], key


def test_analyze_sequential_matches_in_memory(source, tmp_path):
    reports = {}
    for mode in ("--sequential", "--in-memory"):
        result = run(
            "analyze", source, "--num-calibration-samples", "3", "--batch-size", "2", mode, "-o", tmp_path / mode,
            "--json", "-q",
        )
        assert result.exit_code == 0, result.output
        reports[mode] = json.loads(result.stdout)
    assert reports["--sequential"]["model"]["mode"] == "sequential"
    assert reports["--in-memory"]["model"]["mode"] == "in_memory"
    for layered, loaded in zip(reports["--sequential"]["layers"], reports["--in-memory"]["layers"], strict=True):
        for name in ("attention_mass", "cosine_similarity", "logit_lens_kl", "logit_lens_top1"):
            assert layered[name]["mean"] == pytest.approx(loaded[name]["mean"], abs=1e-5), (layered["layer"], name)


def test_analyze_llava_json_with_missing_image(source, tmp_path):
    PIL.Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(tmp_path / "present.png")
    records = [
        {"id": "a", "image": "present.png", "conversations": [{"from": "human", "value": "<image>\nw5"},
                                                              {"from": "gpt", "value": "w6 w7"}]},
        {"id": "b", "image": "absent.png", "conversations": [{"from": "human", "value": "<image>\nw5"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "w5"}]},
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    result = run("analyze", source, "--data", data, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calibration"]["sample_ids"] == ["a"]
    assert report["calibration"]["skipped_images"] == 1
    assert report["calibration"]["records_without_image"] == 1
    assert "Skipped 1 sample(s) whose image is missing or unreadable" in result.stderr


def test_analyze_without_readable_images(source, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"no image here")
    result = run("analyze", source, "--data", folder, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 2
    assert "No calibration sample left" in result.output


def test_analyze_rule_flags_and_recipe(collapse_source, tmp_path):
    found = run("analyze", collapse_source, "--num-calibration-samples", "3", "-o", tmp_path / "a", "--json", "-q")
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)["split"]["split_layer"] == 3

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"version": 1, "analyze": {"num_calibration_samples": 2, "min_split": 4}}))
    from_recipe = run("analyze", collapse_source, "--recipe", recipe, "-o", tmp_path / "b", "--json", "-q")
    assert from_recipe.exit_code == 0, from_recipe.output
    report = json.loads(from_recipe.stdout)
    assert report["calibration"]["num_samples"] == 2
    assert report["split"]["split_layer"] == 4

    flag_wins = run(
        "analyze", collapse_source, "--recipe", recipe, "--min-split", "2", "-o", tmp_path / "c", "--json", "-q"
    )
    assert json.loads(flag_wins.stdout)["split"]["split_layer"] == 3

    bad_lens = run("analyze", collapse_source, "--rule-lenses", "attention,colour", "-o", tmp_path / "d")
    assert bad_lens.exit_code == 2
    assert "Invalid --rule-lenses 'attention,colour'" in bad_lens.output


def test_convert_split_auto_is_default(collapse_source, tmp_path):
    output = tmp_path / "converted"
    result = run("convert", collapse_source, "-o", output, "--no-verify", "-q")
    assert result.exit_code == 0, result.output

    config = json.loads((output / "config.json").read_text())
    assert config["split_layer"] == 3
    saturation = config["saturation"]
    assert saturation["split_layer"] == 3
    assert saturation["saturated"] is True
    assert saturation["calibration_source"] == "builtin"
    assert len(saturation["curves"]["attention_mass"]) == NUM_LAYERS

    assert (output / "saturation.png").read_bytes().startswith(b"\x89PNG")
    assert "![saturation curves](saturation.png)" in (output / "README.md").read_text()
    assert json.loads((output / "dpvr_report.json").read_text())["saturation"] == saturation
    assert yaml.safe_load((output / "dpvr_recipe.yaml").read_text())["convert"]["split"] == 3


def test_convert_split_auto_reads_analyze_section(collapse_source, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"version": 1, "analyze": {"num_calibration_samples": 2, "min_split": 4}}))
    output = tmp_path / "converted"
    result = run("convert", collapse_source, "-o", output, "--split", "auto", "--recipe", recipe, "--no-verify", "-q")
    assert result.exit_code == 0, result.output
    config = json.loads((output / "config.json").read_text())
    assert config["split_layer"] == 4
    assert config["saturation"]["num_samples"] == 2


def test_convert_split_auto_dry_run_and_numbers(source, tmp_path):
    dry = run("convert", source, "-o", tmp_path / "dry", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "--split auto: the saturation analysis chooses the split when converting" in dry.stderr
    assert "previews split 3" in dry.stderr
    assert not (tmp_path / "dry").exists()

    output = tmp_path / "fixed"
    fixed = run("convert", source, "-o", output, "--split", "2", "--no-verify", "-q")
    assert fixed.exit_code == 0, fixed.output
    assert json.loads((output / "config.json").read_text())["saturation"] is None
    assert not (output / "saturation.png").exists()
    assert "Visual saturation" not in (output / "README.md").read_text()

    invalid = run("convert", source, "-o", tmp_path / "bad", "--split", "half")
    assert invalid.exit_code == 2
    assert "'half' is not a layer number or 'auto'" in invalid.output


def test_convert_split_auto_failure_names_the_fix(tmp_path):
    source = tmp_path / "no-processor"
    make_tiny_llava(seed=3).save_pretrained(source)
    result = run("convert", source, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 2
    assert "--split auto failed: Cannot load the processor" in result.output
    assert "Pass --split N to choose the split yourself" in result.output


def test_convert_split_auto_without_saturation_stops(source, tmp_path):
    # Attention mass is never exactly zero in a random model, so this rule finds no saturated layer.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"version": 1, "analyze": {"num_calibration_samples": 2,
                                                                "attention_threshold": 0.0}}))
    output = tmp_path / "converted"
    result = run("convert", source, "-o", output, "--recipe", recipe, "--no-verify", "-q")

    assert result.exit_code == 2
    assert "--split auto found no saturated layer" in result.output
    assert "Pass --split N" in result.output
    assert not output.exists()
    kept = re.search(r"The report and plot are in (\S+)\. ", result.output)
    assert kept is not None
    assert (Path(kept.group(1)) / "saturation_report.json").is_file()
    shutil.rmtree(kept.group(1))
