"""Calibration samples for the saturation analysis: images with a question (and sometimes an answer).

Three sources:

- a folder of images, each paired with a prompt (one prompt for all, or the lines of a prompts file
  in turn);
- a LLaVA conversation JSON file (the `llava_v1_5_mix665k.json` format: a list of records with an
  `image` path relative to an image folder and `conversations`, a list of `{"from": "human"|"gpt",
  "value": ...}` turns in which `<image>` marks where the image goes); the first human turn and the
  answer that follows it become one sample, and records without an image are left out;
- with neither, real photos bundled with scikit-image paired with generic questions.

Images are opened only when a sample is selected, so a 665k-record file costs one JSON parse. An
image that cannot be read is skipped; the skips are counted and reported in one warning.
"""

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import skimage.data

from ..errors import InvalidInputError

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")

# Photos and scans that scikit-image ships in its wheel (no download needed). Grayscale ones are
# converted to RGB.
BUILTIN_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
    "page",
    "clock",
    "text",
    "grass",
    "brick",
    "gravel",
)
GENERIC_QUESTIONS = (
    "Describe this image in detail.",
    "What is shown in this picture?",
    "What are the main objects in this image, and where are they?",
    "What colors and textures stand out in this image?",
)


@dataclass
class CalibrationSample:
    """One calibration conversation: a user turn with images and text, and optionally the answer.

    `content` is the user turn as chat-template items, `{"type": "image"}` and `{"type": "text",
    "text": ...}`, in order; `images` holds one image per image item.
    """

    sample_id: str
    content: list[dict]
    images: list[PIL.Image.Image]
    answer: str | None = None

    def messages(self) -> list[dict]:
        """Return the chat messages of this sample: the user turn, then the answer when there is one."""
        messages = [{"role": "user", "content": self.content}]
        if self.answer:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": self.answer}]})
        return messages


@dataclass
class SampleCandidate:
    """A sample whose images are not opened yet."""

    sample_id: str
    content: list[dict]
    image_paths: list[Path]
    answer: str | None = None
    load_images: Callable[[], list[PIL.Image.Image]] | None = None


@dataclass
class CalibrationData:
    """Selected samples, where they came from, and how many images could not be read."""

    source: str
    samples: list[CalibrationSample]
    skipped_images: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    records_without_image: int = 0

    def summary(self) -> dict:
        """Describe the data for reports (no images)."""
        return {
            "source": self.source,
            "num_samples": len(self.samples),
            "sample_ids": [sample.sample_id for sample in self.samples],
            "skipped_images": self.skipped_images,
            "records_without_image": self.records_without_image,
        }


def load_calibration_data(
    data: str | Path | None = None,
    *,
    image_folder: str | Path | None = None,
    prompts: list[str] | None = None,
    num_samples: int = 16,
    shuffle: bool = True,
    seed: int = 0,
) -> CalibrationData:
    """Select up to `num_samples` readable samples from `data`, or from the built-in photos when it is None.

    `data` is a folder of images (paired with `prompts` in turn, default: generic questions) or a
    LLaVA conversation JSON file whose image paths are relative to `image_folder` (default: the JSON
    file's folder). With `shuffle` the candidates are visited in an order drawn from `seed`.
    Raises InvalidInputError when the source is invalid or no readable sample remains.
    """
    if num_samples < 1:
        raise InvalidInputError(
            f"Invalid number of calibration samples {num_samples}: it must be at least 1. Pass a positive "
            "--num-calibration-samples."
        )
    if data is None:
        source, candidates, without_image = "builtin", builtin_candidates(), 0
    else:
        source, candidates, without_image = _candidates_from(Path(data), image_folder, prompts)

    if shuffle:
        random.Random(seed).shuffle(candidates)
    selected = _select_readable(candidates, num_samples)
    selected.source = source
    selected.records_without_image = without_image
    _report_skipped(selected, data)
    return selected


