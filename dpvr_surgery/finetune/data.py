"""Training data: LLaVA conversation JSON with an image folder, and images with prompts for distillation.

Both datasets tokenise with the model's own processor and chat template. A conversation row becomes
`input_ids` with `labels` that keep only the assistant turns: human turns, system text, image tokens
and (in the collator) padding are -100. A distillation row is one user turn with a generation prompt.
Its `loss_mask` marks the text positions after the first image token, because only there can the
converted model differ from its source.
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import skimage.data
import torch
from torch.utils.data import Dataset

from ..errors import InvalidInputError
from ..plan import image_tokens_per_image

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Prompts for distillation when the user brings images but no prompts: generic requests that make the
# model look at the whole image and answer in a few sentences.
GENERIC_PROMPTS = (
    "Describe this image.",
    "What is in this picture?",
    "Describe the image in one sentence.",
    "What are the main colors in this image?",
    "What objects can you see?",
    "Where could this photo have been taken?",
    "Is there a person in this image?",
    "What is the most striking detail of this image?",
    "Write a short caption for this image.",
    "What is happening in this image?",
    "Describe the background of the image.",
    "How many objects are in the image?",
)

# Photos and scans bundled with scikit-image (no download needed), the default distillation images.
BUILTIN_IMAGE_NAMES = (
    "astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "retina",
    "colorwheel", "logo", "camera", "coins", "horse", "clock", "page", "text", "moon", "brick", "grass",
    "gravel", "stereo_motorcycle", "microaneurysms", "checkerboard", "shepp_logan_phantom",
)


@dataclass
class EncodedSample:
    """One tokenised row: ids, labels or loss mask, and the pixel values of its images (None for text only)."""

    input_ids: torch.Tensor
    labels: torch.Tensor | None
    loss_mask: torch.Tensor | None
    pixel_values: torch.Tensor | None
    index: int
    row_id: str


@dataclass
class LoadStats:
    """Counts from reading a data file, reported in the log and in `dpvr_report.json`."""

    rows: int = 0
    kept: int = 0
    text_only: int = 0
    missing_images: int = 0
    missing_examples: list[str] = field(default_factory=list)
    placeholders_added: int = 0

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "text_only": self.text_only,
            "skipped_missing_images": self.missing_images,
            "missing_image_examples": self.missing_examples,
            "image_placeholders_added": self.placeholders_added,
        }


@dataclass
class ConversationRow:
    """A validated row of LLaVA conversation data: chat messages and the resolved image paths."""

    row_id: str
    messages: list[dict]
    image_paths: list[Path]


# --------------------------------------------------------------------------- reading LLaVA JSON


def read_json_rows(path: Path) -> list[dict]:
    """Read a JSON list of rows, or JSON Lines (one object per line); raise InvalidInputError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"Data file not found: {path}. Pass a LLaVA conversation JSON file.")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = _read_json_lines(text, path)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise InvalidInputError(
            f"Invalid data file {path}: expected a JSON list of rows, got {type(data).__name__}."
        )
    return data


