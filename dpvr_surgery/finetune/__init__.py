"""Fine-tuning of converted dual-path models: the side branch by default, on `accelerate`.

`run_finetune(FinetuneConfig(...))` is what `dpvr-surgery finetune` calls.
"""

from .collate import collate_samples
from .config import FinetuneConfig
from .data import (
    GENERIC_PROMPTS,
    IGNORE_INDEX,
    ConversationDataset,
    ConversationEncoder,
    DistillationDataset,
    EncodedSample,
    PromptItem,
    builtin_images,
    distillation_items,
    load_conversations,
)
from .evaluate import TeacherReference, compare_with_teacher, teacher_references
from .objectives import PositionLogits, distillation_kl, supervised_loss, supervised_targets
from .saving import load_finetuned
from .setup import enable_gradient_checkpointing
from .trainable import TrainableReport, TrainableSelection, merge_lora_state, select_trainable
from .trainer import run_finetune

__all__ = [
    "GENERIC_PROMPTS",
    "IGNORE_INDEX",
    "ConversationDataset",
    "ConversationEncoder",
    "DistillationDataset",
    "EncodedSample",
    "FinetuneConfig",
    "PositionLogits",
    "PromptItem",
    "TeacherReference",
    "TrainableReport",
    "TrainableSelection",
    "builtin_images",
    "collate_samples",
    "compare_with_teacher",
    "distillation_items",
    "distillation_kl",
    "enable_gradient_checkpointing",
    "load_conversations",
    "load_finetuned",
    "merge_lora_state",
    "run_finetune",
    "select_trainable",
    "supervised_loss",
    "supervised_targets",
    "teacher_references",
]
