"""Fine-tuning data: LLaVA conversation rows, label masking, truncation, collation and distillation prompts."""

import json
from pathlib import Path

import PIL.Image
import pytest
import torch
from finetune_helpers import (
    END_TOKEN_ID,
    USER_ASSISTANT_TEMPLATE,
    tiny_processor,
    write_conversations,
    write_images,
)
from tiny_models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, tiny_llava_config

from dpvr_surgery.errors import InvalidInputError
from dpvr_surgery.finetune.collate import collate_samples
from dpvr_surgery.finetune.data import (
    IGNORE_INDEX,
    ConversationDataset,
    ConversationEncoder,
    DistillationDataset,
    builtin_images,
    distillation_items,
    load_conversations,
)
from dpvr_surgery.finetune.objectives import supervised_targets

IMAGE_TOKENS = 16


@pytest.fixture(scope="module")
def config():
    return tiny_llava_config()


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def make_encoder(processor, config, max_length: int = 512, eos: tuple[int, ...] = (END_TOKEN_ID,)):
    return ConversationEncoder(processor, config, max_length=max_length, eos_token_ids=list(eos))


def conversation(*turns: str) -> list[dict]:
    return [{"from": "human" if number % 2 == 0 else "gpt", "value": value} for number, value in enumerate(turns)]


def decode(processor, ids) -> str:
    return processor.tokenizer.decode([int(token) for token in ids])


def labelled_text(processor, sample) -> str:
    return decode(processor, sample.labels[sample.labels != IGNORE_INDEX])


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_images(tmp_path / "images", 3)
    return tmp_path


def test_labels_keep_only_assistant_turns(processor, config, data_dir):
    rows = [{"id": "a", "image": "image0.png",
             "conversations": conversation("<image>\nWhat is it?", "A cat.", "Which color?", "Red.")}]
    path = write_conversations(data_dir / "data.json", rows)
    loaded, _ = load_conversations(path, data_dir / "images")
    sample = ConversationDataset(loaded, make_encoder(processor, config))[0]

    assert labelled_text(processor, sample) == "A cat.<|im_end|>\nRed.<|im_end|>\n"
    text = decode(processor, sample.input_ids)
    assert text.startswith("<|im_start|>user\n" + "<image>" * IMAGE_TOKENS + "\nWhat is it?<|im_end|>")
    assert int((sample.input_ids == IMAGE_TOKEN_ID).sum()) == IMAGE_TOKENS
    assert not bool((sample.labels == IMAGE_TOKEN_ID).any())
    assert sample.pixel_values.shape == (1, 3, 32, 32)


