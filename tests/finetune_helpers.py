"""Tiny LLaVA checkpoints with a real processor (character tokenizer, CLIP image processor) for fine-tuning tests."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tiny_models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, VOCAB_SIZE, make_tiny_llava
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import CLIPImageProcessorPil, GenerationConfig, LlavaProcessor, PreTrainedTokenizerFast

from dpvr_surgery.convert import ConvertRequest, convert_checkpoint
from dpvr_surgery.plan import PlanSettings

IMAGE_TOKEN = "<image>"
START_TOKEN = "<|im_start|>"
END_TOKEN = "<|im_end|>"
END_TOKEN_ID = 3

# ChatML without a default system message; an image item renders as the image token and a newline.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- else -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# The shape of the llava-hf LLaVA-1.5 template: "USER: <image>\n... ASSISTANT: ..." with no end-of-turn token.
USER_ASSISTANT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'].upper() + ': ' }}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] + ' ' }}{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def char_tokenizer(chat_template: str = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A fast tokenizer with one token per character, the chat markers, and <image> at IMAGE_TOKEN_ID."""
    vocab = {"<pad>": PAD_TOKEN_ID, "<unk>": 1, START_TOKEN: 2, END_TOKEN: END_TOKEN_ID, "\n": 4}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    while len(vocab) < VOCAB_SIZE:
        if len(vocab) == IMAGE_TOKEN_ID:
            vocab[IMAGE_TOKEN] = IMAGE_TOKEN_ID
        else:
            vocab[f"<unused{len(vocab)}>"] = len(vocab)

    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(token, special=True) for token in ("<pad>", START_TOKEN, END_TOKEN, IMAGE_TOKEN)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token=END_TOKEN
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_processor(chat_template: str = CHATML_TEMPLATE) -> LlavaProcessor:
    """A LLaVA processor for the tiny model: 32 px images, patch 8, so 16 image tokens per image."""
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=char_tokenizer(chat_template),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
        image_token=IMAGE_TOKEN,
    )


def save_tiny_llava(folder: Path, *, seed: int = 0, chat_template: str = CHATML_TEMPLATE, **model_kwargs) -> Path:
    """Save a tiny LLaVA checkpoint with its processor and a generation config that stops at <|im_end|>."""
    model = make_tiny_llava(seed=seed, **model_kwargs)
    model.generation_config = GenerationConfig(eos_token_id=END_TOKEN_ID, pad_token_id=PAD_TOKEN_ID)
    model.save_pretrained(folder)
    tiny_processor(chat_template).save_pretrained(folder)
    return folder


def convert_tiny(source: Path, output: Path, *, split: int = 3) -> Path:
    """Convert a tiny checkpoint with the streaming converter (side branch copied from layer `split`)."""
    request = ConvertRequest(model=str(source), output=output, settings=PlanSettings(split_layer=split))
    convert_checkpoint(request, show_progress=False)
    return output


def write_images(folder: Path, count: int, *, seed: int = 0, size: int = 40) -> list[Path]:
    """Write `count` random RGB PNG images and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    paths = []
    for number in range(count):
        pixels = generator.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        path = folder / f"image{number}.png"
        PIL.Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def write_conversations(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's safetensors files."""
    from safetensors.torch import load_file

    state = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    return state
