"""Calibration data for the analysis: image folders, LLaVA conversation files, built-in photos, encoding."""

import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch
from tiny_models import IMAGE_TOKEN_ID, tiny_processor

from dpvr_surgery.analysis.batches import encode_samples, make_batches, render_prompt
from dpvr_surgery.analysis.data import (
    BUILTIN_PHOTOS,
    GENERIC_QUESTIONS,
    CalibrationSample,
    load_calibration_data,
    read_prompts_file,
)
from dpvr_surgery.errors import InvalidInputError

IMAGE_TOKENS = 16


def write_image(path, value: int = 100, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    for index in range(3):
        write_image(folder / f"photo{index}.png", value=50 * index)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_image_folder_with_one_prompt(image_folder):
    data = load_calibration_data(image_folder, prompts=["w3 w4"], shuffle=False)
    assert data.source == "image_folder"
    assert [sample.sample_id for sample in data.samples] == ["photo0.png", "photo1.png", "photo2.png"]
    assert data.samples[1].content == [{"type": "image"}, {"type": "text", "text": "w3 w4"}]
    assert data.samples[2].images[0].size == (40, 30)
    assert data.samples[0].images[0].mode == "RGB"


def test_prompts_file_used_in_turn(image_folder, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("first\n\nsecond\n")
    prompts = read_prompts_file(prompts_file)
    assert prompts == ["first", "second"]
    data = load_calibration_data(image_folder, prompts=prompts, shuffle=False)
    assert [sample.content[1]["text"] for sample in data.samples] == ["first", "second", "first"]


def test_empty_prompts_file(tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n  \n")
    with pytest.raises(InvalidInputError, match="contains no prompt"):
        read_prompts_file(prompts_file)


def test_num_samples_and_seeded_shuffle(image_folder):
    first = load_calibration_data(image_folder, num_samples=2, seed=3)
    again = load_calibration_data(image_folder, num_samples=2, seed=3)
    assert len(first.samples) == 2
    assert [s.sample_id for s in first.samples] == [s.sample_id for s in again.samples]
    orders = {tuple(s.sample_id for s in load_calibration_data(image_folder, seed=seed).samples) for seed in range(6)}
    assert len(orders) > 1


def test_unreadable_images_counted_once(image_folder, caplog):
    (image_folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (image_folder / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="dpvr_surgery"):
        data = load_calibration_data(image_folder, shuffle=False)
    assert len(data.samples) == 3
    assert data.skipped_images == 2
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Skipped 2 sample(s)" in warnings[0].getMessage()
    assert "broken.jpg" in warnings[0].getMessage()


def test_no_readable_image_is_an_error(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"garbage")
    with pytest.raises(InvalidInputError, match="No calibration sample left .* all 1 candidate image"):
        load_calibration_data(folder)


def test_folder_without_images(tmp_path):
    with pytest.raises(InvalidInputError, match="No images found in"):
        load_calibration_data(tmp_path)


def test_missing_data_path(tmp_path):
    with pytest.raises(InvalidInputError, match="Calibration data not found"):
        load_calibration_data(tmp_path / "nowhere")


def test_image_folder_rejects_image_folder_option(image_folder):
    with pytest.raises(InvalidInputError, match="applies only to a LLaVA JSON file"):
        load_calibration_data(image_folder, image_folder=image_folder)


def llava_records() -> list[dict]:
    """Records in the llava_v1_5_mix665k.json format, with a text-only row and a missing image."""
    return [
        {
            "id": "000000033471",
            "image": "coco/train2017/000000033471.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                {"from": "gpt", "value": "The bus in the image is white and red."},
                {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                {"from": "gpt", "value": "The back of the bus features an advertisement."},
            ],
        },
        {
            "id": "text-only",
            "conversations": [
                {"from": "human", "value": "Say hello."},
                {"from": "gpt", "value": "Hello."},
            ],
        },
        {
            "id": "missing",
            "image": "coco/train2017/missing.jpg",
            "conversations": [
                {"from": "human", "value": "Describe it.\n<image>"},
                {"from": "gpt", "value": "A cat."},
            ],
        },
        {
            "id": "trailing",
            "image": "gqa/images/2354786.jpg",
            "conversations": [
                {"from": "human", "value": "Is the sky dark?\n<image>"},
                {"from": "gpt", "value": "Yes"},
            ],
        },
    ]


@pytest.fixture
def llava_json(tmp_path):
    root = tmp_path / "llava"
    write_image(root / "coco/train2017/000000033471.jpg")
    write_image(root / "gqa/images/2354786.jpg", value=200)
    path = tmp_path / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps(llava_records()))
    return path, root


def test_llava_json_first_exchange_and_missing_image(llava_json, caplog):
    path, root = llava_json
    with caplog.at_level(logging.WARNING, logger="dpvr_surgery"):
        data = load_calibration_data(path, image_folder=root, shuffle=False)
    assert data.source == "llava_json"
    assert [sample.sample_id for sample in data.samples] == ["000000033471", "trailing"]
    assert data.records_without_image == 1
    assert data.skipped_images == 1
    assert "missing.jpg" in caplog.text

    first, trailing = data.samples
    assert first.content == [{"type": "image"}, {"type": "text", "text": "What are the colors of the bus in the image?"}]
    assert first.answer == "The bus in the image is white and red."
    assert trailing.content == [{"type": "text", "text": "Is the sky dark?"}, {"type": "image"}]
    assert trailing.messages()[1] == {"role": "assistant", "content": [{"type": "text", "text": "Yes"}]}


def test_llava_json_default_image_folder(llava_json):
    path, root = llava_json
    moved = root / path.name
    moved.write_text(path.read_text())
    assert len(load_calibration_data(moved).samples) == 2


def test_llava_json_invalid(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        load_calibration_data(path)
    path.write_text(json.dumps({"image": "a.jpg"}))
    with pytest.raises(InvalidInputError, match="expected a JSON list of records"):
        load_calibration_data(path)
    path.write_text(json.dumps([{"image": "a.jpg", "conversations": [{"from": "gpt", "value": "x"}]}]))
    with pytest.raises(InvalidInputError, match="no turn from 'human'"):
        load_calibration_data(path)
    path.write_text(json.dumps([{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image><image>"}]}]))
    with pytest.raises(InvalidInputError, match="2 <image> placeholders for 1 image"):
        load_calibration_data(path)


def test_llava_json_only_text_records(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([llava_records()[1]]))
    with pytest.raises(InvalidInputError, match="none of its 1 records has an image"):
        load_calibration_data(path)


def test_llava_json_rejects_prompt(llava_json):
    path, root = llava_json
    with pytest.raises(InvalidInputError, match="bring their own questions"):
        load_calibration_data(path, image_folder=root, prompts=["x"])


def test_builtin_photos():
    data = load_calibration_data(num_samples=len(BUILTIN_PHOTOS), shuffle=False)
    assert data.source == "builtin"
    assert [sample.sample_id for sample in data.samples] == [f"skimage:{name}" for name in BUILTIN_PHOTOS]
    for index, sample in enumerate(data.samples):
        image = sample.images[0]
        assert image.mode == "RGB"
        assert min(image.size) >= 100
        assert sample.content[1]["text"] == GENERIC_QUESTIONS[index % len(GENERIC_QUESTIONS)]
    assert len(load_calibration_data(num_samples=100).samples) == len(BUILTIN_PHOTOS)


def test_invalid_sample_count():
    with pytest.raises(InvalidInputError, match="Invalid number of calibration samples 0"):
        load_calibration_data(num_samples=0)


# --------------------------------------------------------------------------- encoding and batches


def sample_with(text: str, answer: str | None = None) -> CalibrationSample:
    image = PIL.Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8))
    return CalibrationSample("s", [{"type": "image"}, {"type": "text", "text": text}], [image], answer)


def encode(samples, max_seq_length=2048, per_image=IMAGE_TOKENS):
    return encode_samples(
        tiny_processor(),
        samples,
        image_token_id=IMAGE_TOKEN_ID,
        image_tokens_per_image=per_image,
        max_seq_length=max_seq_length,
    )


def test_encode_expands_image_and_keeps_answer():
    processor = tiny_processor()
    prompt = render_prompt(processor, sample_with("w5 w6", answer="w7 w8"))
    assert prompt == "user: <image> w5 w6 assistant: w7 w8 "
    (encoded,) = encode([sample_with("w5 w6", answer="w7 w8")])
    assert int((encoded.input_ids == IMAGE_TOKEN_ID).sum()) == IMAGE_TOKENS
    assert encoded.input_ids[-2:].tolist() == [7, 8]
    assert encoded.pixel_values.shape == (1, 3, 32, 32)


def test_render_prompt_without_chat_template():
    processor = tiny_processor()
    processor.chat_template = None
    assert render_prompt(processor, sample_with("w5", answer="w6")) == "USER: <image>\nw5 ASSISTANT: w6"


def test_encode_cuts_long_text_but_not_images(caplog):
    long_text = " ".join(f"w{index % 90 + 2}" for index in range(40))
    (kept,) = encode([sample_with(long_text)], max_seq_length=30)
    assert kept.input_ids.shape[0] == 30
    assert int((kept.input_ids == IMAGE_TOKEN_ID).sum()) == IMAGE_TOKENS

    with caplog.at_level(logging.WARNING, logger="dpvr_surgery"):
        with pytest.raises(InvalidInputError, match="No calibration sample fits --max-seq-length 10"):
            encode([sample_with("w5")], max_seq_length=10)
    assert "Dropped 1 sample(s)" in caplog.text


def test_encode_checks_image_token_count():
    with pytest.raises(InvalidInputError, match="produced 16 image tokens for 1 image.*expects 17 per image"):
        encode([sample_with("w5")], per_image=17)


def test_batches_pad_right_and_mark_tokens():
    short, long = encode([sample_with("w5"), sample_with("w5 w6 w7 w8", answer="w9")])
    (batch,) = make_batches(
        [short, long], batch_size=2, image_token_id=IMAGE_TOKEN_ID, pad_token_id=0, logit_lens_tokens=4
    )
    length = long.input_ids.shape[0]
    assert batch.input_ids.shape == (2, length)
    assert batch.attention_mask[0].tolist() == [1] * short.input_ids.shape[0] + [0] * (length - short.input_ids.shape[0])
    assert torch.equal(batch.image_mask.sum(dim=1), torch.tensor([IMAGE_TOKENS, IMAGE_TOKENS]))

    first_image = int(batch.image_mask[0].nonzero()[0])
    queries = batch.text_query_mask[0].nonzero().flatten()
    assert int(queries.min()) > first_image
    assert int(queries.max()) < short.input_ids.shape[0]
    assert not (batch.text_query_mask & batch.image_mask).any()
    assert [positions.numel() for positions in batch.lens_positions] == [4, 4]
    assert batch.pixel_values.shape == (2, 3, 32, 32)