def test_human_turn_tokens_are_masked(processor, config, data_dir):
    rows = [{"id": "a", "image": "image0.png", "conversations": conversation("<image>\nQuestion one", "Answer.")}]
    loaded, _ = load_conversations(write_conversations(data_dir / "d.json", rows), data_dir / "images")
    sample = ConversationDataset(loaded, make_encoder(processor, config))[0]

    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    question = processor.tokenizer.encode("Question one", add_special_tokens=False)
    start = next(i for i in range(len(ids)) if ids[i : i + len(question)] == question)
    assert all(label == IGNORE_INDEX for label in labels[start : start + len(question)])
    kept = [(token, label) for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert all(token == label for token, label in kept)


def test_template_without_end_token_gets_eos(config, data_dir):
    processor = tiny_processor(USER_ASSISTANT_TEMPLATE)
    rows = [{"id": "a", "image": "image0.png", "conversations": conversation("<image>\nWhat?", "A cat.", "More?", "No.")}]
    loaded, _ = load_conversations(write_conversations(data_dir / "d.json", rows), data_dir / "images")
    sample = ConversationDataset(loaded, make_encoder(processor, config))[0]

    assert labelled_text(processor, sample) == " A cat. <|im_end|> No. <|im_end|>"
    assert decode(processor, sample.input_ids).endswith("ASSISTANT: A cat. <|im_end|>USER: More? ASSISTANT: No. <|im_end|>")


def test_no_eos_ids_adds_nothing(config, data_dir):
    processor = tiny_processor(USER_ASSISTANT_TEMPLATE)
    rows = [{"id": "a", "conversations": conversation("Hi", "Hello.")}]
    loaded, _ = load_conversations(write_conversations(data_dir / "d.json", rows), data_dir / "images")
    sample = ConversationDataset(loaded, make_encoder(processor, config, eos=()))[0]

    assert labelled_text(processor, sample) == " Hello. "


def test_text_only_rows_and_missing_images(processor, config, data_dir):
    rows = [
        {"id": "text", "conversations": conversation("Hi", "Hello.")},
        {"id": "ok", "image": "image1.png", "conversations": conversation("<image>\nWhat?", "Noise.")},
        {"id": "gone", "image": "missing.png", "conversations": conversation("<image>\nWhat?", "?")},
        {"id": "gone2", "image": "sub/missing2.jpg", "conversations": conversation("<image>\nWhat?", "?")},
    ]
    loaded, stats = load_conversations(write_conversations(data_dir / "d.json", rows), data_dir / "images")

    assert [row.row_id for row in loaded] == ["text", "ok"]
    assert stats.rows == 4
    assert stats.kept == 2
    assert stats.text_only == 1
    assert stats.missing_images == 2
    assert stats.missing_examples == ["missing.png", "sub/missing2.jpg"]

    text_sample = ConversationDataset(loaded, make_encoder(processor, config))[0]
    assert text_sample.pixel_values is None
    assert labelled_text(processor, text_sample) == "Hello.<|im_end|>\n"


def test_every_image_missing_is_an_error(data_dir):
    rows = [{"id": "gone", "image": "missing.png", "conversations": conversation("<image>\nWhat?", "?")}]
    with pytest.raises(InvalidInputError, match=r"No usable rows .* 1 skipped for missing images"):
        load_conversations(write_conversations(data_dir / "d.json", rows), data_dir / "images")


def test_placeholder_added_when_absent(processor, config, data_dir):
    rows = [{"id": "p", "image": "image0.png", "conversations": conversation("What is it?", "Noise.")}]
    loaded, stats = load_conversations(write_conversations(data_dir / "d.json", rows), data_dir / "images")
    sample = ConversationDataset(loaded, make_encoder(processor, config))[0]

    assert stats.placeholders_added == 1
    assert int((sample.input_ids == IMAGE_TOKEN_ID).sum()) == IMAGE_TOKENS


def test_placeholder_after_text(processor, config, data_dir):
    rows = [{"id": "p", "image": "image0.png", "conversations": conversation("What is it?\n<image>", "Noise.")}]
    loaded, _ = load_conversations(write_conversations(data_dir / "d.json", rows), data_dir / "images")
    sample = ConversationDataset(loaded, make_encoder(processor, config))[0]

    assert decode(processor, sample.input_ids).startswith("<|im_start|>user\nWhat is it?<image>")


def test_two_images_in_one_row(processor, config, data_dir):
    rows = [{"id": "two", "image": ["image0.png", "image1.png"],
             "conversations": conversation("<image>\n<image>\nCompare.", "Both noise.")}]
    loaded, _ = load_conversations(write_conversations(data_dir / "d.json", rows), data_dir / "images")
    sample = ConversationDataset(loaded, make_encoder(processor, config))[0]

    assert sample.pixel_values.shape[0] == 2
    assert int((sample.input_ids == IMAGE_TOKEN_ID).sum()) == 2 * IMAGE_TOKENS


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"id": "x"}, r"Invalid row 0: expected an object with a non-empty `conversations` list"),
        ({"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}, r"Invalid row 'x', turn 0: expected"),
        ({"id": "x", "conversations": conversation("only a question")}, r"Invalid row 'x': it has no gpt turn"),
        ({"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
         r"turns must alternate human, gpt"),
        ({"id": "x", "image": "image0.png", "conversations": conversation("<image> <image> two?", "no")},
         r"contain 2 <image> placeholder\(s\) for 1 image\(s\)"),
        ({"id": "x", "image": 7, "conversations": conversation("hi", "no")}, r"`image` must be a path"),
    ],
)
def test_malformed_rows_raise(data_dir, row, message):
    with pytest.raises(InvalidInputError, match=message):
        load_conversations(write_conversations(data_dir / "d.json", [row]), data_dir / "images")


def test_json_lines_accepted(data_dir):
    path = data_dir / "d.jsonl"
    path.write_text("\n".join(json.dumps({"id": str(i), "conversations": conversation("q", "a")}) for i in range(3)))
    loaded, stats = load_conversations(path, data_dir / "images")
    assert [row.row_id for row in loaded] == ["0", "1", "2"]
    assert stats.text_only == 3


def test_truncation_keeps_image_spans(processor, config, data_dir):
    rows = [{"id": "long", "image": "image0.png",
             "conversations": conversation("<image>\nDescribe.", "x" * 200)}]
    loaded, _ = load_conversations(write_conversations(data_dir / "d.json", rows), data_dir / "images")
    sample = ConversationDataset(loaded, make_encoder(processor, config, max_length=60))[0]

    assert sample.input_ids.shape[0] == 60
    assert sample.labels.shape[0] == 60
    assert int((sample.input_ids == IMAGE_TOKEN_ID).sum()) == IMAGE_TOKENS


def test_truncation_inside_image_span_raises(processor, config, data_dir):
    rows = [{"id": "cut", "image": "image0.png",
             "conversations": conversation("Please look at this picture carefully: <image>\nWhat?", "Noise.")}]
    loaded, _ = load_conversations(write_conversations(data_dir / "d.json", rows), data_dir / "images")
    dataset = ConversationDataset(loaded, make_encoder(processor, config, max_length=50))

    # 6 tokens of "<|im_start|>user\n", 39 of text, then the image at positions 45..60.
    with pytest.raises(InvalidInputError, match=r"Row 'cut' has 88 tokens; truncating it to max_seq_length 50 would "
                       r"cut image tokens \(the last one is at position 60, the first one cut at 50\)\. Raise "
                       r"--max-seq-length to at least 61"):
        dataset[0]


def test_collate_pads_labels_and_orders_images(processor, config, data_dir):
    rows = [
        {"id": "img", "image": "image0.png", "conversations": conversation("<image>\nWhat?", "Noise noise noise.")},
        {"id": "text", "conversations": conversation("Hi", "Hello.")},
        {"id": "img2", "image": "image1.png", "conversations": conversation("<image>\nAnd?", "More.")},
    ]
    loaded, _ = load_conversations(write_conversations(data_dir / "d.json", rows), data_dir / "images")
    dataset = ConversationDataset(loaded, make_encoder(processor, config))
    samples = [dataset[index] for index in range(3)]
    batch = collate_samples(samples, PAD_TOKEN_ID)

    lengths = [sample.input_ids.shape[0] for sample in samples]
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].sum() == length
        assert bool((batch["labels"][row, length:] == IGNORE_INDEX).all())
        assert bool((batch["input_ids"][row, length:] == PAD_TOKEN_ID).all())
    assert torch.equal(batch["pixel_values"], torch.cat([samples[0].pixel_values, samples[2].pixel_values]))
    assert batch["indices"].tolist() == [0, 1, 2]


