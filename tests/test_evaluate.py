"""`dpvr-surgery eval` and `dpvr_surgery.evaluate` on tiny real checkpoints and generated shape scenes."""

import json

import pytest
from click.testing import CliRunner
from finetune_helpers import convert_tiny, save_tiny_llava

from dpvr_surgery.cli import main
from dpvr_surgery.errors import InvalidInputError
from dpvr_surgery.evaluate import (
    EvalRequest,
    format_eval_result,
    load_eval_samples,
    normalize_answer,
    run_evaluation,
)
from dpvr_surgery.scenes import CATEGORIES, held_out_records, write_llava_json

PER_CATEGORY = 2


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    source = save_tiny_llava(root / "source", seed=5)
    converted = convert_tiny(source, root / "converted", split=3)
    return source, converted


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    records = held_out_records(7, per_category=PER_CATEGORY)
    return write_llava_json(records, tmp_path_factory.mktemp("held-out"))


def request_for(model, data, **settings) -> EvalRequest:
    return EvalRequest(model=str(model), data=data, device="cpu", max_new_tokens_short=6, max_new_tokens_long=12,
                       **settings)


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Red.", "red"),
        ("  The RED circle! ", "red circle"),
        ("three", "3"),
        ("There are two shapes: a red circle at the top left.", "there are 2 shapes red circle at top left"),
        ("bottom-right", "bottom right"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


# --------------------------------------------------------------------------- data


def test_load_samples_reads_first_exchange(held_out):
    samples = load_eval_samples(held_out)

    assert len(samples) == PER_CATEGORY * len(CATEGORIES)
    first = samples[0]
    assert first.category == "color"
    assert first.content[0] == {"type": "image"}
    assert first.content[1]["type"] == "text"
    assert first.question.startswith("What color is the ")
    assert first.image_paths[0].is_file()


def test_load_samples_per_category_and_max(held_out):
    per_category = load_eval_samples(held_out, per_category=1)
    capped = load_eval_samples(held_out, max_samples=4)

    assert sorted(sample.category for sample in per_category) == sorted(CATEGORIES)
    assert len(capped) == 4


def test_load_samples_placeholder_positions(tmp_path, held_out):
    image = load_eval_samples(held_out)[0].image_paths[0]
    rows = [
        {"id": "no-placeholder", "image": str(image), "conversations": [
            {"from": "human", "value": "Which color?"}, {"from": "gpt", "value": "red"}]},
        {"id": "after-text", "image": str(image), "conversations": [
            {"from": "human", "value": "Look:\n<image>\nWhich color?"}, {"from": "gpt", "value": "red"}]},
        {"id": "text-only", "conversations": [
            {"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}]},
    ]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))

    no_placeholder, after_text, text_only = load_eval_samples(path, image_folder=tmp_path)

    assert no_placeholder.content == ({"type": "image"}, {"type": "text", "text": "Which color?"})
    assert after_text.content == (
        {"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": "Which color?"})
    assert text_only.content == ({"type": "text", "text": "Say red."},)
    assert text_only.image_paths == ()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ({"id": "x"}, "expected a JSON list of rows, got dict"),
        ([{"id": "x", "conversations": [{"from": "human", "value": "Hi"}]}],
         "no human turn followed by a gpt turn"),
        ([{"id": "x", "image": "missing.png", "conversations": [
            {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "yes"}]}],
         "Image file not found for row 'x'"),
        ([{"id": "x", "conversations": [
            {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "yes"}]}],
         "contains 1 <image> placeholder\\(s\\) for 0 image\\(s\\)"),
        ([], "the file contains no rows"),
    ],
)
def test_load_samples_rejects_bad_rows(tmp_path, rows, message):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))

    with pytest.raises(InvalidInputError, match=message):
        load_eval_samples(path)


def test_load_samples_rejects_missing_file(tmp_path):
    with pytest.raises(InvalidInputError, match="Data file not found: .*nothing.json"):
        load_eval_samples(tmp_path / "nothing.json")


def test_request_rejects_zero_limits(held_out):
    with pytest.raises(InvalidInputError, match="Invalid max_new_tokens_long=0: it must be a positive integer"):
        run_evaluation(EvalRequest(model="unused", data=held_out, max_new_tokens_long=0))


# --------------------------------------------------------------------------- metrics