def _read_json_lines(text: str, path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise InvalidInputError(
                f"Invalid data file {path}: line {number} is not valid JSON ({error.msg}). Pass a JSON list of "
                "rows or JSON Lines with one row per line."
            ) from error
    return rows


def load_conversations(
    path: str | Path, image_folder: str | Path | None = None, *, max_rows: int | None = None
) -> tuple[list[ConversationRow], LoadStats]:
    """Read LLaVA conversation rows (the llava_v1_5_mix665k.json format) and resolve their images.

    Each row has `conversations` (a list of `{"from": "human"|"gpt"|"system", "value": ...}`), an optional
    `id` and an optional `image` (a path relative to `image_folder`, or a list of paths). Rows without
    `image` are text only. Rows whose image files do not exist are skipped and counted. A row with
    images but no `<image>` placeholder gets one placeholder per image at the start of its first human
    turn, as LLaVA's training code does. Malformed rows raise InvalidInputError naming the row.
    """
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    if not folder.is_dir():
        raise InvalidInputError(f"Image folder not found: {folder}. Pass --image-folder with the images of {path}.")

    stats = LoadStats()
    rows = []
    for position, raw in enumerate(read_json_rows(path)):
        if max_rows is not None and len(rows) >= max_rows:
            break
        stats.rows += 1
        row = parse_conversation_row(raw, position, folder, stats)
        if row is None:
            continue
        rows.append(row)

    stats.kept = len(rows)
    if stats.missing_images:
        logger.warning(
            "Skipped %d of %d rows because an image file is missing (first: %s)",
            stats.missing_images, stats.rows, ", ".join(stats.missing_examples),
        )
    if not rows:
        raise InvalidInputError(
            f"No usable rows in {path}: {stats.rows} rows read, {stats.missing_images} skipped for missing images "
            f"under {folder}. Check --image-folder."
        )
    logger.info("Read %d rows from %s (%d text only)", stats.kept, path, stats.text_only)
    return rows, stats


def parse_conversation_row(raw: Any, position: int, folder: Path, stats: LoadStats) -> ConversationRow | None:
    """Validate one row and turn it into chat messages; return None when an image file is missing."""
    if not isinstance(raw, dict) or not isinstance(raw.get("conversations"), list) or not raw["conversations"]:
        raise InvalidInputError(
            f"Invalid row {position}: expected an object with a non-empty `conversations` list, got {_preview(raw)}."
        )
    row_id = str(raw.get("id", position))
    image_names = _image_names(raw.get("image"), row_id)

    image_paths = [folder / name for name in image_names]
    missing = [str(name) for name, image_path in zip(image_names, image_paths) if not image_path.is_file()]
    if missing:
        stats.missing_images += 1
        if len(stats.missing_examples) < 5:
            stats.missing_examples.append(missing[0])
        return None
    if not image_paths:
        stats.text_only += 1

    turns = _turns(raw["conversations"], row_id)
    placeholders = sum(value.count(IMAGE_PLACEHOLDER) for role, value in turns if role == "user")
    if placeholders == 0 and image_paths:
        turns = _prepend_placeholders(turns, len(image_paths))
        stats.placeholders_added += 1
    elif placeholders != len(image_paths):
        raise InvalidInputError(
            f"Invalid row {row_id!r}: its human turns contain {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for "
            f"{len(image_paths)} image(s). Use one placeholder per image, in human turns only."
        )
    return ConversationRow(row_id, [_message(role, value) for role, value in turns], image_paths)


def _image_names(value: Any, row_id: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise InvalidInputError(
        f"Invalid row {row_id!r}: `image` must be a path or a list of paths, got {_preview(value)}."
    )


def _turns(conversations: list, row_id: str) -> list[tuple[str, str]]:
    turns = []
    for number, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise InvalidInputError(
                f"Invalid row {row_id!r}, turn {number}: expected {{\"from\": one of {', '.join(ROLES)}, "
                f"\"value\": text}}, got {_preview(turn)}."
            )
        turns.append((ROLES[turn["from"]], turn["value"]))

    speakers = [role for role, _ in turns if role != "system"]
    if "assistant" not in speakers:
        raise InvalidInputError(
            f"Invalid row {row_id!r}: it has no gpt turn, so there is nothing to learn. Remove the row."
        )
    for number, role in enumerate(speakers):
        expected = "user" if number % 2 == 0 else "assistant"
        if role != expected:
            raise InvalidInputError(
                f"Invalid row {row_id!r}: turns must alternate human, gpt, human, ... starting with human; "
                f"turn {number} is {role}."
            )
    if any(role == "system" for role, _ in turns[1:]):
        raise InvalidInputError(f"Invalid row {row_id!r}: a system turn may only come first.")
    return turns


def _prepend_placeholders(turns: list[tuple[str, str]], count: int) -> list[tuple[str, str]]:
    first_user = next(number for number, (role, _) in enumerate(turns) if role == "user")
    updated = list(turns)
    role, value = updated[first_user]
    updated[first_user] = (role, (IMAGE_PLACEHOLDER + "\n") * count + value)
    return updated


def _message(role: str, value: str) -> dict:
    """Turn a LLaVA turn into a chat message with typed content; `<image>` becomes an image item."""
    if role != "user":
        return {"role": role, "content": [{"type": "text", "text": value}]}
    content: list[dict] = []
    pieces = value.split(IMAGE_PLACEHOLDER)
    for number, piece in enumerate(pieces):
        # The newline next to a placeholder is LLaVA's separator; chat templates add their own.
        text = piece
        if number > 0:
            text = text.removeprefix("\n")
        if number < len(pieces) - 1:
            text = text.removesuffix("\n")
            if text:
                content.append({"type": "text", "text": text})
            content.append({"type": "image"})
        elif text:
            content.append({"type": "text", "text": text})
    return {"role": role, "content": content}


def _preview(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- images


def open_image(path: Path) -> PIL.Image.Image:
    """Open an image file as RGB, naming the file when it cannot be read."""
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"Cannot read image {path}: {error}. Replace or remove the file.") from error


def builtin_images() -> dict[str, PIL.Image.Image]:
    """Return the photos and scans bundled with scikit-image as RGB images, keyed by name."""
    images = {}
    for name in BUILTIN_IMAGE_NAMES:
        array = getattr(skimage.data, name)()
        if isinstance(array, tuple):
            array = array[0]
        images[name] = PIL.Image.fromarray(_to_uint8(np.asarray(array))).convert("RGB")
    return images


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array, dtype=float)
    return (scaled * 255).round().astype(np.uint8)


def list_image_files(folder: Path) -> list[Path]:
    """Return the image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not files:
        raise InvalidInputError(
            f"No images found in {folder}: expected files ending in {', '.join(IMAGE_SUFFIXES)}."
        )
    return files


# --------------------------------------------------------------------------- tokenisation


class ConversationEncoder:
    """Tokenise chat messages with a model's processor into ids, labels and pixel values.

    The assistant turns are found as character spans of the rendered chat template: the text that
    `messages[:i+1]` adds to `messages[:i]` with a generation prompt. The template must therefore render
    each prefix of a conversation as a prefix of the whole, which holds for the usual templates and is
    checked. Tokens that overlap an assistant span keep their ids as labels. When the template writes no
    end-of-sequence token after an assistant turn (the llava-hf LLaVA-1.5 template writes none), the
    encoder appends `eos_token_id` there, labelled, so that the model learns to stop, as LLaVA training does.
    """

    def __init__(self, processor, config, *, max_length: int, eos_token_ids: Sequence[int] = ()):
        if getattr(processor, "chat_template", None) is None:
            raise InvalidInputError(
                "The model's processor has no chat template, so conversations cannot be rendered in the model's "
                "own format. Add a chat_template to the processor files of the model folder."
            )
        tokenizer = processor.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise InvalidInputError(
                f"The tokenizer {type(tokenizer).__name__} is not a fast tokenizer; label masking needs character "
                "offsets. Save the model with a tokenizer.json (a fast tokenizer)."
            )
        if max_length < 1:
            raise InvalidInputError(f"Invalid max_seq_length {max_length}: it must be a positive number of tokens.")
        self.processor = processor
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_token_id = int(config.image_token_id)
        self.image_tokens = image_tokens_per_image(config)
        self.eos_token_ids = [int(token) for token in eos_token_ids]

    def encode_conversation(self, messages: list[dict], images: list[PIL.Image.Image], row_id: str) -> dict:
        """Return `input_ids`, `labels` and `pixel_values` for a whole conversation."""
        text = self.processor.apply_chat_template(messages, tokenize=False)
        spans = self._assistant_spans(messages, text, row_id)
        ids, offsets, pixel_values = self._tokenize(text, images, row_id)

        labels = []
        for token, (start, end) in zip(ids, offsets):
            inside = end > start and any(start < span_end and end > span_start for span_start, span_end in spans)
            labels.append(token if inside and token != self.image_token_id else IGNORE_INDEX)
        ids, labels = self._close_assistant_turns(ids, labels, offsets, spans)
        return self._finish(ids, labels, None, pixel_values, row_id)

    def encode_prompt(self, messages: list[dict], images: list[PIL.Image.Image], row_id: str) -> dict:
        """Return `input_ids`, `loss_mask` and `pixel_values` for a prompt that ends in a generation prompt."""
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids, _, pixel_values = self._tokenize(text, images, row_id)
        return self._finish(ids, None, after_first_image(ids, self.image_token_id), pixel_values, row_id)

    def _assistant_spans(self, messages: list[dict], text: str, row_id: str) -> list[tuple[int, int]]:
        spans = []
        for number, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.processor.apply_chat_template(messages[:number], tokenize=False, add_generation_prompt=True)
            after = self.processor.apply_chat_template(messages[: number + 1], tokenize=False)
            if not (after.startswith(before) and text.startswith(after)):
                raise InvalidInputError(
                    f"Row {row_id!r}: the chat template does not render the conversation up to turn {number} as a "
                    "prefix of the whole conversation, so assistant turns cannot be located for label masking. "
                    "Use a chat template that renders turns in order (as ChatML and the llava-hf templates do)."
                )
            spans.append((len(before), len(after)))
        return spans

    def _tokenize(self, text: str, images: list[PIL.Image.Image], row_id: str):
        """Tokenise with the processor (which expands image placeholders) and align it with character offsets."""
        encoded = self.processor(text=text, images=images or None, return_tensors="pt")
        ids = encoded["input_ids"][0].tolist()
        plain = self.tokenizer(text, return_offsets_mapping=True)
        expanded_ids, expanded_offsets = [], []
        for token, offset in zip(plain["input_ids"], plain["offset_mapping"]):
            repeat = self.image_tokens if token == self.image_token_id else 1
            expanded_ids.extend([token] * repeat)
            expanded_offsets.extend([tuple(offset)] * repeat)

        num_images = plain["input_ids"].count(self.image_token_id)
        if num_images != len(images) or expanded_ids != ids:
            raise InvalidInputError(
                f"Row {row_id!r}: the processor produced {len(ids)} tokens for {len(images)} image(s), but the "
                f"tokenizer with {self.image_tokens} image tokens per image (from the model config) gives "
                f"{len(expanded_ids)} tokens with {num_images} image placeholder(s). The processor's image settings "
                "(patch_size, vision_feature_select_strategy, num_additional_image_tokens) must match the config."
            )
        pixel_values = encoded.get("pixel_values") if images else None
        return ids, expanded_offsets, pixel_values

    def _close_assistant_turns(self, ids, labels, offsets, spans):
        """Append an end-of-sequence token after each assistant turn that the template leaves open."""
        if not self.eos_token_ids:
            return ids, labels
        insert_after = []
        for span_start, span_end in spans:
            inside = [
                position
                for position, (start, end) in enumerate(offsets)
                if labels[position] != IGNORE_INDEX and start < span_end and end > span_start
            ]
            if inside and not any(ids[position] in self.eos_token_ids for position in inside):
                insert_after.append(inside[-1])

        ids, labels = list(ids), list(labels)
        for position in sorted(insert_after, reverse=True):
            ids.insert(position + 1, self.eos_token_ids[0])
            labels.insert(position + 1, self.eos_token_ids[0])
        return ids, labels

    def _finish(self, ids, labels, loss_mask, pixel_values, row_id: str) -> dict:
        ids, labels, loss_mask = self._truncate(ids, labels, loss_mask, row_id)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long) if labels is not None else None,
            "loss_mask": loss_mask,
            "pixel_values": pixel_values,
        }

    def _truncate(self, ids, labels, loss_mask, row_id: str):
        """Cut the sequence to `max_length` tokens; raise InvalidInputError if that would cut an image span."""
        if len(ids) <= self.max_length:
            return ids, labels, loss_mask
        image_positions = [position for position, token in enumerate(ids) if token == self.image_token_id]
        if image_positions and image_positions[-1] >= self.max_length:
            first_cut = next(position for position in image_positions if position >= self.max_length)
            raise InvalidInputError(
                f"Row {row_id!r} has {len(ids)} tokens; truncating it to max_seq_length {self.max_length} would cut "
                f"image tokens (the last one is at position {image_positions[-1]}, the first one cut at {first_cut}). "
                f"Raise --max-seq-length to at least {image_positions[-1] + 1}, or remove the row."
            )
        logger.debug("Row %r truncated from %d to %d tokens", row_id, len(ids), self.max_length)
        ids = ids[: self.max_length]
        labels = labels[: self.max_length] if labels is not None else None
        loss_mask = loss_mask[: self.max_length] if loss_mask is not None else None
        return ids, labels, loss_mask


def after_first_image(ids: list[int], image_token_id: int) -> torch.Tensor:
    """Mark the text positions after the first image token: where a dual-path model can differ from its source.

    Positions before the first image see no image token, so the converted model computes exactly the
    source's values there. Image positions predict image tokens, which nothing generates.
    """
    ids_tensor = torch.tensor(ids, dtype=torch.long)
    is_image = ids_tensor == image_token_id
    seen_image = torch.cumsum(is_image.long(), dim=0) > 0
    return seen_image & ~is_image


# --------------------------------------------------------------------------- datasets


class ConversationDataset(Dataset):
    """LLaVA conversation rows, tokenised on access, for the supervised next-token objective."""

    def __init__(self, rows: list[ConversationRow], encoder: ConversationEncoder):
        self.rows = rows
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> EncodedSample:
        row = self.rows[index]
        images = [open_image(path) for path in row.image_paths]
        encoded = self.encoder.encode_conversation(row.messages, images, row.row_id)
        if not bool((encoded["labels"] != IGNORE_INDEX).any()):
            logger.warning("Row %r has no assistant tokens left after truncation; it adds nothing to the loss", row.row_id)
        return EncodedSample(
            encoded["input_ids"], encoded["labels"], None, encoded["pixel_values"], index, row.row_id
        )


@dataclass
class PromptItem:
    """A distillation prompt: one image (a file or an in-memory image) and a question about it."""

    prompt: str
    image_path: Path | None = None
    image: PIL.Image.Image | None = None
    name: str = ""


class DistillationDataset(Dataset):
    """Images with prompts, tokenised as one user turn with a generation prompt, for distillation."""

    def __init__(self, items: list[PromptItem], encoder: ConversationEncoder):
        if not items:
            raise InvalidInputError("The distillation data is empty: pass images and prompts, or use the defaults.")
        self.items = items
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> EncodedSample:
        item = self.items[index]
        image = item.image if item.image is not None else open_image(item.image_path)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.prompt}]}]
        encoded = self.encoder.encode_prompt(messages, [image], item.name or str(index))
        return EncodedSample(
            encoded["input_ids"], None, encoded["loss_mask"], encoded["pixel_values"], index, item.name or str(index)
        )


def distillation_items(
    source: str | Path | None,
    *,
    image_folder: str | Path | None = None,
    prompts: Sequence[str] = GENERIC_PROMPTS,
    max_rows: int | None = None,
) -> tuple[list[PromptItem], dict]:
    """Build distillation prompts from the built-in photos (`source` None), an image folder or LLaVA JSON.

    With images only, every image is paired with every prompt in `prompts`. From LLaVA conversation
    JSON, each row with exactly one image gives its first human turn as the prompt, and the gpt turns
    are not used. Text-only rows are skipped because the converted model equals its source on them.
    """
    if source is None:
        images = builtin_images()
        items = [PromptItem(prompt, image=image, name=f"{name}/{number}")
                 for name, image in images.items() for number, prompt in enumerate(prompts)]
        stats = {"source": "builtin", "images": len(images), "prompts": len(prompts)}
    elif Path(source).is_dir():
        files = list_image_files(Path(source))
        items = [PromptItem(prompt, image_path=path, name=f"{path.name}/{number}")
                 for path in files for number, prompt in enumerate(prompts)]
        stats = {"source": str(source), "images": len(files), "prompts": len(prompts)}
    else:
        items, stats = _items_from_conversations(Path(source), image_folder)
    if max_rows is not None:
        items = items[:max_rows]
    stats["items"] = len(items)
    return items, stats


def _items_from_conversations(path: Path, image_folder) -> tuple[list[PromptItem], dict]:
    rows, load_stats = load_conversations(path, image_folder)
    items, multi_image = [], 0
    for row in rows:
        if len(row.image_paths) != 1:
            multi_image += len(row.image_paths) > 1
            continue
        first = next(message for message in row.messages if message["role"] == "user")
        prompt = " ".join(item["text"] for item in first["content"] if item["type"] == "text").strip()
        items.append(PromptItem(prompt or GENERIC_PROMPTS[0], image_path=row.image_paths[0], name=row.row_id))
    stats = {"source": str(path), **load_stats.as_dict(), "skipped_multi_image": multi_image}
    if not items:
        raise InvalidInputError(
            f"No rows with exactly one image in {path}: distillation needs image prompts, because the converted "
            "model already equals its source on text-only prompts."
        )
    return items, stats
