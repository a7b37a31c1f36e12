"""Visual questions about rendered scenes of simple shapes, with answers that are correct by construction.

A scene places 1 to 4 shapes (circle, square or triangle, in five colours) in distinct cells of a 3 x 3 grid
on a light background, and no two shapes share both colour and shape, so "the red circle" names one
object. Each scene yields questions on colour, shape, count, position and relation (yes/no), and a
caption that lists every shape in reading order. Everything comes from a seeded `random.Random`, so a
seed and the settings reproduce the same scenes, images and questions.

`write_llava_json` saves records in the LLaVA conversation format (`image`, `conversations` with
`human`/`gpt` turns, `<image>` in the first human turn), which `eval`, `analyze` and `finetune` read.
"""

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

from .errors import InvalidInputError

logger = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (135, 55, 175),
}
SHAPES = ("circle", "square", "triangle")
GRID_SIZE = 3
MAX_OBJECTS = 4

# Cell (row, column) -> the position word used in answers, and the phrase used in captions.
POSITION_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
POSITION_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

CATEGORIES = ("color", "shape", "count", "position", "relation", "caption")
SHORT_CATEGORIES = CATEGORIES[:-1]
CAPTION_PROMPTS = ("Describe the image.", "Describe this image in detail.", "What is in this picture?")
LLAVA_IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class SceneObject:
    """One shape of a scene: its kind, colour, grid cell, and its centre and radius in pixels."""

    shape: str
    color: str
    row: int
    column: int
    center: tuple[float, float]
    radius: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def position(self) -> str:
        return POSITION_NAMES[(self.row, self.column)]


@dataclass(frozen=True)
class Scene:
    """Shapes on a square canvas of `image_size` pixels with a grey `background` level (0-255)."""

    objects: tuple[SceneObject, ...]
    image_size: int
    background: int

    def layout(self) -> frozenset[tuple[str, str, int, int]]:
        """Return what the questions depend on: the (colour, shape, row, column) of each object."""
        return frozenset((item.color, item.shape, item.row, item.column) for item in self.objects)

    def reading_order(self) -> list[SceneObject]:
        """Return the objects row by row from the top, left to right within a row."""
        return sorted(self.objects, key=lambda item: (item.row, item.column))


@dataclass(frozen=True)
class VisualQuestion:
    """A question about a scene, its correct answer, and its category (one of `CATEGORIES`)."""

    category: str
    question: str
    answer: str


# --------------------------------------------------------------------------- scenes and images


def random_scene(rng: random.Random, image_size: int = 96) -> Scene:
    """Draw a scene: 1 to `MAX_OBJECTS` shapes in distinct grid cells, each colour and shape pair used once."""
    if image_size < 24:
        raise InvalidInputError(
            f"Invalid image_size={image_size}: scenes need at least 24 pixels so that each of the "
            f"{GRID_SIZE} x {GRID_SIZE} cells holds a visible shape."
        )

    count = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(sorted(POSITION_NAMES), count)
    kinds = rng.sample([(color, shape) for color in COLORS for shape in SHAPES], count)
    cell_size = image_size / GRID_SIZE

    objects = []
    for (row, column), (color, shape) in zip(cells, kinds):
        radius = cell_size * rng.uniform(0.28, 0.40)
        slack = cell_size / 2 - radius - 1
        center_x = (column + 0.5) * cell_size + rng.uniform(-slack, slack)
        center_y = (row + 0.5) * cell_size + rng.uniform(-slack, slack)
        objects.append(SceneObject(shape, color, row, column, (center_x, center_y), radius))

    return Scene(tuple(objects), image_size, background=rng.randint(225, 255))


def render_scene(scene: Scene) -> PIL.Image.Image:
    """Draw the scene as an RGB image."""
    image = PIL.Image.new("RGB", (scene.image_size, scene.image_size), (scene.background,) * 3)
    draw = PIL.ImageDraw.Draw(image)
    for item in scene.objects:
        _draw_shape(draw, item, COLORS[item.color])
    return image


