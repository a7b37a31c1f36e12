"""Fine-tuning on tiny real models: trainable selection, gradient checkpointing, LoRA merge, runs and outputs."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from finetune_helpers import (
    convert_tiny,
    load_weights,
    save_tiny_llava,
    write_conversations,
    write_images,
)
from transformers import AutoModelForImageTextToText, AutoProcessor

from dpvr_surgery.errors import InvalidInputError
from dpvr_surgery.finetune.collate import collate_samples
from dpvr_surgery.finetune.config import FinetuneConfig
from dpvr_surgery.finetune.data import ConversationEncoder, DistillationDataset, distillation_items
from dpvr_surgery.finetune.evaluate import compare_with_teacher, teacher_references
from dpvr_surgery.finetune.objectives import PositionLogits, distillation_kl, distillation_positions
from dpvr_surgery.finetune.saving import load_finetuned
from dpvr_surgery.finetune.setup import (
    enable_gradient_checkpointing,
    load_processor,
    load_student,
    load_teacher,
    special_token_ids,
)
from dpvr_surgery.finetune.trainable import (
    TrainableSelection,
    count_parameters,
    merge_lora_state,
    select_trainable,
)
from dpvr_surgery.finetune.trainer import run_finetune

SIDE_PREFIX = "model.side_branch."
FUSION_PREFIX = "model.language_model.layers.5."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices run fastest on one thread, and the CPU is shared with other test runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    source = save_tiny_llava(root / "source")
    return {"root": root, "source": source, "converted": convert_tiny(source, root / "converted")}


@pytest.fixture(scope="module")
def prompt_samples(folders):
    """Distillation samples built from four bundled photos with two prompts each."""
    processor = load_processor(folders["converted"])
    student, _ = load_student(str(folders["converted"]), torch.float32)
    eos, _ = special_token_ids(folders["converted"], processor)
    encoder = ConversationEncoder(processor, student.config, max_length=512, eos_token_ids=eos)
    items, _ = distillation_items(None, prompts=["Describe this image.", "What is in this picture?"])
    dataset = DistillationDataset(items[:8], encoder)
    return [dataset[index] for index in range(len(dataset))]


def base_config(folders, output: Path, **overrides) -> FinetuneConfig:
    settings = {
        "model": str(folders["converted"]),
        "output": output,
        "teacher": str(folders["source"]),
        "max_steps": 6,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.0,
        "teacher_answer_tokens": 4,
        "max_samples": 16,
        "save_steps": 1000,
        "show_progress": False,
        "command_line": "dpvr-surgery finetune (test)",
    }
    settings.update(overrides)
    return FinetuneConfig(**settings)


def distillation_loss(student, teacher, samples) -> torch.Tensor:
    batch = collate_samples(samples, 0)
    positions = distillation_positions(batch["loss_mask"], batch["attention_mask"])
    inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], positions)
    with torch.no_grad():
        teacher_logits = PositionLogits(teacher)(*inputs)
    return distillation_kl(PositionLogits(student)(*inputs), teacher_logits)


# --------------------------------------------------------------------------- trainable parameters


def test_default_selection_is_side_branch(folders):
    student, _ = load_student(str(folders["converted"]), torch.float32)
    report, lora = select_trainable(student, TrainableSelection())

    layer_parameters = sum(parameter.numel() for parameter in student.model.language_model.layers[0].parameters())
    trainable = [name for name, parameter in student.named_parameters() if parameter.requires_grad]
    assert lora is None
    assert all(name.startswith(SIDE_PREFIX) for name in trainable)
    assert report.trainable == layer_parameters
    assert report.total == sum(parameter.numel() for parameter in student.parameters())
    assert report.format() == (
        f"Trainable parameters: {layer_parameters:,} of {report.total:,} "
        f"({100 * layer_parameters / report.total:.2f} %): side branch {layer_parameters:,}"
    )


def test_full_fusion_and_projector_selection(folders):
    student, _ = load_student(str(folders["converted"]), torch.float32)
    report, _ = select_trainable(student, TrainableSelection(fusion="full", projector=True))

    projector = sum(parameter.numel() for parameter in student.model.multi_modal_projector.parameters())
    layer = sum(parameter.numel() for parameter in student.model.language_model.layers[5].parameters())
    assert report.groups == {"side branch": layer, "fusion layers": layer, "projector": projector}
    assert report.trainable == 2 * layer + projector
    trainable = {name.split(".")[1] for name, parameter in student.named_parameters() if parameter.requires_grad}
    assert trainable == {"side_branch", "language_model", "multi_modal_projector"}


def test_lora_selection_counts(folders):
    student, _ = load_student(str(folders["converted"]), torch.float32)
    total_before = count_parameters(student).total
    report, lora = select_trainable(student, TrainableSelection(side_branch=False, fusion="lora", lora_rank=4))

    # Seven linear layers in a Llama decoder layer: q, k, v, o (64x64 or 64x32) and gate, up, down (64x128).
    linear_shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    expected = sum(4 * (inputs + outputs) for inputs, outputs in linear_shapes)
    assert lora is not None
    assert report.trainable == expected
    assert report.total == total_before + expected
    names = [name for name, parameter in student.named_parameters() if parameter.requires_grad]
    assert all(name.startswith(FUSION_PREFIX) and ".lora_" in name for name in names)


def test_empty_selection_raises():
    with pytest.raises(InvalidInputError, match="Nothing to train"):
        TrainableSelection(side_branch=False).validate()


def test_lora_merge_matches_adapter_forward(folders, prompt_samples):
    student, _ = load_student(str(folders["converted"]), torch.float32)
    _, lora = select_trainable(student, TrainableSelection(fusion="lora", lora_rank=4, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    student.eval()

    batch = collate_samples(prompt_samples[:2], 0)
    with torch.no_grad():
        adapted = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"], use_cache=False).logits
        merged_model, _ = load_student(str(folders["converted"]), torch.float32)
        merged_model.load_state_dict(merge_lora_state(student.state_dict(), lora))
        merged = merged_model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     pixel_values=batch["pixel_values"], use_cache=False).logits
        plain, _ = load_student(str(folders["converted"]), torch.float32)
        unchanged = plain.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 pixel_values=batch["pixel_values"], use_cache=False).logits

    assert (adapted - unchanged).abs().max() > 1e-3
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("fusion", ["none", "lora"])
def test_checkpointing_gives_same_gradients(folders, prompt_samples, fusion):
    teacher = load_teacher(str(folders["source"]), torch.float32)

    def gradients(checkpointing: str | None) -> dict[str, torch.Tensor | None]:
        torch.manual_seed(0)
        student, _ = load_student(str(folders["converted"]), torch.float32)
        select_trainable(student, TrainableSelection(fusion=fusion, lora_dropout=0.0))
        if checkpointing == "non-reentrant":
            enable_gradient_checkpointing(student)
        elif checkpointing == "reentrant":
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
            student.disable_input_require_grads()
        student.train()
        distillation_loss(student, teacher, prompt_samples[:2]).backward()
        return {name: parameter.grad for name, parameter in student.named_parameters() if parameter.requires_grad}

    plain = gradients(None)
    checkpointed = gradients("non-reentrant")
    assert set(plain) == set(checkpointed)
    for name, gradient in checkpointed.items():
        assert gradient is not None, name
        if ".lora_A." not in name:  # lora_B starts at zero, so lora_A's first gradient is zero
            assert gradient.abs().max() > 0, name
        torch.testing.assert_close(gradient, plain[name], atol=1e-6, rtol=1e-4)

    # The frozen shared stack feeds the side branch, so no checkpointed layer gets inputs that require
    # gradients. Reentrant checkpointing then cuts every trained layer out of the graph.
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        with pytest.raises(RuntimeError, match="does not require grad"):
            gradients("reentrant")


# --------------------------------------------------------------------------- runs


def test_distillation_lowers_kl(folders, prompt_samples):
    teacher = load_teacher(str(folders["source"]), torch.float32)
    converted, _ = load_student(str(folders["converted"]), torch.float32)
    eos, pad = special_token_ids(folders["converted"], load_processor(folders["converted"]))
    settings = {"eos_token_ids": eos, "pad_token_id": pad}
    references = teacher_references(teacher, prompt_samples, max_new_tokens=4, **settings)
    before = compare_with_teacher(converted, references, **settings)

    output = folders["root"] / "distilled"
    # The same eight samples as `prompt_samples`: this checks that training fits them, and the demo
    # script measures held-out samples.
    prompts = ["Describe this image.", "What is in this picture?"]
    report = run_finetune(base_config(folders, output, max_steps=40, max_samples=8, prompts=prompts))
    after = compare_with_teacher(load_student(str(output), torch.float32)[0], references, **settings)
    source_itself = compare_with_teacher(teacher, references, **settings)

    assert report["finetune"]["steps"] == 40
    assert after["mean_kl"] < 0.7 * before["mean_kl"]
    assert source_itself["mean_kl"] < 1e-6
    assert source_itself["exact_answers"] == 1.0
    assert before["positions"] == after["positions"] == source_itself["positions"] > 0
    losses = [loss for _, loss in report["finetune"]["losses"]]
    assert losses[-1] < losses[0]


def test_output_is_complete_converted_folder(folders):
    output = folders["root"] / "complete"
    run_finetune(base_config(folders, output, precision="bf16", gradient_checkpointing=True, batch_size=2))

    converted = folders["converted"]
    before, after = load_weights(converted), load_weights(output)
    assert set(after) == set(before)
    changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
    assert changed and all(name.startswith(SIDE_PREFIX) for name in changed)
    assert {tensor.dtype for tensor in after.values()} == {torch.float32}
    for name in ("configuration_dpvr_llava.py", "modeling_dpvr_llava.py", "tokenizer.json", "chat_template.jinja"):
        assert (output / name).read_bytes() == (converted / name).read_bytes(), name
    assert json.loads((output / "config.json").read_text()) == json.loads((converted / "config.json").read_text())

    recipe = yaml.safe_load((output / "dpvr_recipe.yaml").read_text())
    assert recipe["convert"]["split"] == 3
    assert recipe["finetune"]["precision"] == "bf16"
    assert recipe["finetune"]["teacher"] == str(folders["source"])
    report = json.loads((output / "dpvr_report.json").read_text())
    assert report["plan"]["plan"]["split_layer"] == 3
    assert report["finetune"]["steps"] == 6
    assert report["finetune"]["trainable_parameters"]["groups"] == {"side branch": 36992}
    assert "## Fine-tuning" in (output / "README.md").read_text()

    model = AutoModelForImageTextToText.from_pretrained(output)
    assert type(model).__name__ == "DpvrLlavaForConditionalGeneration"
    assert torch.equal(model.state_dict()["model.side_branch.layers.0.mlp.up_proj.weight"],
                       after["model.side_branch.layers.0.mlp.up_proj.weight"])
    assert AutoProcessor.from_pretrained(output).tokenizer.chat_template is not None


def test_save_adapter_matches_merged_output(folders, prompt_samples):
    settings = {"fusion": "lora", "train_projector": True, "lora_rank": 4, "lora_dropout": 0.0}
    merged_dir = folders["root"] / "lora-merged"
    adapter_dir = folders["root"] / "lora-adapter"
    run_finetune(base_config(folders, merged_dir, **settings))
    run_finetune(base_config(folders, adapter_dir, save_adapter=True, **settings))

    assert sorted(path.name for path in adapter_dir.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "dpvr_recipe.yaml", "dpvr_report.json",
        "trained_weights.safetensors",
    ]
    trained = load_file(adapter_dir / "trained_weights.safetensors")
    assert all(name.startswith((SIDE_PREFIX, "model.multi_modal_projector.")) for name in trained)
    lora_keys = list(load_file(adapter_dir / "adapter_model.safetensors"))
    assert lora_keys and all(key.startswith("base_model.model." + FUSION_PREFIX) for key in lora_keys)

    merged = load_student(str(merged_dir), torch.float32)[0].eval()
    applied = load_finetuned(folders["converted"], adapter_dir)
    batch = collate_samples(prompt_samples[:2], 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "pixel_values": batch["pixel_values"], "use_cache": False}
    with torch.no_grad():
        torch.testing.assert_close(applied(**inputs).logits, merged(**inputs).logits, atol=1e-5, rtol=0)
    fusion_before = load_weights(folders["converted"])[FUSION_PREFIX + "self_attn.q_proj.weight"]
    assert not torch.equal(load_weights(merged_dir)[FUSION_PREFIX + "self_attn.q_proj.weight"], fusion_before)


def test_supervised_run_with_text_only_rows(folders):
    data = folders["root"] / "sft"
    write_images(data / "images", 2)
    rows = [
        {"id": "a", "image": "image0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "c", "image": "missing.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "?"}]},
        {"id": "d", "image": "image1.png", "conversations": [
            {"from": "human", "value": "Describe <image>"}, {"from": "gpt", "value": "Random pixels."}]},
    ]
    output = folders["root"] / "sft-out"
    report = run_finetune(base_config(
        folders, output, teacher=None, data=str(write_conversations(data / "data.json", rows)),
        image_folder=str(data / "images"), batch_size=2, max_steps=4, fusion="full",
    ))

    stats = report["finetune"]["data"]
    assert stats["objective"] == "sft"
    assert (stats["kept"], stats["text_only"], stats["skipped_missing_images"]) == (3, 1, 1)
    assert all(loss > 0 for _, loss in report["finetune"]["losses"])
    before, after = load_weights(folders["converted"]), load_weights(output)
    assert not torch.equal(before[FUSION_PREFIX + "mlp.down_proj.weight"], after[FUSION_PREFIX + "mlp.down_proj.weight"])


# --------------------------------------------------------------------------- errors


def test_non_empty_output_rejected_before_training(folders):
    output = folders["root"] / "occupied"
    output.mkdir()
    (output / "file.txt").write_text("keep me")
    with pytest.raises(InvalidInputError, match="already exists and is not empty. Pass --overwrite"):
        run_finetune(base_config(folders, output))


def test_existing_checkpoints_need_resume(folders):
    output = folders["root"] / "twice"
    run_finetune(base_config(folders, output, save_steps=3))
    shutil.rmtree(output)
    with pytest.raises(InvalidInputError, match=r"already contains 1 checkpoint\(s\). Pass --resume"):
        run_finetune(base_config(folders, output, save_steps=3))
    with pytest.raises(InvalidInputError, match=r"Cannot resume from .*checkpoint-3: it was trained with other "
                       r"settings \(learning_rate: 0.001 then, 0.002 now\)"):
        run_finetune(base_config(folders, output, save_steps=3, resume=True, learning_rate=2e-3))


def test_wrong_teacher_rejected(folders):
    other = save_tiny_llava(folders["root"] / "other-source", seed=1)
    with pytest.raises(InvalidInputError, match="token embeddings differ from the converted model's"):
        run_finetune(base_config(folders, folders["root"] / "wrong-teacher", teacher=str(other)))


def test_unconverted_model_rejected(folders):
    with pytest.raises(InvalidInputError, match=r"is not a converted dual-path model \(model_type 'llava'"):
        run_finetune(base_config(folders, folders["root"] / "unconverted", model=str(folders["source"])))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teacher": None}, "Supervised fine-tuning needs --data"),
        ({"objective": "distill", "teacher": None}, "Distillation needs the source model: pass --teacher"),
        ({"precision": "fp16"}, "--precision fp16 needs a GPU"),
        ({"global_batch_size": 3, "batch_size": 2}, "Invalid global_batch_size 3: it must be a multiple"),
        ({"fusion": "half"}, "Invalid fusion 'half'"),
        ({"warmup_ratio": 1.5}, r"Invalid warmup_ratio 1.5: it must be in \[0, 1\)"),
    ],
)
def test_invalid_settings_raise(folders, overrides, message):
    with pytest.raises(InvalidInputError, match=message):
        run_finetune(base_config(folders, folders["root"] / "invalid", **overrides))


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_package_raises(folders):
    with pytest.raises(InvalidInputError, match="--tensorboard needs the tensorboard package"):
        run_finetune(base_config(folders, folders["root"] / "tensorboard", tensorboard=True))
