"""Load what a fine-tuning run needs: the converted model, the teacher, the processor and the dataset."""

import importlib.util
import logging
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, ProjectConfiguration, parse_flag_from_env
from torch.utils.data import Dataset, Sampler
from transformers import AutoProcessor, GenerationConfig, LlavaForConditionalGeneration

from ..checkpoint import read_config, resolve_model_path
from ..errors import InvalidInputError
from ..modeling import DpvrLlavaConfig, DpvrLlavaForConditionalGeneration
from .config import FinetuneConfig
from .data import (
    GENERIC_PROMPTS,
    ConversationDataset,
    ConversationEncoder,
    DistillationDataset,
    distillation_items,
    load_conversations,
)

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def resolve_precision(precision: str) -> str:
    """Map "auto" to bf16 on a CUDA device that supports it, else fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def use_cpu() -> bool:
    """Return whether to run on CPUs: when ACCELERATE_USE_CPU is set or the machine has no accelerator.

    accelerate joins processes started by torchrun into one group of CPU processes (gloo) only when the
    first PartialState is created with cpu=True, so this must be decided before it exists.
    """
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available()


def build_accelerator(config: FinetuneConfig, precision: str) -> tuple[Accelerator, int]:
    """Create the Accelerator for this run; return it with the gradient accumulation steps."""
    cpu = use_cpu()
    state = PartialState(cpu=cpu)
    if precision == "fp16" and state.device.type == "cpu":
        # accelerate 1.16 turns fp16 autocast and the gradient scaler on only for accelerators, so on a CPU
        # the trained fp32 layers would meet fp16 activations without autocast.
        raise InvalidInputError(
            "--precision fp16 needs a GPU or another accelerator; on a CPU use --precision bf16 or fp32."
        )
    accumulation = config.accumulation_steps(state.num_processes)

    folder = config.checkpoint_folder
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=MIXED_PRECISION[precision],
        gradient_accumulation_steps=accumulation,
        log_with=tensorboard_tracker(config),
        project_config=ProjectConfiguration(project_dir=str(folder), logging_dir=str(folder / "runs")),
        # Supervised batches may contain no image, which leaves the side branch unused, and plain DDP would
        # raise. Distillation batches always contain images.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.resolved_objective == "sft")],
    )

    if not accelerator.is_local_main_process:
        logging.getLogger("dpvr_surgery").setLevel(logging.WARNING)
    return accelerator, accumulation


def tensorboard_tracker(config: FinetuneConfig) -> str | None:
    """Return accelerate's tracker name for `--tensorboard`, or None; raise if tensorboard is missing."""
    if not config.tensorboard:
        return None
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise InvalidInputError(
            "--tensorboard needs the tensorboard package, which is not installed. Install it with "
            "`pip install tensorboard`, or drop --tensorboard."
        )
    return "tensorboard"


def release_accelerator_state(accelerator: Accelerator) -> None:
    """Forget accelerate's process-wide settings after a single-process run, so that another run in the
    same Python process may use another precision or accumulation.
    """
    if accelerator.num_processes == 1:
        # NOTE: private accelerate 1.16 API, the one its own test utilities use between runs.
        AcceleratorState._reset_state()
        GradientState._reset_state()


