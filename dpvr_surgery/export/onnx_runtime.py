"""Greedy generation from an exported ONNX folder with onnxruntime and numpy only (no PyTorch).

`OnnxDpvrModel` runs the three graphs of `dpvr-surgery export onnx`. It encodes the images, embeds
the tokens and writes the image features into the embeddings at the image-token positions. It then
computes the routing inputs of each chunk (`routing.py`) and keeps the per-layer KV cache between
calls. The text-only layers are read from the decoder's inputs, whose past length axis is named
`past_text_sequence_length` for those layers.

The tokenizer and processor (`transformers`) are imported only by `answer_with_onnx`, which builds
the prompt; the model class itself needs numpy and onnxruntime alone.
"""

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime

from ..errors import InvalidInputError
from .routing import check_image_spans, position_ids_from_mask, route_chunk

logger = logging.getLogger(__name__)

ONNX_SUBFOLDER = "onnx"
GRAPH_FILES = ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")
TEXT_PAST_AXIS = "past_text_sequence_length"
ONNX_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class PastLayout:
    """One past key or value input of the decoder graph."""

    name: str
    text_only: bool
    num_heads: int
    head_dim: int


@dataclass
class DecoderState:
    """Decoder state carried between chunks: the padding masks and the KV cache of every layer."""

    attention_mask: np.ndarray
    text_attention_mask: np.ndarray
    past: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]


