"""Write the result of fine-tuning: a complete converted folder, or only the trained weights.

A complete folder has what `convert` writes: config, model code (copied from the input folder),
processor and tokenizer files, sharded safetensors under the fixed key names, `dpvr_recipe.yaml`
(now with a `finetune` section), `dpvr_report.json` and the model card. Frozen tensors are copied
from the input folder unchanged, so training in bf16 does not round weights that never trained.
Trained tensors are cast to the dtype of the tensor they replace (or to `dtype`).
"""

import json
import logging
import platform
import shutil
from importlib import metadata, resources
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

from .. import __version__
from ..checkpoint import find_weight_files, iter_tensors, resolve_model_path
from ..errors import InvalidInputError
from ..modeling import DpvrLlavaForConditionalGeneration
from ..output import (
    ShardedSafetensorsWriter,
    atomic_output_dir,
    check_output_not_input,
    copy_side_files,
    parse_size,
    peak_rss_bytes,
    save_safetensors,
)
from ..recipe import RECIPE_FILE_NAME, load_recipe, write_recipe
from .trainable import LORA_KEY_PATTERN, lora_adapter_state, merge_lora_state

logger = logging.getLogger(__name__)

MODEL_CODE_FILES = ("configuration_dpvr_llava.py", "modeling_dpvr_llava.py")
REPORT_FILE_NAME = "dpvr_report.json"
TRAINED_WEIGHTS_NAME = "trained_weights.safetensors"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
LORA_CONFIG_NAME = "adapter_config.json"
SAVE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_output_folder(output: Path, *, overwrite: bool, inputs=()) -> None:
    """Raise InvalidInputError before training when OUT cannot be written: a file, a non-empty folder
    without `overwrite`, or a folder whose replacement would delete one of the `inputs`."""
    output = Path(output)
    check_output_not_input(output, inputs)
    if output.exists() and not output.is_dir():
        raise InvalidInputError(f"Invalid output folder {output}: a file with that name exists. Choose another folder.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise InvalidInputError(
            f"Output folder {output} already exists and is not empty. Pass --overwrite to replace it, or choose "
            "another output folder."
        )


