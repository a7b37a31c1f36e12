"""The shape-scene generator: determinism, and answers that the rendered pixels confirm."""

import json
import random

import numpy as np
import PIL.Image
import pytest

from dpvr_surgery.errors import InvalidInputError
from dpvr_surgery.scenes import (
    CATEGORIES,
    COLORS,
    GRID_SIZE,
    Scene,
    SceneObject,
    held_out_records,
    object_index_map,
    question_pool,
    random_scene,
    render_scene,
    scene_caption,
    training_records,
    write_llava_json,
)

SCENES = [random_scene(random.Random(seed)) for seed in range(40)]


def object_pixels(scene: Scene, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of the pixels drawn for object `index`."""
    return np.nonzero(object_index_map(scene) == index + 1)


def test_same_seed_same_records_and_images():
    first = held_out_records(7, per_category=2)
    second = held_out_records(7, per_category=2)

    assert first == second
    assert render_scene(first[0].scene).tobytes() == render_scene(second[0].scene).tobytes()
    assert held_out_records(8, per_category=2) != first


def test_held_out_has_each_category_in_order():
    records = held_out_records(7, per_category=3)

    assert [record.category for record in records[: len(CATEGORIES)]] == list(CATEGORIES)
    assert len(records) == 3 * len(CATEGORIES)
    for record in records:
        if record.category == "caption":
            assert len(record.scene.objects) >= 2


@pytest.mark.parametrize("scene", SCENES)
def test_color_and_shape_answers_match_pixels(scene):
    image = np.asarray(render_scene(scene))
    pool = question_pool(scene)

    for question in pool["color"]:
        shape = question.question.removeprefix("What color is the ").removesuffix("?")
        index = next(i for i, item in enumerate(scene.objects) if item.shape == shape)
        rows, columns = object_pixels(scene, index)
        assert rows.size > 20
        assert (image[rows, columns] == COLORS[question.answer]).all()

    for question in pool["shape"]:
        color = question.question.removeprefix("What shape is the ").removesuffix(" object?")
        index = next(i for i, item in enumerate(scene.objects) if item.color == color)
        assert scene.objects[index].shape == question.answer


@pytest.mark.parametrize("scene", SCENES)
def test_count_answers_match_drawn_objects(scene):
    drawn = len(np.unique(object_index_map(scene))) - 1
    pool = question_pool(scene)
    total = next(item for item in pool["count"] if item.question == "How many shapes are there?")

    assert int(total.answer) == drawn == len(scene.objects)
    for question in pool["count"]:
        assert 0 <= int(question.answer) <= len(scene.objects)


@pytest.mark.parametrize("scene", SCENES)
def test_position_answers_match_pixel_cells(scene):
    cell = scene.image_size / GRID_SIZE
    names = {item.name: index for index, item in enumerate(scene.objects)}

    for question in question_pool(scene)["position"]:
        index = names[question.question.removeprefix("Where is the ").removesuffix("?")]
        rows, columns = object_pixels(scene, index)
        # Every drawn pixel lies inside the object's grid cell.
        assert len(set((rows // cell).astype(int))) == 1
        assert len(set((columns // cell).astype(int))) == 1
        item = scene.objects[index]
        assert (int(rows[0] // cell), int(columns[0] // cell)) == (item.row, item.column)
        assert question.answer == item.position


@pytest.mark.parametrize("scene", SCENES)
def test_relation_answers_match_pixel_extents(scene):
    names = {item.name: index for index, item in enumerate(scene.objects)}
    phrases = ("to the left of", "to the right of", "above", "below")

    for question in question_pool(scene)["relation"]:
        text = question.question.removeprefix("Is the ").removesuffix("?")
        phrase = next(item for item in phrases if f" {item} the " in text)
        first_name, second_name = text.split(f" {phrase} the ")
        first_rows, first_columns = object_pixels(scene, names[first_name])
        second_rows, second_columns = object_pixels(scene, names[second_name])
        holds = {
            "to the left of": first_columns.max() < second_columns.min(),
            "to the right of": first_columns.min() > second_columns.max(),
            "above": first_rows.max() < second_rows.min(),
            "below": first_rows.min() > second_rows.max(),
        }[phrase]
        assert question.answer == ("yes" if holds else "no"), question


def test_relation_sampling_balances_yes_and_no():
    records = held_out_records(3, per_category=40)
    answers = [record.questions[0].answer for record in records if record.category == "relation"]

    assert 12 <= answers.count("yes") <= 28


def test_caption_lists_objects_in_reading_order():
    one = Scene((SceneObject("circle", "red", 1, 1, (48.0, 48.0), 10.0),), 96, 240)
    two = Scene(
        (SceneObject("square", "blue", 2, 2, (80.0, 80.0), 10.0), SceneObject("triangle", "green", 0, 0, (16.0, 16.0), 10.0)),
        96,
        240,
    )

    assert scene_caption(one) == "There is one shape: a red circle in the center."
    assert scene_caption(two) == (
        "There are two shapes: a green triangle at the top left and a blue square at the bottom right."
    )


def test_training_records_skip_excluded_layouts():
    unfiltered = training_records(11, 30, questions_per_scene=3)
    excluded = {record.scene.layout() for record in unfiltered}
    filtered = training_records(11, 30, questions_per_scene=3, exclude_layouts=excluded)

    assert not {record.scene.layout() for record in filtered} & excluded
    for record in unfiltered:
        categories = [question.category for question in record.questions]
        assert len(set(categories)) == len(categories)


def test_one_question_records_never_empty():
    records = training_records(4, 60, questions_per_scene=1)

    assert len(records) == 60
    assert all(len(record.questions) == 1 for record in records)
    assert any(len(record.scene.objects) == 1 for record in records)


def test_write_llava_json_format(tmp_path):
    records = training_records(5, 3, questions_per_scene=3)
    path = write_llava_json(records, tmp_path, name="train.json")

    rows = json.loads(path.read_text())
    assert len(rows) == 3
    for row, record in zip(rows, records):
        turns = row["conversations"]
        assert [turn["from"] for turn in turns] == ["human", "gpt"] * len(record.questions)
        assert turns[0]["value"] == "<image>\n" + record.questions[0].question
        assert all("<image>" not in turn["value"] for turn in turns[1:])
        assert turns[1]["value"] == record.questions[0].answer
        assert row["category"] == record.questions[0].category
        with PIL.Image.open(tmp_path / row["image"]) as image:
            assert image.size == (96, 96)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: random_scene(random.Random(0), image_size=20), "Invalid image_size=20: scenes need at least 24"),
        (lambda: held_out_records(0, per_category=0), "Invalid per_category=0: it must be a positive integer"),
        (lambda: training_records(0, 5, questions_per_scene=0), "Invalid questions_per_scene=0"),
    ],
)
def test_invalid_settings_rejected(call, message):
    with pytest.raises(InvalidInputError, match=message):
        call()