@dataclass
class OnnxAnswer:
    """Generated text with its token counts and generation time in seconds."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float


class OnnxDpvrModel:
    """The exported graphs of a dual-path model in onnxruntime sessions, with a KV cache across chunks."""

    def __init__(self, folder: str | Path, *, providers: list | None = None):
        self.folder = Path(folder)
        onnx_dir = self.folder / ONNX_SUBFOLDER
        missing = [name for name in GRAPH_FILES if not (onnx_dir / name).is_file()]
        if missing:
            raise InvalidInputError(
                f"Not an ONNX export folder: {onnx_dir} lacks {', '.join(missing)}. Pass the -o folder of "
                "`dpvr-surgery export onnx`."
            )
        self.config = _read_json(self.folder / "config.json")
        self.generation_config = _read_json(self.folder / "generation_config.json", required=False)
        self.image_token_id = int(self.config.get("image_token_id", self.config.get("image_token_index")))

        providers = providers or ["CPUExecutionProvider"]
        self.vision_session = onnxruntime.InferenceSession(str(onnx_dir / GRAPH_FILES[0]), providers=providers)
        self.embed_session = onnxruntime.InferenceSession(str(onnx_dir / GRAPH_FILES[1]), providers=providers)
        self.decoder_session = onnxruntime.InferenceSession(str(onnx_dir / GRAPH_FILES[2]), providers=providers)

        decoder_inputs = {value.name: value for value in self.decoder_session.get_inputs()}
        self.float_dtype = ONNX_FLOAT_TYPES[decoder_inputs["inputs_embeds"].type]
        self.past_layout = [
            PastLayout(value.name, value.shape[2] == TEXT_PAST_AXIS, int(value.shape[1]), int(value.shape[3]))
            for value in self.decoder_session.get_inputs()
            if value.name.startswith("past_key_values.")
        ]
        self.output_names = [value.name for value in self.decoder_session.get_outputs()]

    # ----------------------------------------------------------------- graphs

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """Return the projected image features (n, v, d) of `pixel_values` (n, c, h, w)."""
        pixel_values = np.asarray(pixel_values, dtype=self.float_dtype)
        return self.vision_session.run(None, {"pixel_values": pixel_values})[0]

    def embed_tokens(self, input_ids: np.ndarray) -> np.ndarray:
        """Return the token embeddings (b, t, d) of `input_ids` (b, t)."""
        return self.embed_session.run(None, {"input_ids": np.asarray(input_ids, dtype=np.int64)})[0]

    def empty_state(self, batch_size: int) -> DecoderState:
        """Return a state with an empty cache, for the first chunk (prefill)."""
        past = {
            layout.name: np.zeros((batch_size, layout.num_heads, 0, layout.head_dim), dtype=self.float_dtype)
            for layout in self.past_layout
        }
        empty_mask = np.zeros((batch_size, 0), dtype=np.int64)
        return DecoderState(empty_mask, empty_mask.copy(), past)

    def forward(
        self,
        state: DecoderState,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        pixel_values: np.ndarray | None = None,
    ) -> np.ndarray:
        """
        Run one chunk (prefill, a decode step, or a later turn with images) and update `state` in place.

        `input_ids` (b, t) contains the expanded image tokens of the images in `pixel_values`, in order,
        and `attention_mask` (b, t) marks the chunk's non-padding tokens. Returns the logits (b, t, vocab).
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch_size, num_tokens = input_ids.shape
        if batch_size != state.batch_size:
            raise InvalidInputError(
                f"The chunk has {batch_size} rows but the cache has {state.batch_size}. Continue with the same "
                "batch size."
            )
        chunk_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)

        inputs_embeds, image_token_mask, image_lengths = self._merge_image_features(input_ids, pixel_values)
        full_mask = np.concatenate([state.attention_mask, chunk_mask], axis=1)
        routes = route_chunk(chunk_mask.astype(bool), image_token_mask, image_lengths)
        text_attention_mask = np.concatenate([state.text_attention_mask, routes.text_valid.astype(np.int64)], axis=1)

        feeds = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": full_mask,
            "position_ids": position_ids_from_mask(full_mask, num_tokens),
            "text_index": routes.text_index,
            "text_attention_mask": text_attention_mask,
            "image_index": routes.image_index,
            "image_attention_mask": routes.image_attention_mask,
            **state.past,
        }
        outputs = dict(zip(self.output_names, self.decoder_session.run(self.output_names, feeds)))
        state.attention_mask = full_mask
        state.text_attention_mask = text_attention_mask
        state.past = {name: outputs[name.replace("past_key_values.", "present.")] for name in state.past}
        return outputs["logits"]

    def _merge_image_features(self, input_ids: np.ndarray, pixel_values: np.ndarray | None):
        inputs_embeds = self.embed_tokens(input_ids)
        if pixel_values is None or len(pixel_values) == 0:
            # As in the PyTorch model, a chunk without images is all text, even where a token has the
            # image token's id (a generated one, for example).
            return inputs_embeds, np.zeros(input_ids.shape, dtype=bool), []

        image_token_mask = input_ids == self.image_token_id

        features = self.encode_images(pixel_values)
        image_lengths = [features.shape[1]] * features.shape[0]
        check_image_spans(image_token_mask, image_lengths, self.image_token_id)
        inputs_embeds[image_token_mask] = features.reshape(-1, features.shape[-1]).astype(inputs_embeds.dtype)
        return inputs_embeds, image_token_mask, image_lengths

    # ----------------------------------------------------------------- generation

    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        pixel_values: np.ndarray | None = None,
        *,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> np.ndarray:
        """
        Greedy decoding with the KV cache; return the prompt followed by the new tokens (b, t + new).

        As in `transformers` `generate()`, a row that produced an end-of-sequence token continues with
        `pad_token_id`, and generation stops when every row has finished or after `max_new_tokens`.
        `eos_token_id` and `pad_token_id` default to the folder's generation config.
        """
        if max_new_tokens < 1:
            raise InvalidInputError(f"Invalid max_new_tokens {max_new_tokens}: expected at least 1.")
        eos_ids = self._eos_token_ids(eos_token_id)
        if pad_token_id is None:
            pad_token_id = self.generation_config.get("pad_token_id")
        if pad_token_id is None:
            pad_token_id = eos_ids[0] if eos_ids else 0

        input_ids = np.asarray(input_ids, dtype=np.int64)
        state = self.empty_state(input_ids.shape[0])
        logits = self.forward(state, input_ids, attention_mask, pixel_values)
        unfinished = np.ones(input_ids.shape[0], dtype=bool)
        new_tokens = []
        for step in range(max_new_tokens):
            next_tokens = logits[:, -1].argmax(axis=-1).astype(np.int64)
            next_tokens = np.where(unfinished, next_tokens, pad_token_id)
            new_tokens.append(next_tokens)
            unfinished &= ~np.isin(next_tokens, eos_ids)
            if not unfinished.any() or step == max_new_tokens - 1:
                break
            logits = self.forward(state, next_tokens[:, None])
        return np.concatenate([input_ids, np.stack(new_tokens, axis=1)], axis=1)

    def _eos_token_ids(self, eos_token_id: int | list[int] | None) -> list[int]:
        if eos_token_id is None:
            eos_token_id = self.generation_config.get("eos_token_id")
        if eos_token_id is None:
            eos_token_id = self.config.get("text_config", {}).get("eos_token_id")
        if eos_token_id is None:
            return []
        return [int(token) for token in np.atleast_1d(eos_token_id)]


