"""Settings of one fine-tuning run, their validation, and the recipe keys that set them."""

import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InvalidInputError
from .trainable import FUSION_MODES, TrainableSelection

OBJECTIVES = ("auto", "sft", "distill")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULERS = ("cosine", "linear", "constant_with_warmup")
SAVE_DTYPES = ("auto", "bf16", "fp16", "fp32")

# Settings that change the trained weights; a checkpoint only resumes a run whose values match.
TRAJECTORY_KEYS = (
    "model", "data", "image_folder", "teacher", "objective", "prompts", "fusion", "train_side_branch",
    "train_projector", "lora_rank", "lora_alpha", "lora_dropout", "epochs", "max_steps", "learning_rate",
    "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "batch_size", "gradient_accumulation_steps",
    "max_seq_length", "precision", "gradient_checkpointing", "temperature", "teacher_answer_tokens", "max_samples",
    "shuffle", "seed",
)


@dataclass
class FinetuneConfig:
    """Everything `run_finetune` needs; the CLI fills it from flags and the recipe's `finetune` section.

    `model` is a converted (dual-path) folder or Hub id. The objective "auto" is distillation when a
    `teacher` is given and supervised fine-tuning otherwise. `data` is LLaVA conversation JSON for
    supervised fine-tuning. For distillation it is LLaVA JSON, a folder of images, or None for the
    photos bundled with scikit-image.
    """

    model: str
    output: Path
    data: str | None = None
    image_folder: str | None = None
    teacher: str | None = None
    objective: str = "auto"
    prompts: list[str] | None = None

    train_side_branch: bool = True
    fusion: str = "none"
    train_projector: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05

    epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float = 2e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 1
    gradient_accumulation_steps: int | None = None
    global_batch_size: int | None = None
    max_seq_length: int = 2048
    precision: str = "auto"
    gradient_checkpointing: bool = False
    temperature: float = 1.0
    teacher_answer_tokens: int = 32
    teacher_cache: bool = False
    max_samples: int | None = None
    shuffle: bool = True
    num_workers: int = 0

    checkpoint_dir: Path | None = None
    save_steps: int = 500
    save_total_limit: int | None = 2
    resume: bool = False
    logging_steps: int = 10
    tensorboard: bool = False

    dtype: str = "auto"
    max_shard_size: str | int = "5GB"
    save_adapter: bool = False
    overwrite: bool = False
    seed: int = 0
    show_progress: bool = True
    revision: str | None = None
    cache_dir: str | None = None
    command_line: str = field(default_factory=lambda: shlex.join(["dpvr-surgery", *sys.argv[1:]]))

    @property
    def resolved_objective(self) -> str:
        if self.objective == "auto":
            return "distill" if self.teacher else "sft"
        return self.objective

    @property
    def checkpoint_folder(self) -> Path:
        """Where checkpoints go: `checkpoint_dir`, or a folder named after OUT with `-checkpoints` appended."""
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir)
        output = Path(self.output)
        return output.parent / f"{output.name}-checkpoints"

    def selection(self) -> TrainableSelection:
        return TrainableSelection(
            side_branch=self.train_side_branch,
            fusion=self.fusion,
            projector=self.train_projector,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
        )

    def input_paths(self) -> list[str | None]:
        """Return the model, teacher, data and image folder settings, the paths that OUT must not replace."""
        return [self.model, self.teacher, self.data, self.image_folder]

    def validate(self) -> None:
        """Raise InvalidInputError for inconsistent or out-of-range settings, before anything loads."""
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _check_choice("dtype", self.dtype, SAVE_DTYPES)
        _check_choice("fusion", self.fusion, FUSION_MODES)
        self.selection().validate()

        if self.resolved_objective == "distill" and not self.teacher:
            raise InvalidInputError(
                "Distillation needs the source model: pass --teacher SOURCE (the LLaVA model that was converted)."
            )
        if self.resolved_objective == "sft" and not self.data:
            raise InvalidInputError(
                "Supervised fine-tuning needs --data: a LLaVA conversation JSON file (such as "
                "llava_v1_5_mix665k.json) and --image-folder with its images. Without such data, distil from the "
                "source model with --teacher SOURCE."
            )
        if self.resolved_objective == "sft" and self.teacher:
            raise InvalidInputError(
                "--teacher is set but the objective is sft; drop --teacher, or use --objective distill."
            )

        _check_positive("batch_size", self.batch_size)
        _check_positive("max_seq_length", self.max_seq_length)
        _check_positive("save_steps", self.save_steps)
        _check_positive("logging_steps", self.logging_steps)
        for name in ("gradient_accumulation_steps", "global_batch_size", "max_steps", "max_samples", "save_total_limit"):
            value = getattr(self, name)
            if value is not None:
                _check_positive(name, value)
        if self.max_steps is None and not self.epochs > 0:
            raise InvalidInputError(f"Invalid epochs {self.epochs}: it must be positive, or set max_steps.")
        if not self.learning_rate > 0:
            raise InvalidInputError(f"Invalid learning_rate {self.learning_rate}: it must be positive, such as 2e-5.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise InvalidInputError(f"Invalid warmup_ratio {self.warmup_ratio}: it must be in [0, 1), such as 0.03.")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise InvalidInputError(
                f"Invalid weight_decay {self.weight_decay} or max_grad_norm {self.max_grad_norm}: they must not be "
                "negative (max_grad_norm 0 turns clipping off)."
            )
        if not self.temperature > 0:
            raise InvalidInputError(f"Invalid temperature {self.temperature}: it must be positive, such as 1.0.")
        if self.teacher_answer_tokens < 0:
            raise InvalidInputError(
                f"Invalid teacher_answer_tokens {self.teacher_answer_tokens}: it must be 0 (prompts only) or more."
            )

    def accumulation_steps(self, num_processes: int) -> int:
        """Micro-batches per optimizer step, from `gradient_accumulation_steps` or `global_batch_size`."""
        explicit = self.gradient_accumulation_steps
        if self.global_batch_size is None:
            return explicit or 1
        per_step = self.batch_size * num_processes
        if self.global_batch_size % per_step != 0:
            raise InvalidInputError(
                f"Invalid global_batch_size {self.global_batch_size}: it must be a multiple of batch_size x processes "
                f"= {self.batch_size} x {num_processes} = {per_step}. Change --batch-size or --global-batch-size."
            )
        derived = self.global_batch_size // per_step
        if explicit is not None and explicit != derived:
            raise InvalidInputError(
                f"global_batch_size {self.global_batch_size} with batch_size {self.batch_size} on {num_processes} "
                f"process(es) needs {derived} accumulation steps, but gradient_accumulation_steps is {explicit}. "
                "Set only one of them."
            )
        return derived

    def fingerprint(self, num_processes: int) -> dict:
        """Return the settings that shape the trained weights, to check that a resumed run matches its checkpoint."""
        values = asdict(self)
        values["gradient_accumulation_steps"] = self.accumulation_steps(num_processes)
        values["objective"] = self.resolved_objective
        fingerprint = {key: _plain(values[key]) for key in TRAJECTORY_KEYS}
        fingerprint["num_processes"] = num_processes
        return fingerprint

    def recipe_section(self) -> dict:
        """Return the resolved settings under the key names of the recipe's `finetune` section."""
        values = asdict(self)
        section = {key: _plain(values[key]) for key in RECIPE_KEYS if key in values}
        return section


# Keys of the recipe's `finetune` section: every setting except the per-invocation ones (output folder,
# --resume, --overwrite, progress display, command line).
RECIPE_KEYS = (
    "data", "image_folder", "teacher", "objective", "prompts", "train_side_branch", "fusion", "train_projector",
    "lora_rank", "lora_alpha", "lora_dropout", "epochs", "max_steps", "learning_rate", "lr_scheduler", "warmup_ratio",
    "weight_decay", "max_grad_norm", "batch_size", "gradient_accumulation_steps", "global_batch_size",
    "max_seq_length", "precision", "gradient_checkpointing", "temperature", "teacher_answer_tokens", "teacher_cache",
    "max_samples", "shuffle", "num_workers", "checkpoint_dir", "save_steps", "save_total_limit", "logging_steps",
    "tensorboard", "dtype", "max_shard_size", "save_adapter", "seed",
)


def _plain(value):
    return str(value) if isinstance(value, Path) else value


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidInputError(f"Invalid {name} {value!r}: choose one of {', '.join(choices)}.")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"Invalid {name} {value!r}: it must be a positive integer.")
