"""The fine-tuning loop on `accelerate`: mixed precision, gradient accumulation, checkpoints and resume.

One script runs on one device or, under `accelerate launch`, on several processes (DDP, FSDP or
DeepSpeed, as set in the launch configuration). `accelerate` does all distributed work. A run killed at
any point and restarted with `resume` continues from its newest checkpoint to the same weights as
an uninterrupted run, because the data order is a function of the seed and the epoch, and the
checkpoint contains the trainable weights, the optimizer, the RNG states and the step.
"""

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..errors import InvalidInputError, VerificationError
from .checkpoints import (
    check_fingerprint,
    clear_checkpoints,
    list_checkpoints,
    read_checkpoint_state,
    register_trainable_state_hooks,
    save_checkpoint,
)
from .collate import collate_samples
from .config import FinetuneConfig
from .data import ConversationEncoder, EncodedSample
from .objectives import (
    PositionLogits,
    complete_with_teacher,
    distillation_kl,
    distillation_positions,
    supervised_loss,
    supervised_targets,
)
from .saving import check_output_folder, write_output
from .setup import (
    EpochSampler,
    build_accelerator,
    build_dataset,
    check_teacher,
    enable_gradient_checkpointing,
    frozen_dtype,
    keep_samples,
    load_processor,
    load_student,
    load_teacher,
    release_accelerator_state,
    resolve_precision,
    special_token_ids,
)
from .trainable import select_trainable, upcast_trainable

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """The objects of one run, prepared by `accelerate`."""

    config: FinetuneConfig
    accelerator: Accelerator
    precision: str
    model_path: Path
    student: torch.nn.Module
    module: torch.nn.Module
    teacher: torch.nn.Module | None
    teacher_logits: PositionLogits | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    dataloader: DataLoader
    sampler: EpochSampler
    accumulation: int
    updates_per_epoch: int
    total_steps: int
    pad_token_id: int
    eos_token_ids: list[int]
    trainable_report: object
    lora_config: object
    data_stats: dict
    answers: dict[int, EncodedSample] = field(default_factory=dict)
    teacher_cache: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Progress:
    """Training progress: optimizer steps done, scheduler steps taken and the logged losses."""

    step: int = 0
    scheduler_steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    window: list[float] = field(default_factory=list)


def run_finetune(config: FinetuneConfig) -> dict:
    """Fine-tune a converted model and write the result to `config.output`; return the run report.

    Raises InvalidInputError for bad settings, data or models (before training starts where it can) and
    VerificationError when the loss becomes NaN or infinite.
    """
    started = time.monotonic()
    config.validate()
    check_output_folder(Path(config.output), overwrite=config.overwrite, inputs=config.input_paths())
    precision = resolve_precision(config.precision)
    accelerator, accumulation = build_accelerator(config, precision)
    try:
        set_seed(config.seed)
        session = prepare_session(config, accelerator, precision, accumulation)
        progress = resume_or_start(session)
        if config.tensorboard:
            accelerator.init_trackers("dpvr-finetune", config=_scalar_settings(config))
        train(session, progress)

        accelerator.wait_for_everyone()
        state = accelerator.get_state_dict(session.module)
        report = None
        if accelerator.is_main_process:
            report = write_output(
                session, _strip_prefix(state, "model."), progress, seconds=time.monotonic() - started
            )
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return report or {}
    finally:
        release_accelerator_state(accelerator)