def test_model_against_itself(models, held_out):
    source, _ = models
    summary = run_evaluation(request_for(source, held_out, reference=str(source))).summary()

    everything = summary["groups"]["all"]
    assert everything["samples"] == PER_CATEGORY * len(CATEGORIES)
    assert everything["answer_agreement"] == 1.0
    assert everything["token_agreement"] == 1.0
    assert everything["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert everything["positions"] > 0


def test_groups_split_by_answer_tokens(models, held_out):
    source, _ = models
    result = run_evaluation(request_for(source, held_out))
    groups = {sample.sample_id: sample.group for sample in result.samples}

    # The tiny tokenizer has one token per character: captions are long, one-word answers short.
    assert {groups[key] for key in groups if key.startswith("caption")} == {"long"}
    assert {groups[key] for key in groups if not key.startswith("caption")} == {"short"}
    assert result.summary()["groups"]["long"]["samples"] == PER_CATEGORY

    everything_short = run_evaluation(request_for(source, held_out, long_answer_tokens=500))
    assert {sample.group for sample in everything_short.samples} == {"short"}


def test_converted_model_drifts_on_images_only(models, held_out, tmp_path):
    source, converted = models
    image = load_eval_samples(held_out)[0].image_paths[0]
    rows = json.loads(held_out.read_text())[:3]
    for row in rows:
        row["image"] = str(image.parent / (row["id"] + ".png"))
    rows.append({"id": "text-only", "conversations": [
        {"from": "human", "value": "Say something."}, {"from": "gpt", "value": "something"}]})
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))

    result = run_evaluation(request_for(converted, path, reference=str(source)))
    by_id = {sample.sample_id: sample for sample in result.samples}

    text_only = by_id["text-only"]
    assert text_only.kl_sum / text_only.positions == pytest.approx(0.0, abs=1e-6)
    assert text_only.top1_matches == text_only.positions
    image_kl = sum(by_id[row["id"]].kl_sum for row in rows[:3]) / sum(by_id[row["id"]].positions for row in rows[:3])
    assert image_kl > 1e-4


def test_accuracy_counts_normalised_matches(models, held_out, tmp_path):
    source, _ = models
    # Every answer counts as short, so both runs generate with the same token limit.
    first = run_evaluation(request_for(source, held_out, max_samples=4, long_answer_tokens=500))
    rows = json.loads(held_out.read_text())[:4]
    for row, sample in zip(rows, first.samples):
        # Two rows expect the model's own answer, in upper case with a full stop; two expect another answer.
        matching = row["id"] in {rows[0]["id"], rows[1]["id"]}
        row["conversations"][1]["value"] = sample.prediction.upper() + "." if matching else "zzz-no-match"
        row["image"] = str(held_out.parent / row["image"])
    path = tmp_path / "expected.json"
    path.write_text(json.dumps(rows))

    summary = run_evaluation(request_for(source, path, long_answer_tokens=500)).summary()

    assert summary["groups"]["all"]["accuracy"] == 0.5
    assert "answer_agreement" not in summary["groups"]["all"]
    assert "reference_accuracy" not in summary

    # Against itself as the reference, the reference's own answers score the same and all of it is kept.
    against_itself = run_evaluation(request_for(source, path, long_answer_tokens=500, reference=str(source)))
    compared = against_itself.summary()
    assert compared["reference_accuracy"]["all"] == 0.5
    assert compared["reference_accuracy"]["short"] == 0.5
    assert compared["accuracy_kept"] == 1.0
    assert "reference accuracy: short 50.0%" in format_eval_result(against_itself)


# --------------------------------------------------------------------------- command line


def test_eval_cli_json_and_output_file(models, held_out, tmp_path):
    source, converted = models
    output = tmp_path / "eval.json"
    result = run("eval", converted, "--data", held_out, "--reference", source, "--per-category", 1,
                 "--max-new-tokens-short", 4, "--max-new-tokens-long", 8, "--device", "cpu", "--json", "-o", output,
                 "-q")

    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["groups"]["all"]["samples"] == len(CATEGORIES)
    assert summary["groups"]["long"]["samples"] == 1
    assert set(summary["categories"]) == set(CATEGORIES)
    assert summary["reference"] == str(source)
    written = json.loads(output.read_text())
    assert len(written["per_sample"]) == len(CATEGORIES)
    assert written["per_sample"][0]["reference_prediction"] is not None


def test_eval_cli_table(models, held_out):
    source, _ = models
    result = run("eval", source, "--data", held_out, "--max-samples", 2, "--max-new-tokens-short", 4,
                 "--device", "cpu", "-q")

    assert result.exit_code == 0, result.output
    assert "group  samples accuracy" in result.output
    assert "Accuracy per category: color" in result.output


def test_eval_cli_bad_data_exits_2(models, tmp_path):
    source, _ = models
    path = tmp_path / "broken.json"
    path.write_text("{not json")

    result = run("eval", source, "--data", path, "-q")

    assert result.exit_code == 2
    assert f"Invalid data file {path}: it is not JSON" in result.output