def answer_with_onnx(
    folder: str | Path,
    prompt: str,
    images: list | None = None,
    *,
    max_new_tokens: int = 64,
    use_chat_template: bool = True,
    device: str = "cpu",
) -> OnnxAnswer:
    """Generate a greedy reply to `prompt` about PIL `images` with the ONNX export in `folder` and its processor."""
    from transformers import AutoProcessor

    images = images or []
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise InvalidInputError(
            f"Cannot load the processor from {folder}: {error}. The export copies the processor of the converted "
            "model; export again from a folder that has one."
        ) from error
    model = OnnxDpvrModel(folder, providers=execution_providers(device))
    text = build_chat_prompt(processor, prompt, len(images), use_chat_template=use_chat_template)
    inputs = processor(images=images or None, text=text, return_tensors="np")

    started = time.perf_counter()
    output = model.generate(
        inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"), max_new_tokens=max_new_tokens
    )
    seconds = time.perf_counter() - started

    prompt_tokens = inputs["input_ids"].shape[1]
    new_ids = output[0, prompt_tokens:]
    decoded = processor.decode(new_ids, skip_special_tokens=True).strip()
    return OnnxAnswer(decoded, prompt_tokens, int(new_ids.shape[0]), seconds)


def execution_providers(device: str) -> list[str | tuple[str, dict]]:
    """Map a device name (auto, cpu, cuda, cuda:N) to onnxruntime execution providers, CPU last as the fallback."""
    available = onnxruntime.get_available_providers()
    if device == "cpu" or (device == "auto" and "CUDAExecutionProvider" not in available):
        return ["CPUExecutionProvider"]
    if device == "auto" or device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise InvalidInputError(
                f"Device {device!r} was requested but this onnxruntime build has no CUDA execution provider "
                f"(available: {', '.join(available)}); pass --device cpu or install onnxruntime-gpu."
            )
        device_id = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    raise InvalidInputError(f"Invalid device {device!r}: use auto, cpu, cuda or cuda:N.")


def build_chat_prompt(processor, prompt: str, num_images: int, *, use_chat_template: bool = True) -> str:
    """Render one user turn with `num_images` images, as `dpvr-surgery generate` does for PyTorch models."""
    image_token = getattr(processor, "image_token", "<image>")
    if not use_chat_template:
        if prompt.count(image_token) != num_images:
            raise InvalidInputError(
                f"Without a chat template the prompt must hold one {image_token} per image: found "
                f"{prompt.count(image_token)} for {num_images} image(s)."
            )
        return prompt
    if getattr(processor, "chat_template", None) is None:
        raise InvalidInputError(
            "The processor has no chat template. Pass --no-chat-template and write the prompt in the model's own "
            "format, with one <image> per image."
        )
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _read_json(path: Path, *, required: bool = True) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        if not required:
            return {}
        raise InvalidInputError(
            f"{path} not found: an ONNX export folder holds the model's config.json beside the onnx/ folder."
        ) from error
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"Invalid JSON in {path}: {error}.") from error


__all__ = [
    "DecoderState",
    "OnnxAnswer",
    "OnnxDpvrModel",
    "answer_with_onnx",
    "build_chat_prompt",
    "execution_providers",
]
