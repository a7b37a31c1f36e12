"""Measure a LLaVA or converted model on held-out visual questions, alone or against a reference model.

Each sample is the first human turn of a LLaVA conversation row (its images and question) and the
answer that follows it. Samples whose expected answer has at least `long_answer_tokens` tokens (20 by
default, with the model's tokenizer) form the "long" group, the others the "short" group, because
multi-token generation is where cutting visual depth hurts first.

Per group:

- `accuracy`: the share of greedy answers equal to the expected answer after `normalize_answer`.
- with a reference model, `answer_agreement`: the share of greedy answers equal, after normalisation,
  to the reference model's greedy answer.
- with a reference, `token_agreement` and `mean_kl`: on the prompt followed by the reference's greedy
  answer (teacher forcing), at each position that predicts an answer token (the last prompt position
  and every answer position but the last), the share of positions where both models' top-1 tokens
  agree, and the mean KL(reference || model) of the next-token distributions in nats. Both are averaged
  over positions, so long answers weigh by their length within their group.

The reference runs first over every sample and only its greedy tokens and the log-probabilities at
answer positions are kept, so the two models are never in memory together.
"""

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import InvalidInputError
from .generation import load_images, load_model_and_processor

logger = logging.getLogger(__name__)

LONG_ANSWER_TOKENS = 20
IMAGE_PLACEHOLDER = "<image>"
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    word: str(number)
    for number, word in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    )
}
GROUPS = ("short", "long")


@dataclass(frozen=True)
class EvalSample:
    """One held-out question: the user turn as chat-template items, its images and the expected answer."""

    sample_id: str
    content: tuple[dict, ...]
    image_paths: tuple[Path, ...]
    answer: str
    category: str | None = None

    @property
    def question(self) -> str:
        return " ".join(item["text"] for item in self.content if item["type"] == "text")


@dataclass
class ReferenceOutput:
    """The reference model's greedy answer to one sample and its log-probabilities at the answer positions."""

    answer_ids: list[int]
    text: str
    log_probs: torch.Tensor  # (answer tokens, vocabulary), float32 on the CPU


@dataclass
class SampleResult:
    """One model's answer to one sample, compared with the expected answer and the reference model's."""

    sample_id: str
    category: str | None
    group: str
    question: str
    expected: str
    prediction: str
    correct: bool
    reference_prediction: str | None = None
    agrees: bool | None = None
    positions: int = 0
    kl_sum: float = 0.0
    top1_matches: int = 0


