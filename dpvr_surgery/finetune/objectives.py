"""Training objectives: next-token cross-entropy on assistant tokens, and KL(teacher || student) distillation.

Both objectives need logits only at a few positions (assistant tokens, or text after the image), so
the language-model head runs on those positions alone. With 576 image tokens and a 32k vocabulary,
that saves most of the head's compute and memory.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX, EncodedSample


class PositionLogits(nn.Module):
    """A LLaVA or dual-path model that returns next-token logits (n, vocab) at the selected positions only.

    This is the module that `accelerate` prepares, so distributed wrappers see a forward call.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.model.model.vision_tower.dtype)
        outputs = self.model.model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=False
        )
        hidden_states = outputs.last_hidden_state[positions]
        return self.model.lm_head(hidden_states)


def supervised_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the positions (b, t) whose next token is a label, and those labels (n,), in row-major order."""
    next_labels = labels[:, 1:]
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = next_labels != IGNORE_INDEX
    return positions, next_labels[next_labels != IGNORE_INDEX]


def distillation_positions(loss_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Return the positions (b, t) where student and teacher distributions are compared."""
    return loss_mask & attention_mask.bool()


def supervised_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens of a micro-batch (0 when there are none)."""
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets, reduction="mean")


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean KL(teacher || student) per position between next-token distributions, scaled by temperature**2.

    The temperature softens both distributions; the T**2 factor keeps gradient sizes comparable across
    temperatures, as in Hinton et al. (2015), "Distilling the knowledge in a neural network".
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "both models must see the same inputs and share a vocabulary."
        )
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1)
    return per_position.mean() * temperature**2


def kl_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at each position (n,), in nats, at temperature 1."""
    student_log_probs = F.log_softmax(student_logits.float(), dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1)


@torch.no_grad()
def complete_with_teacher(
    teacher: nn.Module,
    sample: EncodedSample,
    *,
    max_new_tokens: int,
    max_length: int,
    pad_token_id: int,
    eos_token_ids: list[int],
) -> EncodedSample:
    """Append the teacher's greedy answer to a prompt sample; the answer positions join the loss mask.

    The answer stops after the first end-of-sequence token, after `max_new_tokens` tokens, or at
    `max_length` tokens in all.
    """
    budget = min(max_new_tokens, max_length - sample.input_ids.shape[0])
    if budget <= 0:
        return sample
    device = next(teacher.parameters()).device
    input_ids = sample.input_ids.unsqueeze(0).to(device)
    pixel_values = sample.pixel_values
    if pixel_values is not None:
        pixel_values = pixel_values.to(device, teacher.model.vision_tower.dtype)
    output = teacher.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=pixel_values,
        max_new_tokens=budget,
        do_sample=False,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_ids or None,
    )
    answer = output[0, input_ids.shape[1] :].cpu()
    answer = trim_answer(answer, eos_token_ids)

    loss_mask = sample.loss_mask if sample.loss_mask is not None else torch.zeros_like(sample.input_ids, dtype=torch.bool)
    return EncodedSample(
        input_ids=torch.cat([sample.input_ids, answer]),
        labels=None,
        loss_mask=torch.cat([loss_mask, torch.ones_like(answer, dtype=torch.bool)]),
        pixel_values=sample.pixel_values,
        index=sample.index,
        row_id=sample.row_id,
    )


def trim_answer(answer: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """Cut generated ids after the first end-of-sequence token (kept), dropping any padding after it."""
    for position, token in enumerate(answer.tolist()):
        if token in eos_token_ids:
            return answer[: position + 1]
    return answer