def frozen_dtype(accelerator: Accelerator, precision: str) -> torch.dtype:
    """Return the dtype to load weights in: the compute dtype, except fp32 under FSDP.

    FSDP flattens the parameters of a wrapped module into one tensor of one dtype, and its own
    mixed-precision policy casts them for compute, so frozen and trained weights must share fp32 there.
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        return torch.float32
    return COMPUTE_DTYPES[precision]


def load_student(model: str, dtype: torch.dtype, *, revision=None, cache_dir=None) -> tuple[DpvrLlavaForConditionalGeneration, Path]:
    """Load a converted dual-path model in `dtype`, failing on any weight the folder lacks."""
    path = resolve_model_path(model, revision=revision, cache_dir=cache_dir)
    model_type = read_config(path).get("model_type")
    if model_type != DpvrLlavaConfig.model_type:
        raise InvalidInputError(
            f"{path} is not a converted dual-path model (model_type {model_type!r}, expected "
            f"{DpvrLlavaConfig.model_type!r}). Convert it first: dpvr-surgery convert {model} -o CONVERTED --split S."
        )
    student, info = DpvrLlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, output_loading_info=True)
    _check_loading_info(info, path, tied=student.config.tie_word_embeddings)
    return student, path


def load_teacher(model: str, dtype: torch.dtype, *, revision=None, cache_dir=None) -> LlavaForConditionalGeneration:
    """Load the source LLaVA model, frozen and in eval mode, failing on any weight the folder lacks."""
    path = resolve_model_path(model, revision=revision, cache_dir=cache_dir)
    model_type = read_config(path).get("model_type")
    if model_type != "llava":
        raise InvalidInputError(
            f"The teacher {path} has model_type {model_type!r}; it must be the original LLaVA model (model_type "
            "'llava') that the converted model was made from."
        )
    teacher, info = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, output_loading_info=True)
    _check_loading_info(info, path, tied=teacher.config.tie_word_embeddings)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()


def _check_loading_info(info: dict, path: Path, *, tied: bool) -> None:
    missing = [key for key in info.get("missing_keys", []) if not (tied and key == "lm_head.weight")]
    problems = {"missing": missing, "unexpected": list(info.get("unexpected_keys", []))}
    if problems["missing"] or problems["unexpected"]:
        raise InvalidInputError(
            f"The weights in {path} do not match its config: missing {problems['missing'][:5]}, unexpected "
            f"{problems['unexpected'][:5]}. transformers would initialise missing weights at random; re-create the "
            "folder (dpvr-surgery convert) or download it again."
        )


def check_teacher(student: DpvrLlavaForConditionalGeneration, teacher: LlavaForConditionalGeneration) -> None:
    """Raise InvalidInputError unless `teacher` is the model that `student` was converted from.

    Compares the settings that shape inputs and outputs, and the token embeddings, which conversion
    copies unchanged.
    """
    for name in ("image_token_id", "image_seq_length"):
        if getattr(student.config, name) != getattr(teacher.config, name):
            raise InvalidInputError(
                f"The teacher's {name} is {getattr(teacher.config, name)} but the converted model's is "
                f"{getattr(student.config, name)}; pass the LLaVA model that was converted as --teacher."
            )
    student_embeddings = student.get_input_embeddings().weight
    teacher_embeddings = teacher.get_input_embeddings().weight
    if student_embeddings.shape != teacher_embeddings.shape or not torch.equal(
        student_embeddings.detach().cpu(), teacher_embeddings.detach().cpu()
    ):
        raise InvalidInputError(
            "The teacher's token embeddings differ from the converted model's, so it is not the source model of "
            "this conversion. Pass the LLaVA model that was converted as --teacher, in the same dtype."
        )


def load_processor(path: Path):
    """Load the processor (tokenizer, image processor, chat template) of a model folder."""
    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"Cannot load the processor of {path}: {error}") from error


def special_token_ids(path: Path, processor) -> tuple[list[int], int]:
    """Return the end-of-sequence ids (from the generation config, else the tokenizer) and the padding id."""
    eos: list[int] = []
    try:
        generation = GenerationConfig.from_pretrained(path)
        value = generation.eos_token_id
        eos = [value] if isinstance(value, int) else list(value or [])
        pad = generation.pad_token_id
    except OSError:
        pad = None
    tokenizer = processor.tokenizer
    if not eos and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    if tokenizer.pad_token_id is not None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, int(pad)


def build_dataset(config: FinetuneConfig, encoder: ConversationEncoder) -> tuple[Dataset, dict]:
    """Build the dataset of the run's objective; return it with the counts from reading the data."""
    if config.resolved_objective == "sft":
        rows, stats = load_conversations(config.data, config.image_folder, max_rows=config.max_samples)
        return ConversationDataset(rows, encoder), {"objective": "sft", **stats.as_dict()}
    items, stats = distillation_items(
        config.data,
        image_folder=config.image_folder,
        prompts=config.prompts or GENERIC_PROMPTS,
        max_rows=config.max_samples,
    )
    return DistillationDataset(items, encoder), {"objective": "distill", **stats}


class EpochSampler(Sampler[int]):
    """Indices in a fixed order per epoch: a permutation seeded by `seed + epoch`, or 0..n-1 without shuffling.

    Every process computes the same order, which `accelerate` then splits into per-process batches, and
    a resumed run recomputes the order of its epoch. The epoch is set with `use_epoch`, a name that
    `accelerate` does not call, because its data loaders reset `set_epoch` to their own iteration count.
    """

    def __init__(self, size: int, *, seed: int, shuffle: bool = True):
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def keep_samples(samples: list) -> list:
    """Return the samples unbatched, because the training step appends the teacher's output before padding."""
    return samples


def enable_gradient_checkpointing(model: DpvrLlavaForConditionalGeneration) -> None:
    """Turn on non-reentrant activation checkpointing for every decoder layer, side branch included.

    Reentrant checkpointing returns no gradient to a checkpointed layer whose inputs do not require
    gradients, which is every trainable layer downstream of the frozen shared stack. transformers 5.25
    works around that by making the token embeddings require gradients, at the cost of a backward pass
    through every frozen layer. The non-reentrant variant needs no such hook, so it is removed.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    logger.info("Activation checkpointing on (non-reentrant)")