def test_supervised_targets_shift_by_one():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, 7, IGNORE_INDEX, 8, 9]])
    positions, targets = supervised_targets(labels)

    assert positions.tolist() == [[False, True, True, False, False], [True, False, True, True, False]]
    assert targets.tolist() == [5, 6, 7, 8, 9]


def test_distillation_mask_covers_text_after_image(processor, config):
    image = PIL.Image.new("RGB", (40, 40), "red")
    items, _ = distillation_items(None, prompts=["What is it?"])
    items[0].image = image
    sample = DistillationDataset(items[:1], make_encoder(processor, config))[0]

    ids = sample.input_ids
    first_image = int((ids == IMAGE_TOKEN_ID).nonzero()[0])
    assert not bool(sample.loss_mask[: first_image + IMAGE_TOKENS].any())
    assert bool(sample.loss_mask[first_image + IMAGE_TOKENS :].all())
    assert decode(processor, ids).endswith("What is it?<|im_end|>\n<|im_start|>assistant\n")


def test_distillation_items_from_folder_and_json(data_dir):
    folder_items, folder_stats = distillation_items(data_dir / "images", prompts=["a", "b"])
    assert len(folder_items) == 6
    assert folder_stats["images"] == 3

    rows = [
        {"id": "img", "image": "image0.png", "conversations": conversation("<image>\nWhat is this?", "Noise.")},
        {"id": "text", "conversations": conversation("Hi", "Hello.")},
        {"id": "two", "image": ["image0.png", "image1.png"], "conversations": conversation("<image><image>x", "y")},
    ]
    json_items, json_stats = distillation_items(
        write_conversations(data_dir / "d.json", rows), image_folder=data_dir / "images"
    )
    assert [(item.name, item.prompt) for item in json_items] == [("img", "What is this?")]
    assert json_stats["skipped_multi_image"] == 1


def test_builtin_images_are_rgb():
    images = builtin_images()
    assert len(images) >= 20
    assert {image.mode for image in images.values()} == {"RGB"}


def test_processor_mismatch_raises(config, data_dir):
    processor = tiny_processor()
    processor.patch_size = 16  # 4 image tokens instead of the config's 16
    rows = [{"id": "a", "image": "image0.png", "conversations": conversation("<image>\nWhat?", "Noise.")}]
    loaded, _ = load_conversations(write_conversations(data_dir / "d.json", rows), data_dir / "images")

    with pytest.raises(InvalidInputError, match=r"with 16 image tokens per image \(from the model config\)"):
        ConversationDataset(loaded, make_encoder(processor, config))[0]