def prepare_session(config: FinetuneConfig, accelerator: Accelerator, precision: str, accumulation: int) -> Session:
    """Load models and data, choose trainable parameters, and prepare them with `accelerate`."""
    dtype = frozen_dtype(accelerator, precision)
    student, model_path = load_student(config.model, dtype, revision=config.revision, cache_dir=config.cache_dir)
    processor = load_processor(model_path)
    eos_token_ids, pad_token_id = special_token_ids(model_path, processor)

    teacher = None
    if config.resolved_objective == "distill":
        teacher = load_teacher(config.teacher, dtype, revision=config.revision, cache_dir=config.cache_dir)
        check_teacher(student, teacher)
        teacher.to(accelerator.device)

    encoder = ConversationEncoder(
        processor, student.config, max_length=config.max_seq_length, eos_token_ids=eos_token_ids
    )
    dataset, data_stats = build_dataset(config, encoder)

    trainable_report, lora_config = select_trainable(student, config.selection())
    logger.info("%s", trainable_report.format())
    upcast_trainable(student)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    student.train()

    parameters = [parameter for parameter in student.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    sampler = EpochSampler(len(dataset), seed=config.seed, shuffle=config.shuffle)
    loader = DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=keep_samples, num_workers=config.num_workers
    )
    module, optimizer, loader = accelerator.prepare(
        PositionLogits(student), optimizer, loader, device_placement=[True, True, False]
    )
    register_trainable_state_hooks(accelerator)

    updates_per_epoch = math.ceil(len(loader) / accumulation)
    total_steps = config.max_steps or math.ceil(config.epochs * updates_per_epoch)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    logger.info(
        "%d samples, %d micro-batches of %d per process per epoch, %d accumulation step(s), %d process(es): "
        "%d optimizer steps",
        len(dataset), len(loader), config.batch_size, accumulation, accelerator.num_processes, total_steps,
    )
    return Session(
        config=config,
        accelerator=accelerator,
        precision=precision,
        model_path=model_path,
        student=student,
        module=module,
        teacher=teacher,
        teacher_logits=PositionLogits(teacher) if teacher is not None else None,
        optimizer=optimizer,
        scheduler=scheduler,
        dataloader=loader,
        sampler=sampler,
        accumulation=accumulation,
        updates_per_epoch=updates_per_epoch,
        total_steps=total_steps,
        pad_token_id=pad_token_id,
        eos_token_ids=eos_token_ids,
        trainable_report=trainable_report,
        lora_config=lora_config,
        data_stats=data_stats,
    )