@dataclass
class EvalRequest:
    """Settings of one `eval` run. `run_evaluation` validates them before it loads anything."""

    model: str
    data: Path
    reference: str | None = None
    image_folder: Path | None = None
    per_category: int | None = None
    max_samples: int | None = None
    long_answer_tokens: int = LONG_ANSWER_TOKENS
    max_new_tokens_short: int = 16
    max_new_tokens_long: int = 64
    dtype: str = "fp32"
    device: str = "auto"
    revision: str | None = None
    cache_dir: str | None = None

    def validate(self) -> None:
        for name in ("long_answer_tokens", "max_new_tokens_short", "max_new_tokens_long"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"Invalid {name}={getattr(self, name)}: it must be a positive integer.")
        for name in ("per_category", "max_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidInputError(f"Invalid {name}={value}: it must be a positive integer, or unset for all.")


@dataclass
class EvalResult:
    """The per-sample results of one model, with the settings and the time the run took."""

    model: str
    reference: str | None
    data: str
    samples: list[SampleResult]
    seconds: float
    settings: dict = field(default_factory=dict)
    # The reference model's own greedy answers, scored like MODEL's, when a reference was given.
    reference_samples: list[SampleResult] | None = None

    def summary(self) -> dict:
        """Return the metrics per group ("short", "long", "all"), the accuracy per category and, with a
        reference, the reference's accuracy per group and the share of it that MODEL keeps."""
        groups = {name: _group_metrics([item for item in self.samples if item.group == name]) for name in GROUPS}
        groups["all"] = _group_metrics(self.samples)
        categories = {}
        for category in sorted({item.category for item in self.samples if item.category is not None}):
            members = [item for item in self.samples if item.category == category]
            categories[category] = {"samples": len(members), "accuracy": _share(item.correct for item in members)}
        summary = {
            "model": self.model,
            "reference": self.reference,
            "data": self.data,
            "settings": self.settings,
            "seconds": self.seconds,
            "groups": groups,
            "categories": categories,
        }
        if self.reference_samples is not None:
            reference_accuracy = {
                name: _share(item.correct for item in self.reference_samples if name == "all" or item.group == name)
                for name in (*GROUPS, "all")
            }
            summary["reference_accuracy"] = reference_accuracy
            reference_overall = reference_accuracy["all"]
            summary["accuracy_kept"] = groups["all"]["accuracy"] / reference_overall if reference_overall else None
        return summary

    def to_dict(self) -> dict:
        """Return the summary plus every sample's answers."""
        return {**self.summary(), "per_sample": [asdict(item) for item in self.samples]}


# --------------------------------------------------------------------------- answers


def normalize_answer(text: str) -> str:
    """Lower-case, turn punctuation into spaces, drop articles and spell numbers zero to ten as digits."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(word, word) for word in words if word not in ARTICLES)


# --------------------------------------------------------------------------- data


def load_eval_samples(
    path: str | Path,
    image_folder: str | Path | None = None,
    *,
    per_category: int | None = None,
    max_samples: int | None = None,
) -> list[EvalSample]:
    """Read held-out samples from LLaVA conversation JSON: each row's first human turn and the answer after it.

    Rows are kept in file order. With `per_category`, only the first that many rows of each `category`
    (rows without one count as category None) are kept, and `max_samples` then caps the total. Image paths
    are relative to `image_folder` (default: the JSON file's folder) and must exist.
    """
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    rows = _read_rows(path)

    samples, per_category_seen = [], {}
    for position, row in enumerate(rows):
        sample = _parse_row(row, position, path, folder)
        seen = per_category_seen.get(sample.category, 0)
        if per_category is not None and seen >= per_category:
            continue
        per_category_seen[sample.category] = seen + 1
        samples.append(sample)
        if max_samples is not None and len(samples) >= max_samples:
            break

    if not samples:
        raise InvalidInputError(f"No samples in {path}: the file contains no rows. Pass a LLaVA conversation JSON file.")
    logger.info("Read %d held-out samples from %s", len(samples), path)
    return samples


def _read_rows(path: Path) -> list:
    if not path.is_file():
        raise InvalidInputError(f"Data file not found: {path}. Pass a LLaVA conversation JSON file with --data.")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"Invalid data file {path}: it is not JSON ({error}). Pass a LLaVA conversation JSON list.") from error
    if not isinstance(rows, list):
        raise InvalidInputError(
            f"Invalid data file {path}: expected a JSON list of rows, got {type(rows).__name__}. "
            "Pass a LLaVA conversation JSON list."
        )
    return rows


def _parse_row(row, position: int, path: Path, folder: Path) -> EvalSample:
    if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
        raise InvalidInputError(
            f"Invalid row {position} of {path}: expected an object with a `conversations` list. "
            "Use the LLaVA conversation format."
        )
    sample_id = str(row.get("id", position))
    question, answer = _first_exchange(row["conversations"], sample_id, path)

    names = row.get("image") or []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise InvalidInputError(f"Invalid row {sample_id!r} of {path}: `image` must be a path or a list of paths.")
    image_paths = tuple(folder / name for name in names)
    missing = [str(item) for item in image_paths if not item.is_file()]
    if missing:
        raise InvalidInputError(
            f"Image file not found for row {sample_id!r} of {path}: {missing[0]}. Pass --image-folder with the "
            "folder that the `image` paths are relative to."
        )

    content = _user_content(question, len(image_paths), sample_id, path)
    category = row.get("category")
    return EvalSample(sample_id, content, image_paths, answer, None if category is None else str(category))


def _first_exchange(turns: list, sample_id: str, path: Path) -> tuple[str, str]:
    for number in range(len(turns) - 1):
        first, second = turns[number], turns[number + 1]
        if not isinstance(first, dict) or not isinstance(second, dict):
            break
        if first.get("from") in HUMAN_ROLES and second.get("from") in ASSISTANT_ROLES:
            question, answer = first.get("value"), second.get("value")
            if isinstance(question, str) and isinstance(answer, str):
                return question, answer
    raise InvalidInputError(
        f"Invalid row {sample_id!r} of {path}: no human turn followed by a gpt turn with text values. "
        "Each row needs a question and its expected answer."
    )


def _user_content(question: str, num_images: int, sample_id: str, path: Path) -> tuple[dict, ...]:
    """Turn the question into chat-template items. Without placeholders the images go first, as in LLaVA."""
    if question.count(IMAGE_PLACEHOLDER) == 0:
        question = IMAGE_PLACEHOLDER * num_images + question
    elif question.count(IMAGE_PLACEHOLDER) != num_images:
        raise InvalidInputError(
            f"Invalid row {sample_id!r} of {path}: its question contains {question.count(IMAGE_PLACEHOLDER)} "
            f"{IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s). Use one placeholder per image."
        )

    content = []
    pieces = question.split(IMAGE_PLACEHOLDER)
    for number, piece in enumerate(pieces):
        # LLaVA separates a placeholder from the text with a newline, and the chat template adds its own.
        text = piece.removeprefix("\n") if number > 0 else piece
        is_last = number == len(pieces) - 1
        text = text if is_last else text.removesuffix("\n")
        if text:
            content.append({"type": "text", "text": text})
        if not is_last:
            content.append({"type": "image"})
    return tuple(content)


# --------------------------------------------------------------------------- model passes


def encode_prompt(processor, sample: EvalSample, device: torch.device, dtype: torch.dtype) -> dict:
    """Render the sample's user turn with the chat template and return the processor's tensors."""
    if getattr(processor, "chat_template", None) is None:
        raise InvalidInputError(
            "The model's processor has no chat template, so held-out questions cannot be rendered as prompts. "
            "Evaluate a model folder that contains its chat template."
        )
    messages = [{"role": "user", "content": list(sample.content)}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = load_images(sample.image_paths, owner=f"of sample {sample.sample_id!r}")
    inputs = dict(processor(images=images or None, text=text, return_tensors="pt"))
    inputs = {name: value.to(device) for name, value in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


@torch.no_grad()
def greedy_answer(model, inputs: dict, max_new_tokens: int) -> list[int]:
    """Return the greedy continuation's token ids, up to and including the end-of-turn token.

    The image token is suppressed: generated text never holds an image, and an image token in the
    answer would make the teacher-forced pass expect image features for it.
    """
    suppress = [model.config.image_token_id] if getattr(model.config, "image_token_id", None) is not None else None
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=suppress)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def answer_log_probs(model, inputs: dict, answer_ids: list[int]) -> torch.Tensor:
    """Return log-probabilities (answer tokens, vocabulary) at the positions that predict each answer token."""
    prompt_length = inputs["input_ids"].shape[1]
    answer = torch.tensor([answer_ids], dtype=torch.long, device=inputs["input_ids"].device)
    forced = dict(inputs)
    forced["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
    if "attention_mask" in inputs:
        forced["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1)
    logits = model(**forced).logits[0, prompt_length - 1 : prompt_length - 1 + len(answer_ids)]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def answer_group(processor, sample: EvalSample, long_answer_tokens: int) -> str:
    """Return "long" when the expected answer has at least `long_answer_tokens` tokens, else "short"."""
    tokens = processor.tokenizer(sample.answer, add_special_tokens=False).input_ids
    return "long" if len(tokens) >= long_answer_tokens else "short"


def reference_outputs(
    model, processor, samples: list[EvalSample], request: EvalRequest, *, show_progress: bool = False
) -> list[ReferenceOutput]:
    """Run the reference model over every sample: its greedy answer and log-probabilities along it."""
    outputs = []
    device, dtype = model.device, model.dtype
    for sample in tqdm(samples, desc="Reference answers", disable=not show_progress):
        inputs = encode_prompt(processor, sample, device, dtype)
        limit = _token_limit(processor, sample, request)
        answer_ids = greedy_answer(model, inputs, limit)
        text = processor.decode(answer_ids, skip_special_tokens=True).strip()
        outputs.append(ReferenceOutput(answer_ids, text, answer_log_probs(model, inputs, answer_ids)))
    return outputs


def evaluate_model(
    model,
    processor,
    samples: list[EvalSample],
    request: EvalRequest,
    *,
    references: list[ReferenceOutput] | None = None,
    show_progress: bool = False,
) -> list[SampleResult]:
    """Answer every sample greedily and compare with the expected answers and, if given, the reference's."""
    if references is not None and len(references) != len(samples):
        raise InvalidInputError(
            f"Got {len(references)} reference outputs for {len(samples)} samples: compute them on the same samples."
        )

    results = []
    device, dtype = model.device, model.dtype
    for index, sample in enumerate(tqdm(samples, desc="Answers", disable=not show_progress)):
        inputs = encode_prompt(processor, sample, device, dtype)
        answer_ids = greedy_answer(model, inputs, _token_limit(processor, sample, request))
        prediction = processor.decode(answer_ids, skip_special_tokens=True).strip()
        result = SampleResult(
            sample_id=sample.sample_id,
            category=sample.category,
            group=answer_group(processor, sample, request.long_answer_tokens),
            question=sample.question,
            expected=sample.answer,
            prediction=prediction,
            correct=normalize_answer(prediction) == normalize_answer(sample.answer),
        )
        if references is not None:
            _compare_with_reference(result, model, inputs, references[index])
        results.append(result)
    return results


def reference_results(
    processor, samples: list[EvalSample], references: list[ReferenceOutput], request: EvalRequest
) -> list[SampleResult]:
    """Score the reference model's own greedy answers, so that it need not answer a second time."""
    results = []
    for sample, reference in zip(samples, references, strict=True):
        positions = len(reference.answer_ids)
        results.append(SampleResult(
            sample_id=sample.sample_id,
            category=sample.category,
            group=answer_group(processor, sample, request.long_answer_tokens),
            question=sample.question,
            expected=sample.answer,
            prediction=reference.text,
            correct=normalize_answer(reference.text) == normalize_answer(sample.answer),
            reference_prediction=reference.text,
            agrees=True,
            positions=positions,
            kl_sum=0.0,
            top1_matches=positions,
        ))
    return results


def _compare_with_reference(result: SampleResult, model, inputs: dict, reference: ReferenceOutput) -> None:
    result.reference_prediction = reference.text
    result.agrees = normalize_answer(result.prediction) == normalize_answer(reference.text)
    if not reference.answer_ids:
        return

    log_probs = answer_log_probs(model, inputs, reference.answer_ids)
    reference_probs = reference.log_probs.exp()
    kl = (reference_probs * (reference.log_probs - log_probs)).sum(dim=-1)
    result.positions = len(reference.answer_ids)
    result.kl_sum = float(kl.sum())
    result.top1_matches = int((log_probs.argmax(-1) == reference.log_probs.argmax(-1)).sum())


def _token_limit(processor, sample: EvalSample, request: EvalRequest) -> int:
    if answer_group(processor, sample, request.long_answer_tokens) == "long":
        return request.max_new_tokens_long
    return request.max_new_tokens_short


def _share(values) -> float | None:
    values = list(values)
    return sum(bool(value) for value in values) / len(values) if values else None


def _group_metrics(results: list[SampleResult]) -> dict:
    metrics = {"samples": len(results), "accuracy": _share(item.correct for item in results)}
    compared = [item for item in results if item.agrees is not None]
    if compared:
        positions = sum(item.positions for item in compared)
        metrics["answer_agreement"] = _share(item.agrees for item in compared)
        metrics["positions"] = positions
        metrics["token_agreement"] = sum(item.top1_matches for item in compared) / positions if positions else None
        metrics["mean_kl"] = sum(item.kl_sum for item in compared) / positions if positions else None
    return metrics


# --------------------------------------------------------------------------- the whole run


def run_evaluation(request: EvalRequest, *, show_progress: bool = False) -> EvalResult:
    """Load the data, run the reference model (if any) and then MODEL, and collect the results."""
    request.validate()
    samples = load_eval_samples(
        request.data, request.image_folder, per_category=request.per_category, max_samples=request.max_samples
    )
    started = time.perf_counter()
    load = {"dtype": request.dtype, "device": request.device, "revision": request.revision,
            "cache_dir": request.cache_dir}

    references, reference_samples = None, None
    if request.reference is not None:
        logger.info("Answering %d samples with the reference %s", len(samples), request.reference)
        reference, reference_processor = load_model_and_processor(request.reference, **load)
        references = reference_outputs(reference, reference_processor, samples, request, show_progress=show_progress)
        reference_samples = reference_results(reference_processor, samples, references, request)
        del reference

    logger.info("Answering %d samples with %s", len(samples), request.model)
    model, processor = load_model_and_processor(request.model, **load)
    results = evaluate_model(model, processor, samples, request, references=references, show_progress=show_progress)

    settings = {
        "long_answer_tokens": request.long_answer_tokens,
        "max_new_tokens_short": request.max_new_tokens_short,
        "max_new_tokens_long": request.max_new_tokens_long,
        "dtype": request.dtype,
        "per_category": request.per_category,
        "max_samples": request.max_samples,
    }
    return EvalResult(request.model, request.reference, str(request.data), results,
                      time.perf_counter() - started, settings, reference_samples)


def format_eval_result(result: EvalResult) -> str:
    """Format the summary as a small table: one row per answer group, then accuracy per category."""
    summary = result.summary()
    with_reference = result.reference is not None
    header = f"{'group':<6} {'samples':>7} {'accuracy':>8}"
    if with_reference:
        header += f" {'agree':>6} {'top-1':>6} {'KL':>8}"
    lines = [f"Model: {result.model}"]
    if with_reference:
        lines.append(f"Reference: {result.reference}")
    lines += [header]

    for name in (*GROUPS, "all"):
        metrics = summary["groups"][name]
        line = f"{name:<6} {metrics['samples']:>7} {_percent(metrics['accuracy']):>8}"
        if with_reference:
            kl = metrics.get("mean_kl")
            line += (f" {_percent(metrics.get('answer_agreement')):>6} {_percent(metrics.get('token_agreement')):>6}"
                     f" {'-' if kl is None else f'{kl:.4f}':>8}")
        lines.append(line)

    if "reference_accuracy" in summary:
        reference_accuracy = summary["reference_accuracy"]
        lines.append("reference accuracy: " + ", ".join(
            f"{name} {_percent(reference_accuracy[name])}" for name in (*GROUPS, "all")
        ) + f"; kept {_percent(summary['accuracy_kept'])} of it")

    if summary["categories"]:
        lines.append("")
        lines.append("Accuracy per category: " + ", ".join(
            f"{name} {_percent(metrics['accuracy'])} ({metrics['samples']})"
            for name, metrics in summary["categories"].items()))
    lines.append(f"Time: {result.seconds:.1f} s")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