def trained_state(student: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the tensors of `state` whose parameters trained (LoRA keys included), on the CPU."""
    names = [name for name, parameter in student.named_parameters() if parameter.requires_grad]
    missing = [name for name in names if name not in state]
    if missing:
        raise RuntimeError(f"The gathered state dict lacks trained parameters, for example {missing[:3]}.")
    return {name: state[name].detach().to("cpu") for name in names}


def write_output(session, state: dict[str, torch.Tensor], progress, *, seconds: float) -> dict:
    """Write OUT (complete folder, or the trained weights with `save_adapter`); return the report written there."""
    config = session.config
    trained = trained_state(session.student, state)
    report = build_report(session, progress, seconds)
    inputs = [session.model_path, *config.input_paths()]
    with atomic_output_dir(Path(config.output), overwrite=config.overwrite, inputs=inputs) as folder:
        if config.save_adapter:
            files = write_adapter_files(folder, trained, session.lora_config, session.model_path, config.dtype)
        else:
            files = write_model_files(folder, session.model_path, trained, session.lora_config, config)
        report["finetune"]["files"] = files

        sections = _input_recipe(session.model_path)
        sections["finetune"] = config.recipe_section()
        write_recipe(folder, sections)
        full_report = {**_input_report(session.model_path), "finetune": report["finetune"]}
        (folder / REPORT_FILE_NAME).write_text(json.dumps(full_report, indent=2) + "\n", encoding="utf-8")
        (folder / "README.md").write_text(render_card(session.model_path, report["finetune"], config), encoding="utf-8")
    logger.info("Wrote %s", config.output)
    return full_report


def write_model_files(folder: Path, source: Path, trained: dict, lora_config, config) -> list[str]:
    """Write config, model code, side files and weights of a complete converted folder."""
    copied = copy_side_files(source, folder)
    _write_config(source, folder, config.dtype)
    for name in MODEL_CODE_FILES:
        source_file = source / name
        if source_file.is_file():
            shutil.copyfile(source_file, folder / name)
        else:
            with resources.as_file(resources.files("dpvr_surgery.modeling").joinpath(name)) as path:
                shutil.copyfile(path, folder / name)
    weights = write_weights(folder, source, trained, lora_config, dtype=config.dtype, max_shard_size=config.max_shard_size)
    return sorted([*weights, "config.json", *MODEL_CODE_FILES, *copied])


def write_weights(
    folder: Path, source: Path, trained: dict, lora_config, *, dtype: str, max_shard_size: str | int
) -> list[str]:
    """Stream the input weights into new shards, replacing trained tensors and merging LoRA pairs."""
    target = SAVE_DTYPES[dtype]
    direct = {key: tensor for key, tensor in trained.items() if not LORA_KEY_PATTERN.match(key)}
    lora_modules = _lora_modules(trained)
    used: set[str] = set()

    writer = ShardedSafetensorsWriter(folder, parse_size(max_shard_size))
    for name, tensor in iter_tensors(find_weight_files(source)):
        output = tensor
        if name in direct:
            output = direct[name]
            used.add(name)
        elif name.endswith(".weight") and name.removesuffix(".weight") in lora_modules:
            module = name.removesuffix(".weight")
            pair = lora_modules[module]
            merged = merge_lora_state({f"{module}.base_layer.weight": tensor, **pair}, lora_config)
            output = merged[name]
            used.add(module)
        if output.is_floating_point():
            output = output.to(target or tensor.dtype)
        writer.add(name, output)
    unused = (set(direct) - used) | (set(lora_modules) - used)
    if unused:
        raise RuntimeError(f"Trained tensors without a place in {source}: {sorted(unused)[:5]}")
    return [path.name for path in writer.finish()]


def write_adapter_files(folder: Path, trained: dict, lora_config, model_path: Path, dtype: str) -> list[str]:
    """Write only the trained weights: fixed-name tensors, and the LoRA adapter in peft's format."""
    target = SAVE_DTYPES[dtype]
    files = []
    direct = {
        key: (tensor.to(target) if target is not None else tensor).contiguous()
        for key, tensor in trained.items()
        if not LORA_KEY_PATTERN.match(key)
    }
    if direct:
        save_safetensors(direct, folder / TRAINED_WEIGHTS_NAME, metadata={"format": "pt"})
        files.append(TRAINED_WEIGHTS_NAME)
    if lora_config is not None:
        adapter = {key: tensor.contiguous() for key, tensor in lora_adapter_state(trained).items()}
        save_safetensors(adapter, folder / LORA_WEIGHTS_NAME, metadata={"format": "pt"})
        lora_config.base_model_name_or_path = str(model_path)
        lora_config.save_pretrained(str(folder))
        files += [LORA_WEIGHTS_NAME, LORA_CONFIG_NAME]
    return files


def load_finetuned(
    converted: str | Path, adapter_folder: str | Path, *, dtype: torch.dtype | None = None
) -> DpvrLlavaForConditionalGeneration:
    """Load a converted model and apply the trained weights that `finetune --save-adapter` wrote.

    Fixed-name tensors replace the converted model's, and a LoRA adapter is loaded with peft and merged.
    Raises InvalidInputError when a tensor name does not exist in the model.
    """
    adapter_folder = Path(adapter_folder)
    model = DpvrLlavaForConditionalGeneration.from_pretrained(resolve_model_path(str(converted)), dtype=dtype)
    trained_file = adapter_folder / TRAINED_WEIGHTS_NAME
    if trained_file.is_file():
        tensors = load_file(trained_file)
        unknown = sorted(set(tensors) - set(model.state_dict()))
        if unknown:
            raise InvalidInputError(
                f"{trained_file} contains tensors that {converted} does not have, for example {unknown[:3]}. Apply it to "
                "the converted model it was trained from."
            )
        model.load_state_dict(tensors, strict=False)
    if (adapter_folder / LORA_CONFIG_NAME).is_file():
        model = PeftModel.from_pretrained(model, str(adapter_folder)).merge_and_unload()
    return model.eval()


def build_report(session, progress, seconds: float) -> dict:
    """Build the `finetune` entry of `dpvr_report.json`."""
    config = session.config
    final_loss = progress.losses[-1][1] if progress.losses else None
    return {
        "finetune": {
            "tool": "dpvr-surgery",
            "version": __version__,
            "command_line": config.command_line,
            "input": str(session.model_path),
            "teacher": config.teacher,
            "objective": config.resolved_objective,
            "settings": config.recipe_section(),
            "precision": session.precision,
            "processes": session.accelerator.num_processes,
            "gradient_accumulation_steps": session.accumulation,
            "data": session.data_stats,
            "trainable_parameters": session.trainable_report.as_dict(),
            "steps": progress.step,
            "total_steps": session.total_steps,
            "losses": [list(item) for item in progress.losses],
            "final_loss": final_loss,
            "lora_merged": session.lora_config is not None and not config.save_adapter,
            "resources": {"seconds": round(seconds, 2), "peak_rss_bytes": peak_rss_bytes()},
            "environment": _environment(),
        }
    }


def render_card(source: Path, finetune: dict, config) -> str:
    """Return the input folder's model card with a fine-tuning section appended."""
    card_path = source / "README.md"
    card = card_path.read_text(encoding="utf-8").rstrip() + "\n" if card_path.is_file() else "# Dual-path model\n"
    if config.resolved_objective == "distill":
        objective = f"distillation from `{config.teacher}` (KL between the source's and this model's next-token distributions)"
    else:
        objective = f"supervised next-token loss on the assistant turns of `{config.data}`"
    trainable = finetune["trainable_parameters"]
    groups = ", ".join(trainable["groups"])
    lines = [
        "",
        "## Fine-tuning",
        "",
        f"Fine-tuned with `dpvr-surgery finetune`: {objective}. Trained: {groups}, "
        f"{trainable['trainable']:,} of {trainable['total']:,} parameters ({trainable['percent']:.2f} %); "
        f"{finetune['steps']} optimizer steps, final loss {finetune['final_loss']}.",
        "",
        "```bash",
        config.command_line,
        "```",
    ]
    if config.save_adapter:
        lines += [
            "",
            "This folder holds only the trained weights. Apply them to the converted model they were trained from:",
            "",
            "```python",
            "from dpvr_surgery.finetune import load_finetuned",
            "",
            f'model = load_finetuned("{source}", "THIS_FOLDER")',
            "```",
        ]
    return card + "\n".join(lines) + "\n"


def _write_config(source: Path, folder: Path, dtype: str) -> None:
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    if SAVE_DTYPES[dtype] is not None:
        config["dtype"] = str(SAVE_DTYPES[dtype]).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _lora_modules(trained: dict) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in trained.items():
        match = LORA_KEY_PATTERN.match(key)
        if match:
            module = match.group("module").removesuffix(".base_layer")
            modules.setdefault(module, {})[key] = tensor
    return modules


def _input_recipe(source: Path) -> dict:
    path = source / RECIPE_FILE_NAME
    if not path.is_file():
        return {}
    try:
        return {name: values for name, values in load_recipe(path).items() if values}
    except InvalidInputError as error:
        logger.warning("Ignoring the recipe of the input folder: %s", error)
        return {}


def _input_report(source: Path) -> dict:
    path = source / REPORT_FILE_NAME
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _environment() -> dict:
    packages = {}
    for name in ("torch", "transformers", "accelerate", "peft", "safetensors"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": packages}