def _candidates_from(
    data: Path, image_folder: str | Path | None, prompts: list[str] | None
) -> tuple[str, list[SampleCandidate], int]:
    if data.is_dir():
        if image_folder is not None:
            raise InvalidInputError(
                f"--image-folder {image_folder} was given with the image folder {data}: it applies only to a "
                "LLaVA JSON file. Drop --image-folder, or pass the JSON file as --data."
            )
        return "image_folder", image_folder_candidates(data, prompts or list(GENERIC_QUESTIONS)), 0
    if data.is_file() and data.suffix.lower() == ".json":
        if prompts:
            raise InvalidInputError(
                f"A prompt was given with the LLaVA JSON file {data}, whose records bring their own questions. "
                "Drop --prompt/--prompts-file, or pass a folder of images as --data."
            )
        folder = Path(image_folder) if image_folder is not None else data.parent
        candidates, without_image = llava_json_candidates(data, folder)
        return "llava_json", candidates, without_image
    if not data.exists():
        raise InvalidInputError(
            f"Calibration data not found: {data} does not exist. Pass a folder of images or a LLaVA "
            "conversation JSON file as --data, or leave --data out to use the built-in photos."
        )
    raise InvalidInputError(
        f"Invalid calibration data {data}: expected a folder of images or a .json file in the LLaVA "
        "conversation format."
    )


def builtin_candidates() -> list[SampleCandidate]:
    """Return the built-in samples: scikit-image photos, each with one of the generic questions in turn."""
    candidates = []
    for index, name in enumerate(BUILTIN_PHOTOS):
        question = GENERIC_QUESTIONS[index % len(GENERIC_QUESTIONS)]
        candidates.append(
            SampleCandidate(
                sample_id=f"skimage:{name}",
                content=[{"type": "image"}, {"type": "text", "text": question}],
                image_paths=[],
                load_images=lambda name=name: [_skimage_photo(name)],
            )
        )
    return candidates


def _skimage_photo(name: str) -> PIL.Image.Image:
    array = np.asarray(getattr(skimage.data, name)())
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    return PIL.Image.fromarray(array).convert("RGB")


def image_folder_candidates(folder: Path, prompts: list[str]) -> list[SampleCandidate]:
    """Return one candidate per image file in `folder` (sorted by name), paired with `prompts` in turn."""
    prompts = [prompt.strip() for prompt in prompts if prompt.strip()]
    if not prompts:
        raise InvalidInputError("No prompt given: the prompt text or prompts file is empty. Pass a non-empty prompt.")
    paths = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise InvalidInputError(
            f"No images found in {folder}: it contains no file ending in {', '.join(IMAGE_SUFFIXES)}. Pass a "
            "folder of images as --data."
        )
    return [
        SampleCandidate(
            sample_id=path.name,
            content=[{"type": "image"}, {"type": "text", "text": prompts[index % len(prompts)]}],
            image_paths=[path],
        )
        for index, path in enumerate(paths)
    ]


