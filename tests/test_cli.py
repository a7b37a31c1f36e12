"""The command line: inspect, convert, generate and demo, with their exit codes and messages."""

import json
import re

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner
from test_convert import save_source

from dpvr_surgery.cli import main


def run(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "source"
    save_source(folder)
    return folder


def test_inspect_llava_7b_numbers():
    result = run("inspect", "--shape", "llava-1.5-7b", "--split", "18", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    parameters = report["parameters"]
    assert parameters["source_total"] == 7_063_427_072
    assert parameters["trainable"] == 202_383_360
    assert round(100 * parameters["trainable_fraction_of_source"], 2) == 2.87
    assert round(100 * parameters["trainable_fraction_of_converted"], 2) == 2.79
    assert report["costs"]["original"]["token_layers"] == 20_480
    assert report["costs"]["converted"]["token_layers"] == 13_568
    assert report["architecture"]["image_tokens_per_image"] == 576


def test_inspect_table_of_a_folder(source_dir):
    result = run("inspect", source_dir, "--split", "3")
    assert result.exit_code == 0, result.output
    assert "split layer 3" in result.output
    assert "image tokens per image  16" in result.output


def test_inspect_needs_model_or_shape():
    result = run("inspect")
    assert result.exit_code == 2
    assert "Pass either MODEL or --shape, not neither" in result.output


def test_convert_cli_and_errors(source_dir, tmp_path):
    output = tmp_path / "converted"
    dry = run("convert", source_dir, "-o", output, "--split", "2", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "keys checked" in dry.output
    assert not output.exists()

    done = run("convert", source_dir, "-o", output, "--split", "2", "-q")
    assert done.exit_code == 0, done.output
    assert "Verified: text-only logits match the source's (max abs diff" in done.output

    from_converted = run("inspect", output, "--json")
    from_source = run("inspect", source_dir, "--split", "2", "--json")
    assert from_converted.exit_code == 0, from_converted.output
    converted_report, source_report = json.loads(from_converted.output), json.loads(from_source.output)
    assert converted_report.pop("model") != source_report.pop("model")
    assert converted_report == source_report
    other_split = run("inspect", output, "--split", "3")
    assert other_split.exit_code == 2
    assert "already converted with split layer 2" in other_split.output

    again = run("convert", source_dir, "-o", output, "--split", "2")
    assert again.exit_code == 2
    assert "--overwrite" in again.output

    out_of_range = run("convert", source_dir, "-o", tmp_path / "other", "--split", "7")
    assert out_of_range.exit_code == 2
    assert "valid range 1..4" in out_of_range.output

    onto_source = run("convert", source_dir, "-o", source_dir, "--split", "2", "--overwrite")
    assert onto_source.exit_code == 2
    assert "would replace the input" in onto_source.output
    assert (source_dir / "config.json").is_file()


def test_convert_recipe_and_overrides(source_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("version: 1\nconvert:\n  split: 3\n  side_init: copy-last\n")

    from_recipe = run("convert", source_dir, "-o", tmp_path / "a", "--recipe", recipe, "--no-verify", "-q")
    assert from_recipe.exit_code == 0, from_recipe.output
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["split_layer"] == 3
    assert config["side_branch_init"] == "copy-last"

    overridden = run(
        "convert", source_dir, "-o", tmp_path / "b", "--recipe", recipe, "--set", "convert.split=4", "--no-verify", "-q"
    )
    assert json.loads((tmp_path / "b" / "config.json").read_text())["split_layer"] == 4, overridden.output

    flag_wins = run(
        "convert", source_dir, "-o", tmp_path / "c", "--recipe", recipe, "--set", "convert.split=4", "--split", "1",
        "--no-verify", "-q",
    )
    assert json.loads((tmp_path / "c" / "config.json").read_text())["split_layer"] == 1, flag_wins.output

    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nconvert:\n  splitt: 3\n")
    rejected = run("convert", source_dir, "-o", tmp_path / "d", "--recipe", bad)
    assert rejected.exit_code == 2
    assert "unknown key(s) splitt in section convert" in rejected.output


def test_generate_original_and_converted(source_dir, tmp_path):
    image = tmp_path / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
    converted = tmp_path / "converted"
    assert run("convert", source_dir, "-o", converted, "--split", "2", "-q").exit_code == 0

    for model in (source_dir, converted):
        result = run("generate", model, "--image", image, "--prompt", "w5 w6", "--max-new-tokens", "5", "--json", "-q")
        assert result.exit_code == 0, result.output
        answer = json.loads(result.output)
        assert answer["new_tokens"] == 5
        # "user:" (unknown word), 16 image tokens, w5, w6 and the generation prompt w2.
        assert answer["prompt_tokens"] == 1 + 16 + 3

    text_only = [
        json.loads(run("generate", model, "--prompt", "w7 w8 w9", "--max-new-tokens", "6", "--json", "-q").output)["text"]
        for model in (source_dir, converted)
    ]
    assert text_only[0] == text_only[1]


def test_generate_unreadable_image(source_dir, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    result = run("generate", source_dir, "--image", broken, "--prompt", "w5")
    assert result.exit_code == 2
    assert f"Cannot read image {broken}" in result.output


def test_demo_end_to_end(tmp_path):
    # The real SmolLM2-135M-Instruct weights: text-only answers must equal the original's exactly.
    result = run("demo", "-o", tmp_path / "demo", "--max-new-tokens", "12", "--repeats", "1",
                 "--per-category", "1", "--calibration-samples", "4", "-q")
    assert result.exit_code == 0, result.output
    assert result.output.count("identical: yes") == 2
    assert "The capital of France is Paris" in result.output
    assert "Saturation per decoder layer" in result.output
    # The analysis's split when it finds saturation, else the demo's stated fallback (never the
    # analysis's own fallback to the latest layer, which would save nothing).
    assert re.search(r"Split layer: \d+ \((chosen by the analysis|the analysis found no saturation)", result.output)
    assert "Split layer: 28 " not in result.output
    used = re.search(r"Split layer: (\d+) ", result.output).group(1)
    assert re.search(rf"^{used} .*text only  <- split$", result.output, flags=re.MULTILINE)
    assert "Held-out accuracy, before and after conversion (6 scene questions" in result.output
    assert "Prefill, one scene question" in result.output
    assert (tmp_path / "demo" / "analysis" / "saturation.png").is_file()
