"""Measure how closely a converted model follows its source on image prompts (before and after fine-tuning)."""

from dataclasses import dataclass

import torch
from torch import nn

from .collate import collate_samples
from .data import EncodedSample
from .objectives import PositionLogits, complete_with_teacher, distillation_positions, kl_per_position


@dataclass
class TeacherReference:
    """The source model's output for one prompt: the prompt with its greedy answer, and logits there."""

    sample: EncodedSample
    completed: EncodedSample
    logits: torch.Tensor

    @property
    def answer(self) -> list[int]:
        return self.completed.input_ids[self.sample.input_ids.shape[0] :].tolist()


@torch.no_grad()
def teacher_references(
    teacher: nn.Module,
    samples: list[EncodedSample],
    *,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    max_length: int = 4096,
) -> list[TeacherReference]:
    """Generate the teacher's greedy answer to each prompt and its logits at the compared positions.

    The compared positions are the text positions after the first image token, over the prompt and
    the answer. Computing this once lets several students be compared against the same reference.
    """
    teacher.eval()
    head = PositionLogits(teacher)
    references = []
    for sample in samples:
        completed = complete_with_teacher(
            teacher, sample, max_new_tokens=max_new_tokens, max_length=max_length, pad_token_id=pad_token_id,
            eos_token_ids=eos_token_ids,
        )
        logits = head(*_model_inputs(completed, pad_token_id, _device(teacher)))
        references.append(TeacherReference(sample, completed, logits.float().cpu()))
    return references


@torch.no_grad()
def compare_with_teacher(
    student: nn.Module,
    references: list[TeacherReference],
    *,
    eos_token_ids: list[int],
    pad_token_id: int,
    max_length: int = 4096,
) -> dict:
    """Compare next-token distributions and greedy answers of `student` with the teacher's references.

    On each prompt followed by the teacher's answer (teacher forcing), the KL(teacher || student) and
    the top-1 agreement are computed at the text positions after the first image token. The student
    also answers each prompt greedily, with as many new tokens as the teacher's answer may have.
    The returned dict contains the mean KL over all compared positions (nats) and the top-1 agreement.
    It also contains the mean share of each teacher answer that the student reproduces before its first
    differing token, the share of identical answers, and per-sample details.
    """
    student.eval()
    head = PositionLogits(student)
    kl_values, top1_matches, prefix_shares, exact, details = [], [], [], 0, []
    for reference in references:
        budget = max(len(reference.answer), 1)
        student_run = complete_with_teacher(
            student, reference.sample, max_new_tokens=budget, max_length=max_length, pad_token_id=pad_token_id,
            eos_token_ids=eos_token_ids,
        )
        student_answer = student_run.input_ids[reference.sample.input_ids.shape[0] :].tolist()
        student_logits = head(*_model_inputs(reference.completed, pad_token_id, _device(student))).float().cpu()
        kl = kl_per_position(student_logits, reference.logits)
        matches = student_logits.argmax(-1) == reference.logits.argmax(-1)

        teacher_answer = reference.answer
        share = _common_prefix(teacher_answer, student_answer) / len(teacher_answer) if teacher_answer else 1.0
        kl_values.append(kl)
        top1_matches.append(matches)
        prefix_shares.append(share)
        exact += teacher_answer == student_answer
        details.append({
            "row_id": reference.sample.row_id,
            "mean_kl": float(kl.mean()),
            "top1_agreement": float(matches.float().mean()),
            "answer_prefix_share": share,
            "teacher_answer_tokens": teacher_answer,
            "student_answer_tokens": student_answer,
        })

    all_kl = torch.cat(kl_values)
    return {
        "samples": len(references),
        "positions": int(all_kl.numel()),
        "mean_kl": float(all_kl.mean()),
        "top1_agreement": float(torch.cat(top1_matches).float().mean()),
        "answer_prefix_share": sum(prefix_shares) / len(prefix_shares),
        "exact_answers": exact / len(references),
        "per_sample": details,
    }


def _model_inputs(sample: EncodedSample, pad_token_id: int, device: torch.device) -> tuple:
    batch = collate_samples([sample], pad_token_id)
    positions = distillation_positions(batch["loss_mask"], batch["attention_mask"])
    pixel_values = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None
    return batch["input_ids"].to(device), batch["attention_mask"].to(device), pixel_values, positions.to(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _common_prefix(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length
