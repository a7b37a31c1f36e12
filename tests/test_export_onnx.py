"""`export onnx` and onnxruntime generation against PyTorch, on a tiny converted model (fp32, CPU).

One export (through the CLI, with validation on) serves most tests of this file. The demo-model
parity check with real photos is marked slow.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from test_modeling import images_for, make_row, pad_rows
from tiny_models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, VOCAB_SIZE, make_tiny_llava
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from dpvr_surgery.cli import main
from dpvr_surgery.convert import ConvertRequest, convert_checkpoint
from dpvr_surgery.errors import InvalidInputError, VerificationError
from dpvr_surgery.export import onnx_export
from dpvr_surgery.export import validate as onnx_validate
from dpvr_surgery.export.onnx_config import EmbedTokensExporterConfig
from dpvr_surgery.export.onnx_export import OnnxExportRequest, export_graph, export_onnx
from dpvr_surgery.export.onnx_graphs import EmbedTokensGraph
from dpvr_surgery.export.onnx_runtime import OnnxDpvrModel
from dpvr_surgery.export.routing import route_chunk
from dpvr_surgery.export.validate import validate_onnx_export
from dpvr_surgery.modeling import DpvrLlavaForConditionalGeneration, route_tokens
from dpvr_surgery.plan import PlanSettings

ATOL = 1e-4
SPLIT_LAYER = 2
EOS_TOKEN_ID = 2
UNK_TOKEN_ID = 121
CHAT_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}w9{% endif %}"
)


def tiny_processor() -> LlavaProcessor:
    """A word-level tokenizer over the tiny vocabulary (`w5` is id 5) and a 32-pixel CLIP image processor."""
    vocab = {f"w{i}": i for i in range(VOCAB_SIZE)}
    special = {"<pad>": PAD_TOKEN_ID, "</s>": EOS_TOKEN_ID, "<image>": IMAGE_TOKEN_ID, "<unk>": UNK_TOKEN_ID}
    for token, token_id in special.items():
        del vocab[f"w{token_id}"]
        vocab[token] = token_id
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=fast,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export_onnx")


@pytest.fixture(scope="module")
def converted(workdir) -> Path:
    source = workdir / "source"
    make_tiny_llava(seed=0).save_pretrained(source)
    tiny_processor().save_pretrained(source)
    output = workdir / "converted"
    convert_checkpoint(
        ConvertRequest(model=str(source), output=output, settings=PlanSettings(SPLIT_LAYER), command_line="test"),
        show_progress=False,
    )
    return output


@pytest.fixture(scope="module")
def export_run(workdir, converted):
    output = workdir / "onnx"
    result = CliRunner().invoke(main, ["export", "onnx", str(converted), "-o", str(output), "-q"])
    return output, result


@pytest.fixture(scope="module")
def exported(export_run) -> Path:
    output, result = export_run
    assert result.exit_code == 0, result.output
    return output


@pytest.fixture(scope="module")
def torch_model(converted) -> DpvrLlavaForConditionalGeneration:
    return DpvrLlavaForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def onnx_model(exported) -> OnnxDpvrModel:
    return OnnxDpvrModel(exported)


def batch(layouts, seed, side="left"):
    generator = torch.Generator().manual_seed(seed)
    rows = [make_row(segments, 16, generator) for segments in layouts]
    input_ids, attention_mask = pad_rows(rows, side)
    pixel_values, _ = images_for(rows, 16, generator)
    return input_ids, attention_mask, pixel_values


def test_cli_reports_validation(export_run):
    _, result = export_run
    assert result.exit_code == 0, result.output
    assert "Validation: onnxruntime within 0.0001 of PyTorch" in result.output


def test_export_writes_graphs_and_model_files(exported):
    for name in ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx"):
        assert (exported / "onnx" / name).is_file(), name
    for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja", "generation_config.json"):
        assert (exported / name).is_file(), name
    report = json.loads((exported / "dpvr_onnx_report.json").read_text())
    assert report["validation"]["passed"] is True
    assert report["validation"]["max_abs_diff"] <= ATOL
    assert set(report["validation"]["differences"]) == {
        "vision_encoder",
        "embed_tokens",
        "decoder_prefill",
        "decoder_decode",
        "decoder_second_turn",
    }


def test_decoder_names_and_axes(exported, torch_model):
    session = onnxruntime.InferenceSession(str(exported / "onnx" / "decoder_model_merged.onnx"))
    inputs = {value.name: value.shape for value in session.get_inputs()}
    outputs = {value.name: value.shape for value in session.get_outputs()}
    num_layers = torch_model.config.text_config.num_hidden_layers
    deep_layers = torch_model.config.deep_layers

    routing = [
        "inputs_embeds",
        "attention_mask",
        "position_ids",
        "text_index",
        "text_attention_mask",
        "image_index",
        "image_attention_mask",
    ]
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    assert list(inputs) == routing + past
    assert list(outputs) == ["logits"] + [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]

    assert inputs["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert inputs["text_attention_mask"] == ["batch_size", "past_text_sequence_length + text_sequence_length"]
    for i in range(num_layers):
        expected_past = "past_text_sequence_length" if i in deep_layers else "past_sequence_length"
        assert inputs[f"past_key_values.{i}.key"][2] == expected_past, i
        expected_present = "past_sequence_length + sequence_length"
        if i in deep_layers:
            expected_present = "past_text_sequence_length + text_sequence_length"
        assert outputs[f"present.{i}.value"][2] == expected_present, i


def test_encoder_graph_names(exported):
    vision = onnxruntime.InferenceSession(str(exported / "onnx" / "vision_encoder.onnx"))
    embed = onnxruntime.InferenceSession(str(exported / "onnx" / "embed_tokens.onnx"))
    assert [value.name for value in vision.get_inputs()] == ["pixel_values"]
    assert [value.name for value in vision.get_outputs()] == ["image_features"]
    assert vision.get_inputs()[0].shape[0] == "num_images"
    assert [value.name for value in embed.get_inputs()] == ["input_ids"]
    assert [value.name for value in embed.get_outputs()] == ["inputs_embeds"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_prefill_and_decode_match_pytorch(torch_model, onnx_model, side):
    input_ids, attention_mask, pixel_values = batch([[4, "image", 3], [9], [2, "image", 1, "image", 3]], seed=1, side=side)
    with torch.no_grad():
        output = torch_model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=True)
    state = onnx_model.empty_state(3)
    logits = onnx_model.forward(state, input_ids.numpy(), attention_mask.numpy(), pixel_values.numpy())
    valid = attention_mask.bool()
    assert np.abs(logits[valid.numpy()] - output.logits[valid].numpy()).max() <= ATOL

    cache, torch_logits, full_mask = output.cache, output.logits, attention_mask
    for step in range(4):
        next_tokens = torch_logits[:, -1].argmax(-1, keepdim=True)
        full_mask = torch.cat([full_mask, torch.ones_like(next_tokens)], dim=1)
        with torch.no_grad():
            output = torch_model(input_ids=next_tokens, attention_mask=full_mask, cache=cache, use_cache=True)
        logits = onnx_model.forward(state, next_tokens.numpy())
        assert np.abs(logits - output.logits.numpy()).max() <= ATOL, f"decode step {step}"
        cache, torch_logits = output.cache, output.logits
    # Deep text-only layers cache text slots only: 9 text tokens in the widest row, plus 4 steps.
    assert state.past["past_key_values.0.key"].shape[2] == full_mask.shape[1]
    assert state.past[f"past_key_values.{SPLIT_LAYER}.key"].shape[2] == 9 + 4


def test_greedy_generation_matches_pytorch(torch_model, onnx_model):
    input_ids, attention_mask, pixel_values = batch([[5, "image", 2], [12], ["image", "image", 4]], seed=2)
    with torch.no_grad():
        expected = torch_model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=PAD_TOKEN_ID,
        )
    actual = onnx_model.generate(
        input_ids.numpy(), attention_mask.numpy(), pixel_values.numpy(), max_new_tokens=12, eos_token_id=[]
    )
    np.testing.assert_array_equal(actual, expected.numpy())


def test_generation_stops_at_eos(onnx_model):
    input_ids, attention_mask, pixel_values = batch([[5, "image", 2], [12]], seed=3)
    prompt_length = input_ids.shape[1]
    free = onnx_model.generate(
        input_ids.numpy(), attention_mask.numpy(), pixel_values.numpy(), max_new_tokens=6, eos_token_id=[]
    )
    first_tokens = free[:, prompt_length]
    assert first_tokens[0] != first_tokens[1], "the check needs rows whose first new tokens differ"

    stopped = onnx_model.generate(
        input_ids.numpy(),
        attention_mask.numpy(),
        pixel_values.numpy(),
        max_new_tokens=6,
        eos_token_id=int(first_tokens[0]),
        pad_token_id=PAD_TOKEN_ID,
    )
    # Row 0 ends with its first token and is padded while row 1 continues. The run stops when
    # row 1 also produces that token, or after 6 tokens.
    assert stopped[0, prompt_length] == first_tokens[0]
    assert (stopped[0, prompt_length + 1 :] == PAD_TOKEN_ID).all()
    row_1 = free[1, prompt_length:]
    hits = np.flatnonzero(row_1 == first_tokens[0])
    expected_length = hits[0] + 1 if len(hits) else 6
    assert stopped.shape[1] == prompt_length + expected_length
    np.testing.assert_array_equal(stopped[1, prompt_length:], row_1[:expected_length])


@pytest.mark.parametrize("layout", [[[3, "image", 2], [7]], [["image"], [2, "image", "image"]], [[6], [3]]])
def test_routing_matches_model(layout):
    input_ids, attention_mask, _ = batch(layout, seed=4)
    image_token_mask = input_ids == IMAGE_TOKEN_ID
    lengths = [16] * int(image_token_mask.sum() // 16)
    expected = route_tokens(attention_mask.bool(), image_token_mask, lengths)
    actual = route_chunk(attention_mask.numpy().astype(bool), image_token_mask.numpy(), lengths)

    text_index = expected.text_index
    if text_index is None:
        text_index = torch.arange(input_ids.shape[1]).expand(len(layout), -1)
    num_slots = expected.text_valid.shape[1]
    np.testing.assert_array_equal(actual.text_valid[:, :num_slots], expected.text_valid.numpy())
    valid = expected.text_valid.numpy()
    np.testing.assert_array_equal(actual.text_index[:, :num_slots][valid], text_index.numpy()[valid])
    if expected.image_index is None:
        assert actual.image_attention_mask.sum() == 0
    else:
        image_valid = expected.image_valid.numpy()
        np.testing.assert_array_equal(actual.image_index[image_valid], expected.image_index.numpy()[image_valid])
        np.testing.assert_array_equal(actual.image_attention_mask.astype(bool), image_valid)


def test_runtime_runs_without_torch(exported):
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from dpvr_surgery.export.onnx_runtime import OnnxDpvrModel\n"
        f"model = OnnxDpvrModel({str(exported)!r})\n"
        "output = model.generate(np.array([[5, 6, 7, 8]]), max_new_tokens=3, eos_token_id=[])\n"
        "assert output.shape == (1, 7), output.shape\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "ok"


def test_generate_cli_with_onnx_matches_pytorch(exported, converted, tmp_path):
    image_path = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(image_path)
    common = ["--image", str(image_path), "--prompt", "w5 w6 w7", "--max-new-tokens", "6", "--json", "-q"]

    onnx_result = CliRunner().invoke(main, ["generate", "--onnx", str(exported), *common])
    torch_result = CliRunner().invoke(main, ["generate", str(converted), "--device", "cpu", *common])
    assert onnx_result.exit_code == 0, onnx_result.output
    assert torch_result.exit_code == 0, torch_result.output
    onnx_answer = json.loads(onnx_result.output)
    torch_answer = json.loads(torch_result.output)
    assert onnx_answer["text"] == torch_answer["text"]
    assert onnx_answer["prompt_tokens"] == torch_answer["prompt_tokens"] == 16 + 4


def test_generate_cli_needs_model_or_onnx(exported, converted):
    both = CliRunner().invoke(main, ["generate", str(converted), "--onnx", str(exported), "--prompt", "w5"])
    assert both.exit_code == 2
    assert "Pass exactly one of MODEL" in both.output
    sampled = CliRunner().invoke(main, ["generate", "--onnx", str(exported), "--prompt", "w5", "--temperature", "0.7"])
    assert sampled.exit_code == 2
    assert "--temperature 0.7 is not supported with --onnx" in sampled.output


def test_validation_fails_on_mismatch(exported, converted, caplog):
    changed = DpvrLlavaForConditionalGeneration.from_pretrained(converted, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        changed.model.language_model.layers[-1].mlp.down_proj.weight.add_(0.01)
    with pytest.raises(VerificationError, match=r"ONNX outputs differ from PyTorch by .* above the tolerance 0.0001"):
        validate_onnx_export(changed, exported)

    result = validate_onnx_export(changed, exported, allow_mismatch=True)
    assert result["passed"] is False
    assert result["max_abs_diff"] > ATOL
    assert "pytorch_kernel_spread" in result
    assert "Kept because of --allow-mismatch" in caplog.text


def test_default_tolerance_follows_kernel_spread(exported, converted, monkeypatch):
    changed = DpvrLlavaForConditionalGeneration.from_pretrained(converted, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        changed.model.language_model.layers[-1].mlp.down_proj.weight.add_(1e-3)
    strict = validate_onnx_export(changed, exported, allow_mismatch=True)
    difference = strict["max_abs_diff"]
    assert difference > ATOL
    assert strict["atol_source"] == "default"

    # The tiny model's kernels agree to about 1e-6, so the spread of a deep model at long prompts is set
    # here. test_validation_fails_on_mismatch covers the measured spread itself.
    monkeypatch.setattr(onnx_validate, "kernel_spread", lambda model, inputs: difference / 5)
    relaxed = validate_onnx_export(changed, exported)
    assert relaxed["passed"] is True
    assert relaxed["atol_source"] == "kernel_spread"
    assert relaxed["atol"] == pytest.approx(2 * difference)

    with pytest.raises(VerificationError, match="above the tolerance"):
        validate_onnx_export(changed, exported, atol=ATOL)


def test_export_rejects_unconverted_model(workdir, tmp_path):
    message = "is not a converted dual-path model: its config.json has model_type 'llava'"
    with pytest.raises(InvalidInputError, match=message):
        export_onnx(OnnxExportRequest(model=str(workdir / "source"), output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_export_checks_free_disk(converted, tmp_path, monkeypatch):
    class NearlyFull:
        free = 1000

    monkeypatch.setattr(onnx_export.shutil, "disk_usage", lambda path: NearlyFull())
    message = r"Not enough free disk space for the ONNX export: about .* GB needed, 0.00 GB free"
    with pytest.raises(InvalidInputError, match=message):
        export_onnx(OnnxExportRequest(model=str(converted), output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_invalid_opset_from_recipe_override(converted, tmp_path):
    result = CliRunner().invoke(
        main, ["export", "onnx", str(converted), "-o", str(tmp_path / "out"), "--set", "export.opset=17"]
    )
    assert result.exit_code == 2
    assert "Invalid opset 17: the torch.onnx dynamo exporter writes opset 18 or newer" in result.output


def test_large_graph_uses_external_data(torch_model, tmp_path):
    config = EmbedTokensExporterConfig(torch_model.config.text_config, "feature-extraction")
    path = tmp_path / "embed_tokens.onnx"
    described = export_graph(EmbedTokensGraph(torch_model), config, path, external_data_threshold=0)
    assert described["files"] == ["embed_tokens.onnx", "embed_tokens.onnx_data"]
    assert (tmp_path / "embed_tokens.onnx_data").stat().st_size >= VOCAB_SIZE * 64 * 4

    input_ids = np.array([[1, 5, 9, 127]])
    session = onnxruntime.InferenceSession(str(path))
    expected = torch_model.get_input_embeddings()(torch.from_numpy(input_ids)).detach().numpy()
    np.testing.assert_array_equal(session.run(None, {"input_ids": input_ids})[0], expected)


@pytest.mark.slow
def test_demo_model_greedy_tokens_match_pytorch(tmp_path):
    """32 new tokens per question, real photos, SmolLM2-135M with a random vision tower (several minutes)."""
    from dpvr_surgery.demo import DEFAULT_SPLIT
    from dpvr_surgery.demo_model import build_demo_llava, demo_photos, demo_questions
    from dpvr_surgery.generation import build_prompt, load_model_and_processor

    source = build_demo_llava(tmp_path / "source")
    converted = tmp_path / "converted"
    convert_checkpoint(
        ConvertRequest(model=str(source), output=converted, settings=PlanSettings(DEFAULT_SPLIT), command_line="test"),
        show_progress=False,
    )
    exported = tmp_path / "onnx"
    # fp32 rounding alone moves the logits of this model by about 1e-3 over 600-token prompts (see
    # docs/export.md), so validation runs with a tolerance above the 1e-4 default here. The token
    # comparison below is the parity check.
    report = export_onnx(OnnxExportRequest(model=str(converted), output=exported, atol=2e-2))
    assert report["validation"]["passed"] is True

    model, processor = load_model_and_processor(str(converted), device="cpu")
    onnx_model = OnnxDpvrModel(exported)
    photos = demo_photos()
    for item in demo_questions():
        images = [photos[item.photo]] if item.photo else []
        prompt = build_prompt(processor, item.question, len(images))
        inputs = processor(images=images or None, text=prompt, return_tensors="pt")
        with torch.no_grad():
            expected = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        arrays = {name: value.numpy() for name, value in inputs.items()}
        actual = onnx_model.generate(
            arrays["input_ids"], arrays["attention_mask"], arrays.get("pixel_values"), max_new_tokens=32
        )
        np.testing.assert_array_equal(actual, expected.numpy(), err_msg=item.question)
