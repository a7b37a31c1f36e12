"""Answer a prompt about images with an original or converted model, through its processor and chat template."""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from . import modeling  # noqa: F401  (registers the dual-path classes with the Auto classes)
from .checkpoint import resolve_model_path
from .errors import InvalidInputError

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Answer:
    """A generated answer and what it cost."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float


def resolve_device(device: str) -> torch.device:
    """Map "auto" to CUDA when available, else CPU; check that an explicit CUDA device exists."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"Device {device!r} was requested but CUDA is not available; pass --device cpu.")
    return resolved


def load_model_and_processor(model: str, *, dtype: str = "auto", device: str = "auto", revision=None, cache_dir=None):
    """Load a LLaVA or dual-path model folder (or Hub id) with its processor, in eval mode."""
    path = resolve_model_path(model, revision=revision, cache_dir=cache_dir)
    if dtype not in DTYPES:
        raise InvalidInputError(f"Invalid dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"Cannot load the processor of {path}: {error}") from error
    loaded = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    return loaded.to(resolve_device(device)), processor


def load_images(paths: list[str | Path], *, owner: str = "") -> list[PIL.Image.Image]:
    """Open image files as RGB, naming the file that cannot be read and `owner` (such as "of sample 'x'")."""
    images = []
    for path in paths:
        try:
            with PIL.Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as error:
            where = f" {owner}" if owner else ""
            raise InvalidInputError(f"Cannot read image {path}{where}: {error}. Pass a PNG or JPEG file.") from error
    return images


def build_prompt(processor, prompt: str, num_images: int, *, use_chat_template: bool = True) -> str:
    """Render one user turn with `num_images` images through the processor's chat template."""
    if not use_chat_template:
        image_token = getattr(processor, "image_token", "<image>")
        if prompt.count(image_token) != num_images:
            raise InvalidInputError(
                f"Without a chat template the prompt must hold one {image_token} per image: found "
                f"{prompt.count(image_token)} for {num_images} image(s)."
            )
        return prompt
    if getattr(processor, "chat_template", None) is None:
        raise InvalidInputError(
            "The model's processor has no chat template. Pass --no-chat-template and write the prompt in the "
            "model's own format, with one <image> per image."
        )
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def answer(
    model,
    processor,
    prompt: str,
    images: list[PIL.Image.Image] | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    use_chat_template: bool = True,
    seed: int = 0,
) -> Answer:
    """Generate an answer with the KV cache; greedy when `temperature` is 0."""
    images = images or []
    text = build_prompt(processor, prompt, len(images), use_chat_template=use_chat_template)
    inputs = processor(images=images or None, text=text, return_tensors="pt").to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)

    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, **sampling)
    seconds = time.perf_counter() - started

    prompt_tokens = inputs["input_ids"].shape[1]
    new_ids = output[0, prompt_tokens:]
    decoded = processor.decode(new_ids, skip_special_tokens=True).strip()
    return Answer(decoded, prompt_tokens, int(new_ids.shape[0]), seconds)
