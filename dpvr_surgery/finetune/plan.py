"""`finetune --dry-run`: check settings and data and count parameters and steps, without loading weights."""

import math

import torch
from accelerate import PartialState

from ..checkpoint import read_config, resolve_model_path
from ..errors import InvalidInputError
from ..modeling import DpvrLlavaConfig, DpvrLlavaForConditionalGeneration
from .config import FinetuneConfig
from .data import ConversationEncoder
from .saving import check_output_folder
from .setup import build_dataset, load_processor, resolve_precision, special_token_ids, use_cpu
from .trainable import select_trainable


def plan_finetune(config: FinetuneConfig) -> dict:
    """Validate a run and return what it would do: parameter counts, data counts, steps and output.

    The model is built on the meta device, so no weights are read. The first row of the data is
    tokenised, which checks the chat template, the image-token count and the truncation rule.
    """
    config.validate()
    check_output_folder(config.output, overwrite=config.overwrite)
    path = resolve_model_path(config.model, revision=config.revision, cache_dir=config.cache_dir)
    config_dict = read_config(path)
    if config_dict.get("model_type") != DpvrLlavaConfig.model_type:
        raise InvalidInputError(
            f"{path} is not a converted dual-path model (model_type {config_dict.get('model_type')!r}). Convert it "
            "first with dpvr-surgery convert."
        )
    model_config = DpvrLlavaConfig.from_pretrained(path)
    with torch.device("meta"):
        model = DpvrLlavaForConditionalGeneration(model_config)
    trainable, _ = select_trainable(model, config.selection())

    processor = load_processor(path)
    eos_token_ids, _ = special_token_ids(path, processor)
    encoder = ConversationEncoder(processor, model_config, max_length=config.max_seq_length, eos_token_ids=eos_token_ids)
    dataset, data_stats = build_dataset(config, encoder)
    first = dataset[0]

    num_processes = PartialState(cpu=use_cpu()).num_processes
    accumulation = config.accumulation_steps(num_processes)
    micro_batches = math.ceil(len(dataset) / (config.batch_size * num_processes))
    updates_per_epoch = math.ceil(micro_batches / accumulation)
    total_steps = config.max_steps or math.ceil(config.epochs * updates_per_epoch)
    return {
        "model": str(path),
        "objective": config.resolved_objective,
        "teacher": config.teacher,
        "precision": resolve_precision(config.precision),
        "trainable_parameters": trainable.as_dict(),
        "data": data_stats,
        "first_row_tokens": int(first.input_ids.shape[0]),
        "processes": num_processes,
        "global_batch_size": config.batch_size * num_processes * accumulation,
        "gradient_accumulation_steps": accumulation,
        "optimizer_steps": total_steps,
        "warmup_steps": math.ceil(config.warmup_ratio * total_steps),
        "output": str(config.output),
        "checkpoint_dir": str(config.checkpoint_folder),
    }


def format_finetune_plan(plan: dict) -> str:
    """Format the dry-run plan as lines of text."""
    trainable = plan["trainable_parameters"]
    groups = ", ".join(f"{name} {count:,}" for name, count in trainable["groups"].items())
    data = plan["data"]
    lines = [
        f"Model: {plan['model']}",
        f"Objective: {plan['objective']}" + (f" (teacher {plan['teacher']})" if plan["teacher"] else ""),
        f"Trainable parameters: {trainable['trainable']:,} of {trainable['total']:,} ({trainable['percent']:.2f} %): {groups}",
        f"Data: {', '.join(f'{key} {value}' for key, value in data.items() if not isinstance(value, (list, dict)))}",
        f"First row: {plan['first_row_tokens']} tokens",
        f"Precision: {plan['precision']}; {plan['processes']} process(es), global batch {plan['global_batch_size']} "
        f"({plan['gradient_accumulation_steps']} accumulation step(s))",
        f"Optimizer steps: {plan['optimizer_steps']} ({plan['warmup_steps']} warm-up)",
        f"Would write: {plan['output']} (checkpoints in {plan['checkpoint_dir']})",
    ]
    return "\n".join(lines)