def resume_or_start(session: Session) -> Progress:
    """Load the newest checkpoint when resuming; otherwise reject a folder that already has checkpoints."""
    config, accelerator = session.config, session.accelerator
    folder = config.checkpoint_folder
    checkpoints = list_checkpoints(folder)
    fingerprint = config.fingerprint(accelerator.num_processes)

    if not config.resume:
        if checkpoints and not config.overwrite:
            raise InvalidInputError(
                f"Checkpoint folder {folder} already contains {len(checkpoints)} checkpoint(s). Pass --resume to "
                "continue that run, --overwrite to start over, or --checkpoint-dir to use another folder."
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            clear_checkpoints(folder)
        accelerator.wait_for_everyone()
        return Progress()

    if not checkpoints:
        logger.warning("--resume: no checkpoint in %s yet, so training starts at step 0", folder)
        return Progress()

    step, path = checkpoints[-1]
    state = read_checkpoint_state(path)
    check_fingerprint(state["fingerprint"], fingerprint, path)
    accelerator.load_state(str(path))
    progress = Progress(
        step=step,
        scheduler_steps=state["scheduler_steps"],
        losses=[tuple(item) for item in state["losses"]],
        window=list(state["window"]),
    )
    with warnings.catch_warnings():
        # The scheduler is rebuilt by stepping it again; the optimizer state already came from the checkpoint.
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(progress.scheduler_steps):
            session.scheduler.step()
    logger.info("Resumed from %s at step %d of %d", path, step, session.total_steps)
    return progress


def train(session: Session, progress: Progress) -> None:
    """Run optimizer steps until `total_steps`, logging and checkpointing on the way."""
    config, accelerator = session.config, session.accelerator
    bar = tqdm(
        total=session.total_steps,
        initial=progress.step,
        desc="Fine-tuning",
        unit="step",
        disable=not (config.show_progress and accelerator.is_local_main_process),
    )
    clock = _Clock(progress.step)
    epoch = progress.step // session.updates_per_epoch
    while progress.step < session.total_steps:
        session.sampler.use_epoch(epoch)
        loader = session.dataloader
        done_in_epoch = progress.step - epoch * session.updates_per_epoch
        if done_in_epoch > 0:
            loader = accelerator.skip_first_batches(loader, done_in_epoch * session.accumulation)
        _train_epoch(session, progress, loader, bar, clock)
        epoch += 1
    bar.close()


def _train_epoch(session: Session, progress: Progress, loader, bar, clock: "_Clock") -> None:
    config, accelerator = session.config, session.accelerator
    micro_losses: list[torch.Tensor] = []
    for samples in loader:
        with accelerator.accumulate(session.module):
            loss = compute_loss(session, samples)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(session.module.parameters(), config.max_grad_norm)
            session.optimizer.step()
            session.optimizer.zero_grad(set_to_none=True)
        micro_losses.append(loss.detach().float())
        if not accelerator.sync_gradients:
            continue

        if not accelerator.optimizer_step_was_skipped:
            session.scheduler.step()
            progress.scheduler_steps += 1
        progress.step += 1
        step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
        micro_losses = []
        if not math.isfinite(step_loss):
            raise VerificationError(
                f"Training diverged: the loss at step {progress.step} is {step_loss}. Lower --learning-rate, use "
                "--precision bf16 or fp32 instead of fp16, or check the data."
            )
        _report_step(session, progress, step_loss, bar, clock)
        if progress.step % config.save_steps == 0 and progress.step < session.total_steps:
            _save(session, progress)
        if progress.step >= session.total_steps:
            break


def compute_loss(session: Session, samples: list[EncodedSample]) -> torch.Tensor:
    """Compute the objective's loss on one micro-batch of samples."""
    device = session.accelerator.device
    if session.config.resolved_objective == "distill":
        samples = [_with_teacher_answer(session, sample) for sample in samples]
    batch = collate_samples(samples, session.pad_token_id)
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    pixel_values = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None

    if session.config.resolved_objective == "sft":
        positions, targets = supervised_targets(batch["labels"])
        logits = session.module(input_ids, attention_mask, pixel_values, positions.to(device))
        return supervised_loss(logits, targets.to(device))

    positions = distillation_positions(batch["loss_mask"], batch["attention_mask"]).to(device)
    student_logits = session.module(input_ids, attention_mask, pixel_values, positions)
    teacher_logits = _teacher_logits(session, batch, input_ids, attention_mask, pixel_values, positions)
    return distillation_kl(student_logits, teacher_logits.to(student_logits.dtype), session.config.temperature)


def _with_teacher_answer(session: Session, sample: EncodedSample) -> EncodedSample:
    """Return the prompt sample extended by the teacher's greedy output, generated once per sample."""
    if session.config.teacher_answer_tokens == 0:
        return sample
    if sample.index not in session.answers:
        session.answers[sample.index] = complete_with_teacher(
            session.teacher,
            sample,
            max_new_tokens=session.config.teacher_answer_tokens,
            max_length=session.config.max_seq_length,
            pad_token_id=session.pad_token_id,
            eos_token_ids=session.eos_token_ids,
        )
    return session.answers[sample.index]


@torch.no_grad()
def _teacher_logits(session: Session, batch, input_ids, attention_mask, pixel_values, positions) -> torch.Tensor:
    if not session.config.teacher_cache:
        return session.teacher_logits(input_ids, attention_mask, pixel_values, positions)

    indices = batch["indices"].tolist()
    if any(index not in session.teacher_cache for index in indices):
        logits = session.teacher_logits(input_ids, attention_mask, pixel_values, positions)
        counts = positions.sum(dim=1).tolist()
        for index, row_logits in zip(indices, torch.split(logits, counts)):
            session.teacher_cache[index] = row_logits.cpu()
    return torch.cat([session.teacher_cache[index] for index in indices]).to(positions.device)


def _save(session: Session, progress: Progress) -> None:
    state = {
        "step": progress.step,
        "scheduler_steps": progress.scheduler_steps,
        "total_steps": session.total_steps,
        "losses": progress.losses,
        "window": progress.window,
        "fingerprint": session.config.fingerprint(session.accelerator.num_processes),
    }
    save_checkpoint(session.accelerator, session.config.checkpoint_folder, progress.step, state, session.config.save_total_limit)


class _Clock:
    """Seconds per step in this process's run, for the time-left estimate."""

    def __init__(self, first_step: int):
        self.first_step = first_step
        self.started = time.monotonic()

    def remaining(self, step: int, total: int) -> float:
        done = step - self.first_step
        if done <= 0:
            return float("nan")
        return (time.monotonic() - self.started) / done * (total - step)


def _report_step(session: Session, progress: Progress, loss: float, bar, clock: _Clock) -> None:
    config, accelerator = session.config, session.accelerator
    learning_rate = session.scheduler.get_last_lr()[0]
    progress.window.append(loss)
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}")
    if config.tensorboard:
        accelerator.log({"train/loss": loss, "train/learning_rate": learning_rate}, step=progress.step)
    if progress.step % config.logging_steps == 0 or progress.step == session.total_steps:
        mean = sum(progress.window) / len(progress.window)
        progress.losses.append((progress.step, round(mean, 6)))
        progress.window = []
        if accelerator.is_main_process:
            logger.info(
                "step %d/%d: loss %.4f, learning rate %.3g, about %s left",
                progress.step, session.total_steps, mean, learning_rate,
                _format_duration(clock.remaining(progress.step, session.total_steps)),
            )


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown time"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _scalar_settings(config: FinetuneConfig) -> dict:
    """Return the recipe settings as TensorBoard hyper-parameters, which must be numbers, strings or booleans."""
    values = {}
    for key, value in config.recipe_section().items():
        values[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return values


def _strip_prefix(state: dict, prefix: str) -> dict:
    return {key.removeprefix(prefix): tensor for key, tensor in state.items()}


__all__ = ["run_finetune", "prepare_session", "compute_loss", "Session", "Progress"]