def read_prompts_file(path: str | Path) -> list[str]:
    """Return the non-empty lines of a prompts file, one prompt per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"Cannot read prompts file {path}: {error}. Pass a UTF-8 text file.") from error
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InvalidInputError(f"Prompts file {path} contains no prompt. Write one prompt per line.")
    return prompts


def llava_json_candidates(path: Path, image_folder: Path) -> tuple[list[SampleCandidate], int]:
    """Return the candidates of a LLaVA conversation file and the number of records without an image."""
    records = _read_llava_json(path)
    candidates = []
    without_image = 0
    for index, record in enumerate(records):
        candidate = _llava_record_candidate(record, index, path, image_folder)
        if candidate is None:
            without_image += 1
        else:
            candidates.append(candidate)
    if not candidates:
        raise InvalidInputError(
            f"No usable record in {path}: none of its {len(records)} records has an image and a human turn. "
            "Pass a LLaVA conversation file with image records."
        )
    if without_image:
        logger.info("Left out %d record(s) of %s without an image", without_image, path)
    return candidates, without_image


def _read_llava_json(path: Path) -> list:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"Invalid LLaVA conversation file {path}: not valid JSON ({error}).") from error
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"Cannot read LLaVA conversation file {path}: {error}.") from error
    if not isinstance(records, list):
        raise InvalidInputError(
            f"Invalid LLaVA conversation file {path}: expected a JSON list of records, got "
            f"{type(records).__name__}. Each record needs 'image' and 'conversations'."
        )
    return records


def _llava_record_candidate(record, index: int, path: Path, image_folder: Path) -> SampleCandidate | None:
    """Return the candidate of one record, or None for a record without an image (text-only rows)."""
    if not isinstance(record, dict):
        raise InvalidInputError(
            f"Invalid record {index} in {path}: expected an object with 'image' and 'conversations', got "
            f"{type(record).__name__}."
        )
    image = record.get("image")
    if not image:
        return None

    image_names = image if isinstance(image, list) else [image]
    sample_id = str(record.get("id", index))
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise InvalidInputError(f"Invalid record {sample_id} in {path}: 'conversations' must be a non-empty list.")
    question, answer = _first_exchange(turns, sample_id, path)
    content = _content_with_images(question, len(image_names), sample_id, path)
    return SampleCandidate(
        sample_id=sample_id,
        content=content,
        image_paths=[image_folder / str(name) for name in image_names],
        answer=answer,
    )


def _first_exchange(turns: list, sample_id: str, path: Path) -> tuple[str, str | None]:
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise InvalidInputError(
                f"Invalid record {sample_id} in {path}: every turn needs 'from' and 'value', got {turn!r}."
            )
        if turn["from"] in HUMAN_ROLES:
            following = turns[position + 1] if position + 1 < len(turns) else None
            answer = None
            if isinstance(following, dict) and following.get("from") in ASSISTANT_ROLES:
                answer = str(following.get("value", "")).strip() or None
            return str(turn["value"]), answer
    raise InvalidInputError(
        f"Invalid record {sample_id} in {path}: no turn from 'human'. LLaVA records start with the human turn "
        "that holds the <image> placeholder."
    )


def _content_with_images(question: str, num_images: int, sample_id: str, path: Path) -> list[dict]:
    """Split a question at its `<image>` placeholders into chat-template items, in order.

    A question without placeholders gets its images in front, as LLaVA's training code does.
    """
    parts = question.split(IMAGE_PLACEHOLDER)
    placeholders = len(parts) - 1
    if placeholders == 0:
        parts = ["", question]
        placeholders = 1
        if num_images > 1:
            parts = [""] * num_images + [question]
            placeholders = num_images
    if placeholders != num_images:
        raise InvalidInputError(
            f"Invalid record {sample_id} in {path}: its question has {placeholders} {IMAGE_PLACEHOLDER} "
            f"placeholders for {num_images} image(s). Use one placeholder per image."
        )

    content: list[dict] = []
    for position, part in enumerate(parts):
        if position > 0:
            content.append({"type": "image"})
        text = part.strip()
        if text:
            content.append({"type": "text", "text": text})
    return content


def _select_readable(candidates: list[SampleCandidate], num_samples: int) -> CalibrationData:
    data = CalibrationData(source="", samples=[])
    for candidate in candidates:
        if len(data.samples) == num_samples:
            break
        try:
            images = candidate.load_images() if candidate.load_images else _open_images(candidate.image_paths)
        except _UnreadableImage as error:
            data.skipped_images += 1
            if len(data.skipped_examples) < 3:
                data.skipped_examples.append(str(error))
            continue
        data.samples.append(CalibrationSample(candidate.sample_id, candidate.content, images, candidate.answer))
    return data


class _UnreadableImage(Exception):
    pass


def _open_images(paths: list[Path]) -> list[PIL.Image.Image]:
    images = []
    for path in paths:
        try:
            with PIL.Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
            raise _UnreadableImage(f"{path}: {type(error).__name__}: {error}") from error
    return images


def _report_skipped(data: CalibrationData, source: str | Path | None) -> None:
    if data.skipped_images:
        logger.warning(
            "Skipped %d sample(s) whose image is missing or unreadable (for example %s)",
            data.skipped_images,
            "; ".join(data.skipped_examples),
        )
    if not data.samples:
        raise InvalidInputError(
            f"No calibration sample left from {source}: all {data.skipped_images} candidate image(s) are missing "
            "or unreadable. Check the image paths (for a LLaVA JSON file, pass the folder they are relative to "
            "with --image-folder)."
        )

