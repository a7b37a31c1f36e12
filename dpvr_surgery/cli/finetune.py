"""`dpvr-surgery finetune`: train the side branch of a converted model (and optionally more) with accelerate."""

import json
from pathlib import Path

import click

from ..errors import InvalidInputError
from .options import GroupedCommand, misc_options, model_options, option, recipe_value, show_progress

SECTION = "finetune"


def read_prompts(path: str | Path) -> list[str]:
    """Read one prompt per non-empty line of a text file."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise InvalidInputError(f"Prompts file {path} is empty: write one prompt per line.")
    return prompts


def data_options(function):
    """Add the options that choose the data and the objective."""
    decorators = [
        option("--data", group="Data", help="LLaVA conversation JSON (llava_v1_5_mix665k.json format); for distillation "
               "also a folder of images. Default for distillation: photos bundled with scikit-image."),
        option("--image-folder", group="Data", type=click.Path(file_okay=False),
               help="Folder that the `image` paths of --data are relative to (default: the JSON file's folder)."),
        option("--teacher", group="Data", metavar="SOURCE",
               help="The original LLaVA model (folder or Hub id) to distil from; selects the distillation objective."),
        option("--objective", group="Data", type=click.Choice(["auto", "sft", "distill"]), default="auto",
               show_default=True, help="sft: next-token loss on assistant turns; distill: KL to --teacher; auto: "
               "distill when --teacher is given."),
        option("--prompts", "prompts_file", group="Data", type=click.Path(exists=True, dir_okay=False),
               help="Distillation prompts, one per line, paired with every image (default: 12 generic prompts)."),
        option("--teacher-answer-tokens", group="Data", type=click.IntRange(min=0), default=32, show_default=True,
               help="Distil also on the teacher's greedy answer of up to this many tokens (0: prompt positions only)."),
        option("--teacher-cache/--no-teacher-cache", group="Data", default=False, show_default=True,
               help="Keep the teacher's logits per sample in CPU memory (for small data sets seen over many epochs)."),
        option("--temperature", group="Data", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
               show_default=True, help="Distillation temperature (the loss is scaled by its square)."),
        option("--max-seq-length", group="Data", type=click.IntRange(min=1), default=2048, show_default=True,
               help="Maximum sequence length in tokens; longer rows are truncated, and a cut through an image's "
               "tokens is an error."),
        option("--max-samples", group="Data", type=click.IntRange(min=1), help="Use at most this many rows."),
        option("--shuffle/--no-shuffle", group="Data", default=True, show_default=True,
               help="Shuffle the rows each epoch (seeded by --seed and the epoch)."),
        option("--num-workers", group="Data", type=click.IntRange(min=0), default=0, show_default=True,
               help="DataLoader worker processes that read and tokenise rows."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def training_options(function):
    """Add the options that choose trainable parameters and the optimisation."""
    decorators = [
        option("--train-side-branch/--freeze-side-branch", group="Training", default=True, show_default=True,
               help="Train the side-branch layers (the new parameters)."),
        option("--fusion", group="Training", type=click.Choice(["none", "lora", "full"]), default="none",
               show_default=True, help="Also train the fusion layers: with LoRA (peft), or every weight."),
        option("--train-projector", group="Training", is_flag=True, help="Also train the multimodal projector."),
        option("--lora-rank", group="Training", type=click.IntRange(min=1), default=16, show_default=True,
               help="LoRA rank r."),
        option("--lora-alpha", group="Training", type=float, default=32.0, show_default=True,
               help="LoRA alpha (the update is scaled by alpha / r)."),
        option("--lora-dropout", group="Training", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.05,
               show_default=True, help="Dropout on the LoRA input."),
        option("--epochs", group="Training", type=float, default=1.0, show_default=True,
               help="Passes over the data (fractions allowed); --max-steps wins when set."),
        option("--max-steps", group="Training", type=click.IntRange(min=1), help="Optimizer steps to run."),
        option("--learning-rate", group="Training", type=float, default=2e-5, show_default=True,
               help="Peak learning rate of AdamW."),
        option("--lr-scheduler", group="Training", type=click.Choice(["cosine", "linear", "constant_with_warmup"]),
               default="cosine", show_default=True, help="Learning-rate schedule after the warm-up."),
        option("--warmup-ratio", group="Training", type=float, default=0.03, show_default=True,
               help="Share of the optimizer steps spent warming up linearly from 0."),
        option("--weight-decay", group="Training", type=float, default=0.0, show_default=True, help="AdamW weight decay."),
        option("--max-grad-norm", group="Training", type=float, default=1.0, show_default=True,
               help="Clip the gradient norm to this value (0: no clipping)."),
        option("--batch-size", group="Training", type=click.IntRange(min=1), default=1, show_default=True,
               help="Rows per micro-batch on each process."),
        option("--gradient-accumulation-steps", group="Training", type=click.IntRange(min=1),
               help="Micro-batches per optimizer step (default 1, or derived from --global-batch-size)."),
        option("--global-batch-size", group="Training", type=click.IntRange(min=1),
               help="Rows per optimizer step over all processes; sets the accumulation steps."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def run_options(function):
    """Add precision, checkpoint and output options."""
    decorators = [
        option("--precision", group="Performance", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
               default="auto", show_default=True, help="Compute precision: frozen weights are held in it, trained "
               "ones in fp32 with autocast. auto: bf16 on a CUDA device that supports it, else fp32."),
        option("--gradient-checkpointing/--no-gradient-checkpointing", group="Performance", default=False,
               show_default=True, help="Recompute layer activations in the backward pass to save memory."),
        option("--checkpoint-dir", group="Output", type=click.Path(file_okay=False, path_type=Path),
               help="Folder for training checkpoints (default: OUTPUT-checkpoints next to OUTPUT)."),
        option("--save-steps", group="Output", type=click.IntRange(min=1), default=500, show_default=True,
               help="Save a checkpoint every this many optimizer steps."),
        option("--save-total-limit", group="Output", type=click.IntRange(min=1), default=2, show_default=True,
               help="Keep only this many newest checkpoints."),
        option("--resume", group="Output", is_flag=True,
               help="Continue from the newest checkpoint in the checkpoint folder (start at step 0 if there is none)."),
        option("--logging-steps", group="Output", type=click.IntRange(min=1), default=10, show_default=True,
               help="Log the mean loss every this many optimizer steps."),
        option("--tensorboard", group="Output", is_flag=True,
               help="Write TensorBoard logs to CHECKPOINT_DIR/runs (needs the tensorboard package)."),
        option("--save-adapter", group="Output", is_flag=True,
               help="Write only the trained weights (and the LoRA adapter unmerged) instead of a complete model."),
        option("--max-shard-size", group="Output", default="5GB", show_default=True, help="Largest safetensors shard."),
        option("--overwrite", group="Output", is_flag=True,
               help="Replace OUTPUT if it is not empty, and delete old checkpoints when not resuming."),
        option("--dry-run", group="Output", is_flag=True,
               help="Check settings and data, print parameter counts and step counts; train nothing."),
        option("--json", "as_json", group="Output", is_flag=True, help="Print the report as JSON."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


@click.command(cls=GroupedCommand)
@click.argument("model")
@option("-o", "--output", group="Output", type=click.Path(file_okay=False, path_type=Path), required=True,
        help="Folder to write the fine-tuned model to.")
@data_options
@training_options
@run_options
@model_options
@misc_options
@click.pass_context
def finetune(ctx, model, output, prompts_file, resume, overwrite, dry_run, as_json, model_options, misc, **options):
    """Fine-tune the converted model MODEL: the side branch only by default, on one or many devices.

    Supervised with --data (LLaVA conversation JSON), or distilled from the original model with
    --teacher SOURCE. For several GPUs or nodes run it under `accelerate launch` (see recipes/accelerate).
    """
    from ..finetune.config import RECIPE_KEYS, FinetuneConfig
    from ..finetune.plan import format_finetune_plan, plan_finetune
    from ..finetune.trainer import run_finetune

    options["dtype"] = model_options.dtype
    options["seed"] = misc.seed
    options["prompts"] = read_prompts(prompts_file) if prompts_file else None
    parameters = {"dtype": "dtype", "seed": "seed", "prompts": "prompts_file"}
    settings = {}
    for key in RECIPE_KEYS:
        settings[key] = recipe_value(ctx, misc, SECTION, parameters.get(key, key), key, options[key])

    config = FinetuneConfig(
        model=model,
        output=output,
        resume=resume,
        overwrite=overwrite,
        show_progress=show_progress(misc),
        revision=model_options.revision,
        cache_dir=model_options.cache_dir,
        **settings,
    )
    if dry_run:
        plan = plan_finetune(config)
        click.echo(json.dumps(plan, indent=2) if as_json else format_finetune_plan(plan))
        return

    report = run_finetune(config)
    if not report:
        return
    if as_json:
        click.echo(json.dumps(report["finetune"], indent=2))
        return
    summary = report["finetune"]
    trainable = summary["trainable_parameters"]
    click.echo(
        f"Trainable parameters: {trainable['trainable']:,} of {trainable['total']:,} ({trainable['percent']:.2f} %)"
    )
    click.echo(f"Steps: {summary['steps']}, final loss {summary['final_loss']}")
    click.echo(f"Wrote {output}")