def object_index_map(scene: Scene) -> np.ndarray:
    """Return an (image_size, image_size) uint8 array: 0 for background, i + 1 where object i is drawn."""
    canvas = PIL.Image.new("L", (scene.image_size, scene.image_size), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    for index, item in enumerate(scene.objects):
        _draw_shape(draw, item, index + 1)
    return np.asarray(canvas, dtype=np.uint8)


def _draw_shape(draw: PIL.ImageDraw.ImageDraw, item: SceneObject, fill) -> None:
    x, y = item.center
    r = item.radius
    if item.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif item.shape == "square":
        half = 0.85 * r
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    else:
        # An upward triangle inscribed in the circle of radius r.
        draw.polygon([(x, y - r), (x - 0.87 * r, y + 0.5 * r), (x + 0.87 * r, y + 0.5 * r)], fill=fill)


# --------------------------------------------------------------------------- questions and captions


def scene_caption(scene: Scene) -> str:
    """Describe every object in reading order, for example "There are two shapes: a red circle at the top
    left and a blue square in the center."."""
    parts = [f"a {item.name} {POSITION_PHRASES[item.position]}" for item in scene.reading_order()]
    if len(parts) == 1:
        return f"There is one shape: {parts[0]}."

    listing = ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"There are {NUMBER_WORDS[len(parts)]} shapes: {listing}."


def question_pool(scene: Scene) -> dict[str, list[VisualQuestion]]:
    """Return every question that this scene answers unambiguously, by category."""
    return {
        "color": _color_questions(scene),
        "shape": _shape_questions(scene),
        "count": _count_questions(scene),
        "position": [
            VisualQuestion("position", f"Where is the {item.name}?", item.position) for item in scene.objects
        ],
        "relation": _relation_questions(scene),
        "caption": [VisualQuestion("caption", prompt, scene_caption(scene)) for prompt in CAPTION_PROMPTS],
    }


def _color_questions(scene: Scene) -> list[VisualQuestion]:
    questions = []
    for shape in SHAPES:
        matches = [item for item in scene.objects if item.shape == shape]
        if len(matches) == 1:
            questions.append(VisualQuestion("color", f"What color is the {shape}?", matches[0].color))
    return questions


def _shape_questions(scene: Scene) -> list[VisualQuestion]:
    questions = []
    for color in COLORS:
        matches = [item for item in scene.objects if item.color == color]
        if len(matches) == 1:
            questions.append(VisualQuestion("shape", f"What shape is the {color} object?", matches[0].shape))
    return questions


def _count_questions(scene: Scene) -> list[VisualQuestion]:
    questions = [VisualQuestion("count", "How many shapes are there?", str(len(scene.objects)))]
    for shape in SHAPES:
        count = sum(item.shape == shape for item in scene.objects)
        questions.append(VisualQuestion("count", f"How many {shape}s are there?", str(count)))
    for color in COLORS:
        count = sum(item.color == color for item in scene.objects)
        questions.append(VisualQuestion("count", f"How many {color} shapes are there?", str(count)))
    return questions


def _relation_questions(scene: Scene) -> list[VisualQuestion]:
    """Ask whether one object is left of, right of, above or below another, by grid cell (strictly)."""
    questions = []
    for first in scene.objects:
        for second in scene.objects:
            if first is second:
                continue
            relations = {
                "to the left of": first.column < second.column,
                "to the right of": first.column > second.column,
                "above": first.row < second.row,
                "below": first.row > second.row,
            }
            for phrase, holds in relations.items():
                question = f"Is the {first.name} {phrase} the {second.name}?"
                questions.append(VisualQuestion("relation", question, "yes" if holds else "no"))
    return questions


def sample_question(pool: dict[str, list[VisualQuestion]], category: str, rng: random.Random) -> VisualQuestion | None:
    """Pick one question of `category` from a pool. For relations, "yes" and "no" are equally likely.

    Returns None when the scene has no question of that category.
    """
    candidates = pool[category]
    if category == "relation":
        answer = rng.choice(("yes", "no"))
        matching = [item for item in candidates if item.answer == answer]
        candidates = matching or candidates
    if not candidates:
        return None
    return rng.choice(candidates)


# --------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class SceneRecord:
    """One scene with the conversation about it: questions asked in order, each with its answer."""

    record_id: str
    scene: Scene
    questions: tuple[VisualQuestion, ...]

    @property
    def category(self) -> str:
        return self.questions[0].category


def held_out_records(
    seed: int, *, per_category: int, image_size: int = 96, min_caption_objects: int = 2
) -> list[SceneRecord]:
    """Draw single-question records: `per_category` for each category, in a fixed interleaved order.

    Caption records use scenes with at least `min_caption_objects` shapes, so that captions are long
    (about 20 tokens or more with the SmolLM2 tokenizer).
    """
    _check_positive("per_category", per_category)
    rng = random.Random(seed)
    records = []
    for number in range(per_category):
        for category in CATEGORIES:
            question = None
            while question is None:
                scene = random_scene(rng, image_size)
                if category == "caption" and len(scene.objects) < min_caption_objects:
                    continue
                question = sample_question(question_pool(scene), category, rng)
            records.append(SceneRecord(f"{category}-{number:04d}", scene, (question,)))
    return records


def training_records(
    seed: int,
    count: int,
    *,
    questions_per_scene: int,
    image_size: int = 96,
    exclude_layouts: set[frozenset] | None = None,
    caption_only: bool = False,
) -> list[SceneRecord]:
    """Draw `count` multi-turn records whose layouts are not in `exclude_layouts` (the held-out scenes).

    Each record asks up to `questions_per_scene` questions of distinct categories in random order (fewer
    when the scene has no question of a drawn category, such as a relation with one object), or only a
    caption when `caption_only` is true.
    """
    _check_positive("count", count)
    _check_positive("questions_per_scene", questions_per_scene)
    rng = random.Random(seed)
    exclude = exclude_layouts or set()
    records = []
    while len(records) < count:
        scene = random_scene(rng, image_size)
        if scene.layout() in exclude:
            continue
        pool = question_pool(scene)
        if caption_only:
            questions = [sample_question(pool, "caption", rng)]
        else:
            categories = rng.sample(CATEGORIES, min(questions_per_scene, len(CATEGORIES)))
            questions = [sample_question(pool, category, rng) for category in categories]
        questions = [item for item in questions if item is not None]
        # A one-object scene has no relation question, so a one-question record can come out empty.
        if questions:
            records.append(SceneRecord(f"train-{len(records):06d}", scene, tuple(questions)))
    return records


def llava_conversation(record: SceneRecord) -> list[dict]:
    """Return the record's turns in LLaVA format, with the image placeholder before the first question."""
    turns = []
    for number, item in enumerate(record.questions):
        prefix = f"{LLAVA_IMAGE_PLACEHOLDER}\n" if number == 0 else ""
        turns.append({"from": "human", "value": prefix + item.question})
        turns.append({"from": "gpt", "value": item.answer})
    return turns


def write_llava_json(records: list[SceneRecord], folder: Path, *, name: str = "questions.json") -> Path:
    """Render each record's image to `folder/images/ID.png` and write the LLaVA JSON file `folder/name`.

    Each row also stores its `category` (of the first question). Returns the JSON path.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for record in records:
        image_name = f"images/{record.record_id}.png"
        render_scene(record.scene).save(folder / image_name)
        rows.append({
            "id": record.record_id,
            "image": image_name,
            "category": record.category,
            "conversations": llava_conversation(record),
        })

    path = folder / name
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    logger.info("Wrote %d records and their images to %s", len(rows), folder)
    return path


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise InvalidInputError(f"Invalid {name}={value}: it must be a positive integer.")
