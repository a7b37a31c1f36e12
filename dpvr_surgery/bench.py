"""Benchmark a LLaVA model against its dual-path conversion: FLOPs, prefill, decode, KV cache and memory.

Both models run in the same process on the same inputs, interleaved within every repeat so that
machine noise hits them alike, after warm-up runs. Reported times are medians with min and max.

What is measured, per model:

- prefill: one forward over the prompt with a fresh KV cache, `logits_to_keep=1`, as `generate()`
  runs it. The image features are computed beforehand and passed as `mm_encoder_outputs`, so this is
  the language-model prefill, the part that the conversion changes. The vision encoder is the same
  in both models and is timed once on its own, when its own token count matches the benchmark's;
- decode: the steps after prefill, one token each with the KV cache. The new tokens are fixed random
  ids (teacher forcing), so both models do exactly the same work;
- KV-cache bytes: summed over the key and value tensors in the cache after prefill, and
  compared with `dpvr_surgery.plan.prefill_cost`;
- peak memory: bytes allocated above the weights during one prefill and the decode steps. CUDA
  reports it from the allocator's statistics. On CPU it counts every tensor storage that an operator
  creates, so kernel scratch buffers that never become tensors are missed;
- decoding without a cache (full recomputation of the context at every step) for the converted model,
  at each length of `no_cache_tokens`: the fallback for a dual-path model whose cache cannot hold
  layers of different lengths. Each timed uncached step runs right after the cached step with the
  same context, in one pass per repeat.

Models come from a named shape with random weights (`build_shape_models`, the exact layer count,
head ratio and image-token count of a llava-hf config, optionally narrower), from checkpoints
(`load_bench_models`) or from a loaded model (`models_from_llava`).
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from . import __version__
from .checkpoint import read_config, resolve_model_path
from .errors import InvalidInputError, VerificationError
from .modeling import DpvrLlavaConfig, DpvrLlavaForConditionalGeneration
from .plan import PlanSettings, image_tokens_per_image, load_preset, prefill_cost
from .surgery import convert_model
from .timing import synchronize, time_prefill

logger = logging.getLogger(__name__)

REPORT_VERSION = 1
SOURCE_DESCRIPTIONS = {
    "shape": "random weights",
    "checkpoint": "converted in memory",
    "checkpoints": "converted folder",
    "in-memory": "converted in memory",
}
MIB = 1024**2
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
# Token ids below this are left out of random prompts: special tokens (unk, bos, eos) in Llama vocabularies.
FIRST_ORDINARY_TOKEN_ID = 3


# ---------------------------------------------------------------------------------------------------
# Settings and models


@dataclass
class BenchSettings:
    """Prompt shape, decode lengths and repetitions of one benchmark run.

    Every row of the batch contains `num_images` images of `image_tokens` tokens each (None: the
    model's own count) and `text_tokens` text tokens, with no padding. `new_tokens` decode steps
    follow the prefill (0 skips decoding). `no_cache_tokens` lists the numbers of new tokens at which
    the converted model also decodes without a cache. Of each such length, `no_cache_samples` steps
    are timed and the rest interpolated linearly in the context length (None times every step).
    """

    image_tokens: int | None = None
    num_images: int = 1
    text_tokens: int = 64
    batch_size: int = 1
    new_tokens: int = 64
    warmup: int = 1
    repeats: int = 5
    no_cache_tokens: tuple[int, ...] = (64, 256)
    no_cache_samples: int | None = 5
    no_cache_repeats: int = 3
    measure_memory: bool = True
    seed: int = 0

    def validate(self) -> None:
        """Raise `InvalidInputError` unless every count is in range."""
        minimums = {
            "num_images": 0,
            "text_tokens": 1,
            "batch_size": 1,
            "new_tokens": 0,
            "warmup": 0,
            "repeats": 1,
            "no_cache_repeats": 1,
        }
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if value < minimum:
                raise InvalidInputError(f"{name} {value} is invalid: it must be at least {minimum}; pass a larger value")
        if self.image_tokens is not None and self.image_tokens < 1:
            raise InvalidInputError(
                f"image_tokens {self.image_tokens} is invalid: it must be at least 1; pass a positive count or "
                "leave it unset to use the model's own count"
            )
        if any(length < 1 for length in self.no_cache_tokens):
            raise InvalidInputError(
                f"no_cache_tokens {list(self.no_cache_tokens)} is invalid: every length must be at least 1; "
                "pass positive lengths or none to skip decoding without a cache"
            )
        if self.no_cache_samples is not None and self.no_cache_samples < 2:
            raise InvalidInputError(
                f"no_cache_samples {self.no_cache_samples} is invalid: interpolation needs at least 2 timed steps "
                "per length; pass 2 or more, or time every step"
            )


@dataclass
class BenchModels:
    """An original LLaVA model and its dual-path conversion, on the same device and dtype."""

    original: LlavaForConditionalGeneration
    converted: DpvrLlavaForConditionalGeneration
    label: str
    source: str
    notes: dict = field(default_factory=dict)

    @property
    def plan(self) -> PlanSettings:
        config = self.converted.config
        return PlanSettings(
            config.split_layer, config.side_branch_depth, config.num_fusion_layers, config.side_branch_init
        )

    def as_dict(self) -> dict[str, torch.nn.Module]:
        return {"original": self.original, "converted": self.converted}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map a dtype name to a torch dtype; "auto" is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InvalidInputError(f"dtype {name!r} is invalid; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def shape_config(name: str, *, hidden_size: int | None = None) -> LlavaConfig:
    """Return the LlavaConfig of a preset, narrowed to `hidden_size` when given.

    Narrowing keeps the layer counts, the head dimension, the ratio of attention heads to key/value
    heads, the MLP expansion ratio, the vocabulary and the vision tower's image size and patch size
    (so the image-token count). The vision tower loses heads by the same factor, at least one kept.
    """
    config = LlavaConfig.from_dict(load_preset(name))
    text_config = config.text_config
    if hidden_size is None or hidden_size == text_config.hidden_size:
        return config

    factor = hidden_size / text_config.hidden_size
    _narrow_text_config(text_config, hidden_size, name)
    _narrow_vision_config(config.vision_config, factor)
    return config


def _narrow_text_config(text_config, hidden_size: int, name: str) -> None:
    full_hidden = text_config.hidden_size
    num_heads = text_config.num_attention_heads
    num_kv_heads = text_config.num_key_value_heads or num_heads
    head_dim = getattr(text_config, "head_dim", None) or full_hidden // num_heads
    group_size = num_heads // num_kv_heads
    step = head_dim * group_size
    if hidden_size < step or hidden_size % step:
        suggestion = max(step, hidden_size - hidden_size % step)
        raise InvalidInputError(
            f"hidden size {hidden_size} does not fit shape {name}: it must be a positive multiple of {step} "
            f"(head dimension {head_dim} x {group_size} attention heads per key/value head); pass for example "
            f"{suggestion}"
        )

    scaled_heads = hidden_size // head_dim
    text_config.hidden_size = hidden_size
    text_config.num_attention_heads = scaled_heads
    text_config.num_key_value_heads = scaled_heads // group_size
    text_config.head_dim = head_dim
    text_config.intermediate_size = _round_to_multiple(text_config.intermediate_size * hidden_size / full_hidden, 8)


def _narrow_vision_config(vision_config, factor: float) -> None:
    heads = vision_config.num_attention_heads
    head_dim = vision_config.hidden_size // heads
    scaled_heads = max(1, round(heads * factor))
    scaled_hidden = scaled_heads * head_dim
    vision_config.intermediate_size = _round_to_multiple(
        vision_config.intermediate_size * scaled_hidden / vision_config.hidden_size, 8
    )
    vision_config.num_attention_heads = scaled_heads
    vision_config.hidden_size = scaled_hidden


def _round_to_multiple(value: float, multiple: int) -> int:
    return max(multiple, multiple * round(value / multiple))


class _default_dtype:
    """Context manager that sets torch's default floating dtype, so new modules are built in it."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.previous = torch.get_default_dtype()

    def __enter__(self) -> None:
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc_info) -> None:
        torch.set_default_dtype(self.previous)


def build_shape_models(
    name: str,
    plan: PlanSettings,
    *,
    hidden_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> BenchModels:
    """Build a random-weight LLaVA of a preset shape (narrowed to `hidden_size`) and convert it in memory."""
    config = shape_config(name, hidden_size=hidden_size)
    plan.validate(config.text_config.num_hidden_layers)
    _check_attn_implementation(attn_implementation)
    device = torch.device(device)

    full_hidden = load_preset(name)["text_config"]["hidden_size"]
    notes = {
        "weights": "random",
        "hidden_size": config.text_config.hidden_size,
        "full_hidden_size": full_hidden,
    }
    label = name if config.text_config.hidden_size == full_hidden else f"{name} (hidden {config.text_config.hidden_size})"

    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.device(device), _default_dtype(dtype):
        original = AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    original = original.to(device).eval()
    logger.info("Built %s with random weights in %.1f s", label, time.perf_counter() - started)
    return models_from_llava(original, plan, label=label, source="shape", notes=notes, seed=seed)


def models_from_llava(
    original: LlavaForConditionalGeneration,
    plan: PlanSettings,
    *,
    label: str = "model",
    source: str = "in-memory",
    notes: dict | None = None,
    seed: int = 0,
) -> BenchModels:
    """Convert a loaded LLaVA model in memory and pair it with the original, on the original's device and dtype."""
    plan.validate(original.config.text_config.num_hidden_layers)
    device = original.device
    started = time.perf_counter()
    with torch.device(device), _default_dtype(original.dtype):
        converted = convert_model(
            original,
            split_layer=plan.split_layer,
            side_branch_depth=plan.side_branch_depth,
            num_fusion_layers=plan.num_fusion_layers,
            side_branch_init=plan.side_branch_init,
            seed=seed,
        )
    converted = converted.to(device).eval()
    logger.info("Converted %s in memory (split layer %d) in %.1f s", label, plan.split_layer, time.perf_counter() - started)
    return BenchModels(original.eval(), converted, label, source, dict(notes or {}))


def load_bench_models(
    model: str,
    *,
    converted: str | None = None,
    plan: PlanSettings | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    revision: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
) -> BenchModels:
    """Load MODEL and either the converted folder `converted` or an in-memory conversion with `plan`."""
    from .convert import check_source_config

    if (converted is None) == (plan is None):
        raise InvalidInputError(
            "pass either a converted model folder or a plan to convert MODEL in memory, not "
            f"{'both' if converted else 'neither'}; the CLI takes --converted OUT or --split N"
        )
    _check_attn_implementation(attn_implementation)
    device = torch.device(device)

    source = resolve_model_path(model, revision=revision, cache_dir=cache_dir)
    check_source_config(read_config(source), source)
    original = LlavaForConditionalGeneration.from_pretrained(
        source, dtype=dtype, attn_implementation=attn_implementation
    )
    original = original.to(device).eval()

    if plan is not None:
        return models_from_llava(original, plan, label=model, source="checkpoint", seed=seed)

    converted_path = resolve_model_path(converted)
    model_type = read_config(converted_path).get("model_type")
    if model_type != DpvrLlavaConfig.model_type:
        raise InvalidInputError(
            f"--converted {converted} is not a converted dual-path model: its config.json has model_type "
            f"{model_type!r}, expected {DpvrLlavaConfig.model_type!r}; pass the output folder of "
            "`dpvr-surgery convert`"
        )
    loaded = AutoModelForImageTextToText.from_pretrained(
        converted_path, dtype=dtype, attn_implementation=attn_implementation
    )
    loaded = loaded.to(device).eval()
    _check_same_architecture(original, loaded, model, converted)
    return BenchModels(original, loaded, model, "checkpoints", {"converted": str(converted)})


def _check_attn_implementation(name: str) -> None:
    if name not in ATTN_IMPLEMENTATIONS:
        raise InvalidInputError(
            f"attention implementation {name!r} is not supported by bench; choose one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )


def _check_same_architecture(original, converted, model: str, converted_name: str) -> None:
    fields = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
    for name in fields:
        expected = getattr(original.config.text_config, name)
        found = getattr(converted.config.text_config, name)
        if expected != found:
            raise InvalidInputError(
                f"--converted {converted_name} does not match MODEL {model}: its language model has {name} {found}, "
                f"MODEL has {expected}; pass the folder that `dpvr-surgery convert` wrote from MODEL"
            )


# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class BenchInputs:
    """A batch of identical-layout prompts, their precomputed image features and the tokens to decode."""

    input_ids: torch.Tensor
    image_features: list[torch.Tensor]
    decode_ids: torch.Tensor
    image_tokens: int

    @property
    def sequence_length(self) -> int:
        return self.input_ids.shape[1]

    def attention_mask(self, length: int) -> torch.Tensor:
        return torch.ones(self.input_ids.shape[0], length, dtype=torch.long, device=self.input_ids.device)

    def prefill_kwargs(self, decoded: int = 0) -> dict:
        """Keyword arguments of a forward over the prompt followed by the first `decoded` decode tokens."""
        input_ids = self.input_ids
        if decoded:
            input_ids = torch.cat([input_ids, self.decode_ids[:, :decoded]], dim=1)
        kwargs = {"input_ids": input_ids, "attention_mask": self.attention_mask(input_ids.shape[1])}
        if self.image_features:
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=self.image_features)}
        return kwargs


def make_bench_inputs(
    config: LlavaConfig,
    settings: BenchSettings,
    *,
    image_tokens: int,
    decode_steps: int,
    device: torch.device,
    dtype: torch.dtype,
) -> BenchInputs:
    """Build random prompts: a few text tokens, the images back to back, then the rest of the text.

    Image features are standard-normal vectors of the language model's hidden size: values do not
    change the work either model does.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    batch_size = settings.batch_size
    prefix_tokens = min(5, settings.text_tokens // 2)
    suffix_tokens = settings.text_tokens - prefix_tokens
    image_span = torch.full((batch_size, settings.num_images * image_tokens), config.image_token_id)

    input_ids = torch.cat(
        [
            _ordinary_tokens(config, (batch_size, prefix_tokens), generator),
            image_span,
            _ordinary_tokens(config, (batch_size, suffix_tokens), generator),
        ],
        dim=1,
    )
    hidden_size = config.text_config.hidden_size
    features = [
        torch.randn(image_tokens, hidden_size, generator=generator).to(device=device, dtype=dtype)
        for _ in range(batch_size * settings.num_images)
    ]
    decode_ids = _ordinary_tokens(config, (batch_size, decode_steps), generator)
    return BenchInputs(input_ids.to(device), features, decode_ids.to(device), image_tokens)


def _ordinary_tokens(config: LlavaConfig, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Return random token ids that are neither special tokens nor the image token."""
    vocab_size = config.text_config.vocab_size
    image_token_id = config.image_token_id
    skips_image_token = FIRST_ORDINARY_TOKEN_ID <= image_token_id < vocab_size
    high = vocab_size - 1 if skips_image_token else vocab_size
    tokens = torch.randint(FIRST_ORDINARY_TOKEN_ID, high, size, generator=generator)
    if skips_image_token:
        tokens = tokens + (tokens >= image_token_id).long()
    return tokens


# ---------------------------------------------------------------------------------------------------
# Measurements


def summarize(samples: list[float]) -> dict:
    """Return the median, min and max of timing samples, with the samples themselves."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def measure_prefill(
    models: dict[str, torch.nn.Module], inputs: BenchInputs, *, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Time one prefill forward per model and repeat, interleaved; return the seconds per model."""
    return time_prefill(models, inputs.prefill_kwargs(), warmup=warmup, repeats=repeats)


def _timed_forward(model: torch.nn.Module, **kwargs):
    """Run one forward without gradients; return its output and wall-clock seconds."""
    synchronize(model.device)
    started = time.perf_counter()
    with torch.no_grad():
        output = model(**kwargs)
    synchronize(model.device)
    return output, time.perf_counter() - started


def decode_step_seconds(model: torch.nn.Module, inputs: BenchInputs, steps: int) -> list[float]:
    """Prefill (untimed), then time `steps` cached decode steps of one token each; return seconds per step."""
    prompt_length = inputs.sequence_length
    full_mask = inputs.attention_mask(prompt_length + steps)
    output, _ = _timed_forward(model, **inputs.prefill_kwargs(), use_cache=True, logits_to_keep=1)
    cache = output.cache

    seconds = []
    for step in range(steps):
        output, step_seconds = _timed_forward(
            model,
            input_ids=inputs.decode_ids[:, step : step + 1],
            attention_mask=full_mask[:, : prompt_length + step + 1],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        seconds.append(step_seconds)
        cache = output.cache
    return seconds


def measure_decode(
    models: dict[str, torch.nn.Module], inputs: BenchInputs, steps: int, *, warmup: int, repeats: int
) -> dict[str, list[list[float]]]:
    """Run `decode_step_seconds` per model and repeat, interleaved; return the per-step seconds of each repeat."""
    results: dict[str, list[list[float]]] = {name: [] for name in models}
    for iteration in range(warmup + repeats):
        for name, model in models.items():
            seconds = decode_step_seconds(model, inputs, steps)
            if iteration >= warmup:
                results[name].append(seconds)
    return results


def per_token_seconds(step_seconds: list[list[float]], new_tokens: int) -> dict:
    """Summarize the mean time per step over the first `new_tokens` steps of each repeat."""
    means = [sum(seconds[:new_tokens]) / new_tokens for seconds in step_seconds]
    return summarize(means)


def no_cache_steps(lengths: tuple[int, ...], samples: int | None) -> list[int]:
    """Return the decode steps to time without a cache: all of them, or `samples` evenly spaced per length."""
    if not lengths:
        return []
    if samples is None:
        return list(range(max(lengths)))
    steps = set()
    for length in lengths:
        count = min(samples, length)
        for index in range(count):
            steps.add(round(index * (length - 1) / max(1, count - 1)))
    return sorted(steps)


def measure_no_cache_decode(
    model: torch.nn.Module, inputs: BenchInputs, steps: list[int], *, repeats: int
) -> tuple[list[float], dict[int, float]]:
    """Time cached decode steps and, right after each step in `steps`, the same step without a cache.

    Uncached step `j` is one forward over the prompt and the first `j + 1` new tokens, the context
    that cached step `j` attends to. Timing the pair back to back lets both see the same machine
    load. Returns the median seconds of every cached step (0 .. max(steps)) and of each uncached step.
    """
    num_steps = max(steps) + 1
    timed = set(steps)
    prompt_length = inputs.sequence_length
    full_mask = inputs.attention_mask(prompt_length + num_steps)
    cached_runs: list[list[float]] = []
    uncached_runs: dict[int, list[float]] = {step: [] for step in steps}

    for _ in range(repeats):
        output, _ = _timed_forward(model, **inputs.prefill_kwargs(), use_cache=True, logits_to_keep=1)
        cache = output.cache
        cached_seconds = []
        for step in range(num_steps):
            output, seconds = _timed_forward(
                model,
                input_ids=inputs.decode_ids[:, step : step + 1],
                attention_mask=full_mask[:, : prompt_length + step + 1],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = output.cache
            cached_seconds.append(seconds)
            if step in timed:
                kwargs = inputs.prefill_kwargs(decoded=step + 1)
                _, seconds = _timed_forward(model, **kwargs, use_cache=False, logits_to_keep=1)
                uncached_runs[step].append(seconds)
        cached_runs.append(cached_seconds)

    cached_medians = [statistics.median(run[step] for run in cached_runs) for step in range(num_steps)]
    uncached_medians = {step: statistics.median(values) for step, values in uncached_runs.items()}
    return cached_medians, uncached_medians


def interpolated_mean(step_seconds: dict[int, float], length: int) -> float:
    """Return the mean seconds per step over steps `0 .. length-1`, interpolating linearly between timed steps."""
    timed = sorted(step_seconds)
    total = 0.0
    for step in range(length):
        total += _interpolate(timed, step_seconds, step)
    return total / length


def _interpolate(timed: list[int], values: dict[int, float], step: int) -> float:
    if step in values:
        return values[step]
    upper_index = next((index for index, known in enumerate(timed) if known > step), len(timed) - 1)
    lower_index = max(0, upper_index - 1)
    lower, upper = timed[lower_index], timed[upper_index]
    if upper == lower:
        return values[lower]
    weight = (step - lower) / (upper - lower)
    return values[lower] + weight * (values[upper] - values[lower])


def cache_layer_bytes(cache) -> list[tuple[int, int]]:
    """Return (tokens, bytes of keys and values) for every layer slot of a transformers cache."""
    sizes = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        values = getattr(layer, "values", None)
        if keys is None or values is None or keys.dim() < 2:
            sizes.append((0, 0))
            continue
        size = keys.numel() * keys.element_size() + values.numel() * values.element_size()
        sizes.append((int(keys.shape[-2]), size))
    return sizes


def measure_kv_cache(model: torch.nn.Module, inputs: BenchInputs) -> list[tuple[int, int]]:
    """Prefill with a fresh cache; return (tokens, bytes) per layer of the cache it returns."""
    with torch.no_grad():
        output = model(**inputs.prefill_kwargs(), use_cache=True, logits_to_keep=1)
    return cache_layer_bytes(output.cache)


def group_cache_bytes(layer_bytes: list[tuple[int, int]], plan: PlanSettings) -> dict[str, int]:
    """Sum per-layer cache bytes by the converted model's layer groups (the side branch caches nothing)."""
    num_layers = len(layer_bytes)
    fusion_start = num_layers - plan.num_fusion_layers
    groups = {
        "shared": range(0, plan.split_layer),
        "deep_text": range(plan.split_layer, fusion_start),
        "fusion": range(fusion_start, num_layers),
    }
    return {name: sum(layer_bytes[index][1] for index in layers) for name, layers in groups.items()}


class StorageMemoryTracker(TorchDispatchMode):
    """Track bytes of tensor storages that operators create while active: current and peak.

    Storages that exist before (weights, inputs) count as zero the first time an operator reads
    them. A storage stops counting when its Python object is freed. Scratch memory inside a kernel
    that never becomes a tensor is not seen.
    """

    def __init__(self):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self.current_bytes = 0
        self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for leaf in tree_leaves((args, kwargs or {})):
            if isinstance(leaf, torch.Tensor):
                self._register(leaf, created=False)
        output = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(output):
            if isinstance(leaf, torch.Tensor):
                self._register(leaf, created=True)
        return output

    def _register(self, tensor: torch.Tensor, *, created: bool) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes() if created else 0
        self._seen[storage] = size
        if size == 0:
            return
        self.current_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        finalizer = weakref.finalize(storage, self._release, size)
        finalizer.atexit = False

    def _release(self, size: int) -> None:
        self.current_bytes -= size


def measure_peak_memory(model: torch.nn.Module, inputs: BenchInputs, steps: int) -> tuple[int, str]:
    """Return the peak bytes allocated above the weights during a prefill and `steps` decode steps, and the method."""
    gc.collect()
    device = model.device
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        decode_step_seconds(model, inputs, steps)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline, "cuda allocator"

    with StorageMemoryTracker() as tracker:
        decode_step_seconds(model, inputs, steps)
    return tracker.peak_bytes, "tensor storages created by operators (kernel scratch not counted)"


def weights_bytes(model: torch.nn.Module) -> int:
    """Return the bytes of every parameter and buffer, shared tensors counted once."""
    tensors = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def measure_vision_encoder(
    model: LlavaForConditionalGeneration, settings: BenchSettings, image_tokens: int
) -> list[float] | None:
    """Time the vision tower and projector on random pixels, or return None when their token count differs."""
    config = model.config
    if settings.num_images == 0 or image_tokens != image_tokens_per_image(config):
        return None

    image_size = config.vision_config.image_size
    height, width = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    generator = torch.Generator().manual_seed(settings.seed)
    pixel_values = torch.randn(settings.batch_size * settings.num_images, 3, height, width, generator=generator)
    pixel_values = pixel_values.to(device=model.device, dtype=model.dtype)

    seconds = []
    for iteration in range(settings.warmup + settings.repeats):
        synchronize(model.device)
        started = time.perf_counter()
        with torch.no_grad():
            model.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
        synchronize(model.device)
        if iteration >= settings.warmup:
            seconds.append(time.perf_counter() - started)
    return seconds


# ---------------------------------------------------------------------------------------------------
# Report


# Targets at the llava-1.5-7b layout (split 18, one side-branch layer, one fusion layer).
MIN_SHARE_OF_FLOP_BOUND = 0.9
MAX_DECODE_TIME_RATIO = 1.0


def describe_environment(device: torch.device, dtype: torch.dtype, attn_implementation: str) -> dict:
    """Return the machine and library versions that a measured number depends on."""
    environment = {
        "device": str(device),
        "device_name": _cpu_model_name(),
        "cpu": _cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": attn_implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dpvr_surgery": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min": _load_average(),
    }
    if device.type == "cuda":
        environment["device_name"] = torch.cuda.get_device_name(device)
        environment["cuda"] = torch.version.cuda
    return environment


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> float | None:
    """Return the 1-minute load average, a hint of how busy a shared machine was; None where unknown."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def analytic_costs(config: LlavaConfig, plan: PlanSettings, settings: BenchSettings, image_tokens: int, dtype_bytes: int) -> dict:
    """Return `prefill_cost` for the benchmark's prompt, with the language-model prefill FLOPs added.

    The language-model prefill is the decoder and `lm_head`: what `measure_prefill` times.
    """
    costs = prefill_cost(
        config,
        plan,
        image_tokens=image_tokens,
        text_tokens=settings.text_tokens,
        num_images=settings.num_images,
        batch_size=settings.batch_size,
        dtype_bytes=dtype_bytes,
    )
    for path in ("original", "converted"):
        costs[path]["language_model_prefill_flops"] = costs[path]["decoder_flops"] + costs[path]["lm_head_flops"]
    return costs


def run_bench(models: BenchModels, settings: BenchSettings) -> dict:
    """Measure both models on one prompt shape; return the JSON-serialisable report (see the module docstring)."""
    settings.validate()
    original = models.original
    config = original.config
    plan = models.plan
    image_tokens = settings.image_tokens or image_tokens_per_image(config)
    dtype_bytes = torch.tensor([], dtype=original.dtype).element_size()
    costs = analytic_costs(config, plan, settings, image_tokens, dtype_bytes)

    decode_steps = max([settings.new_tokens, *settings.no_cache_tokens])
    new_tokens = settings.new_tokens
    inputs = make_bench_inputs(
        config, settings, image_tokens=image_tokens, decode_steps=decode_steps, device=original.device, dtype=original.dtype
    )
    named = models.as_dict()
    environment = describe_environment(original.device, original.dtype, config._attn_implementation)

    _warn_if_busy(original.device)
    logger.info("Timing prefill: %d warm-up and %d timed runs per model", settings.warmup, settings.repeats)
    prefill = measure_prefill(named, inputs, warmup=settings.warmup, repeats=settings.repeats)
    vision = measure_vision_encoder(original, settings, image_tokens)

    decode = {}
    if new_tokens:
        logger.info("Timing %d cached decode steps per run", new_tokens)
        decode = measure_decode(named, inputs, new_tokens, warmup=settings.warmup, repeats=settings.repeats)

    per_model = {}
    for name, model in named.items():
        per_model[name] = _model_results(model, inputs, settings, prefill[name], decode.get(name), plan)

    report = {
        "report_version": REPORT_VERSION,
        "model": models.label,
        "source": models.source,
        "notes": models.notes,
        "environment": environment,
        "architecture": _architecture(config),
        "plan": asdict(plan),
        "prompt": {
            "image_tokens_per_image": image_tokens,
            "num_images": settings.num_images,
            "text_tokens": settings.text_tokens,
            "sequence_length": inputs.sequence_length,
            "batch_size": settings.batch_size,
            "new_tokens": settings.new_tokens,
        },
        "repetitions": {
            "warmup": settings.warmup,
            "repeats": settings.repeats,
            "no_cache_samples": settings.no_cache_samples,
            "no_cache_repeats": settings.no_cache_repeats,
        },
        "analytic": _analytic_summary(costs),
        "original": per_model["original"],
        "converted": per_model["converted"],
        "vision_encoder_seconds": summarize(vision) if vision else None,
        "no_cache": _no_cache_results(models.converted, inputs, settings),
    }
    environment["load_average_1min_after"] = _load_average()
    report["ratios"] = _ratios(report)
    report["goals"] = _goals(report)
    return report


def _warn_if_busy(device: torch.device) -> None:
    """Log a warning when other processes keep the CPUs busy, which makes CPU timings noisy."""
    load = _load_average()
    cpus = os.cpu_count() or 1
    if device.type == "cpu" and load is not None and load > cpus:
        advice = "; --threads 1 is steadier when other processes compete for the cores" if torch.get_num_threads() > 1 else ""
        logger.warning("The machine is busy (load average %.1f on %d CPUs): CPU timings will be noisy%s", load, cpus,
                       advice)


def _model_results(model, inputs, settings, prefill_seconds, decode_seconds, plan) -> dict:
    layer_bytes = measure_kv_cache(model, inputs)
    results = {
        "prefill_seconds": summarize(prefill_seconds),
        "decode_seconds_per_token": None,
        "decode_tokens_per_second": None,
        "kv_cache_bytes": sum(size for _, size in layer_bytes),
        "kv_cache_tokens_per_layer": [tokens for tokens, _ in layer_bytes],
        "weights_bytes": weights_bytes(model),
        "peak_memory_bytes": None,
        "peak_memory_method": None,
    }
    if isinstance(model, DpvrLlavaForConditionalGeneration):
        results["kv_cache_bytes_by_group"] = group_cache_bytes(layer_bytes, plan)
    if decode_seconds and settings.new_tokens:
        per_token = per_token_seconds(decode_seconds, settings.new_tokens)
        results["decode_seconds_per_token"] = per_token
        results["decode_tokens_per_second"] = settings.batch_size / per_token["median"]
    if settings.measure_memory:
        peak, method = measure_peak_memory(model, inputs, settings.new_tokens)
        results["peak_memory_bytes"] = peak
        results["peak_memory_method"] = method
    return results


def _no_cache_results(model, inputs, settings: BenchSettings) -> dict:
    """Compare cached decoding with full recomputation at each length of `no_cache_tokens`."""
    if not settings.no_cache_tokens:
        return {}
    steps = no_cache_steps(settings.no_cache_tokens, settings.no_cache_samples)
    logger.info(
        "Timing %d cached decode steps, %d of them also without a cache, %d runs",
        max(steps) + 1,
        len(steps),
        settings.no_cache_repeats,
    )
    cached, uncached = measure_no_cache_decode(model, inputs, steps, repeats=settings.no_cache_repeats)

    results = {}
    for length in settings.no_cache_tokens:
        no_cache = interpolated_mean(uncached, length)
        with_cache = statistics.fmean(cached[:length])
        results[str(length)] = {
            "no_cache_seconds_per_token": no_cache,
            "cached_seconds_per_token": with_cache,
            "cached_over_no_cache": with_cache / no_cache,
            "timed_steps": [step for step in steps if step < length],
            "interpolated": settings.no_cache_samples is not None and length > settings.no_cache_samples,
        }
    return results


def _architecture(config: LlavaConfig) -> dict:
    text_config = config.text_config
    num_heads = text_config.num_attention_heads
    return {
        "num_layers": text_config.num_hidden_layers,
        "hidden_size": text_config.hidden_size,
        "intermediate_size": text_config.intermediate_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": text_config.num_key_value_heads or num_heads,
        "head_dim": getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads,
        "vocab_size": text_config.vocab_size,
        "vision_hidden_size": config.vision_config.hidden_size,
        "vision_num_layers": config.vision_config.num_hidden_layers,
    }


def _analytic_summary(costs: dict) -> dict:
    keys = ("token_layers", "decoder_flops", "lm_head_flops", "language_model_prefill_flops", "prefill_flops", "kv_cache_bytes")
    summary = {path: {key: costs[path][key] for key in keys} for path in ("original", "converted")}
    summary["converted"]["kv_cache_bytes_by_group"] = costs["converted"]["kv_cache_bytes_by_group"]
    summary["vision_encoder_flops"] = costs["vision_encoder"]["flops"]
    return summary


def _ratios(report: dict) -> dict:
    analytic = report["analytic"]
    original = report["original"]
    converted = report["converted"]

    def flop_ratio(key: str) -> float:
        return analytic["original"][key] / analytic["converted"][key]

    speedup = original["prefill_seconds"]["median"] / converted["prefill_seconds"]["median"]
    flop_bound = flop_ratio("language_model_prefill_flops")
    ratios = {
        "prefill_speedup": speedup,
        "flop_bound": flop_bound,
        "share_of_flop_bound": speedup / flop_bound,
        "decoder_flops_change": 1 / flop_ratio("decoder_flops") - 1,
        "prefill_flops_change": 1 / flop_ratio("prefill_flops") - 1,
        "token_layers_change": 1 / flop_ratio("token_layers") - 1,
        "kv_cache_ratio": converted["kv_cache_bytes"] / original["kv_cache_bytes"],
        "decode_time_ratio": None,
        "end_to_end_prefill_speedup": None,
        "end_to_end_flop_bound": flop_ratio("prefill_flops"),
    }
    ratios["prefill_speedup_per_repeat"] = _paired(original["prefill_seconds"], converted["prefill_seconds"])
    ratios["decode_time_ratio_per_repeat"] = None
    if original["decode_seconds_per_token"] and converted["decode_seconds_per_token"]:
        ratios["decode_time_ratio"] = (
            converted["decode_seconds_per_token"]["median"] / original["decode_seconds_per_token"]["median"]
        )
        ratios["decode_time_ratio_per_repeat"] = _paired(
            converted["decode_seconds_per_token"], original["decode_seconds_per_token"]
        )
    vision = report["vision_encoder_seconds"]
    if vision:
        ratios["end_to_end_prefill_speedup"] = (original["prefill_seconds"]["median"] + vision["median"]) / (
            converted["prefill_seconds"]["median"] + vision["median"]
        )
    return ratios


def _paired(numerator: dict, denominator: dict) -> dict:
    """Summarize the ratios of the two models' timings within each repeat, which ran back to back."""
    return summarize([first / second for first, second in zip(numerator["samples"], denominator["samples"])])


def _goals(report: dict) -> list[dict]:
    ratios = report["ratios"]
    goals = [
        {
            "name": "measured prefill speedup as a share of the FLOP bound",
            "target": f">= {MIN_SHARE_OF_FLOP_BOUND}",
            "value": ratios["share_of_flop_bound"],
            "met": ratios["share_of_flop_bound"] >= MIN_SHARE_OF_FLOP_BOUND,
        },
        {
            "name": "KV-cache bytes equal the analytic figure",
            "target": "equal, both models",
            "value": kv_cache_mismatches(report) or "equal",
            "met": not kv_cache_mismatches(report),
        },
    ]
    if ratios["decode_time_ratio"] is not None:
        goals.append(
            {
                "name": "decode time per token, converted / original",
                "target": f"<= {MAX_DECODE_TIME_RATIO}",
                "value": ratios["decode_time_ratio"],
                "met": ratios["decode_time_ratio"] <= MAX_DECODE_TIME_RATIO,
            }
        )
    return goals


def kv_cache_mismatches(report: dict) -> list[str]:
    """List every KV-cache figure (total per model, and per layer group of the converted) that differs from the analytic one."""
    analytic = report["analytic"]
    mismatches = []
    for path in ("original", "converted"):
        measured = report[path]["kv_cache_bytes"]
        expected = analytic[path]["kv_cache_bytes"]
        if measured != expected:
            mismatches.append(f"{path}: measured {measured:,} bytes, analytic {expected:,}")
    for group, measured in report["converted"].get("kv_cache_bytes_by_group", {}).items():
        expected = analytic["converted"]["kv_cache_bytes_by_group"][group]
        if measured != expected:
            mismatches.append(f"converted {group} layers: measured {measured:,} bytes, analytic {expected:,}")
    return mismatches


def check_kv_cache(report: dict) -> None:
    """Raise `VerificationError` when a measured KV-cache size differs from the analytic one."""
    mismatches = kv_cache_mismatches(report)
    if mismatches:
        raise VerificationError(
            "KV-cache bytes after prefill differ from the analytic figure ("
            + "; ".join(mismatches)
            + "): the cache holds entries that the dual-path layout does not expect; report this with the bench JSON"
        )


# ---------------------------------------------------------------------------------------------------
# Prefill sweep


def sweep_prefill(
    models: BenchModels,
    *,
    image_token_counts: list[int],
    text_token_counts: list[int],
    num_images: int = 1,
    batch_size: int = 1,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> list[dict]:
    """Time prefill at every (image tokens, text tokens) pair; return one point per pair with its FLOP bound."""
    original = models.original
    config = original.config
    dtype_bytes = torch.tensor([], dtype=original.dtype).element_size()
    points = []
    for image_tokens in image_token_counts:
        for text_tokens in text_token_counts:
            settings = BenchSettings(
                image_tokens=image_tokens,
                num_images=num_images,
                text_tokens=text_tokens,
                batch_size=batch_size,
                new_tokens=0,
                warmup=warmup,
                repeats=repeats,
                no_cache_tokens=(),
                seed=seed,
            )
            settings.validate()
            inputs = make_bench_inputs(
                config, settings, image_tokens=image_tokens, decode_steps=0, device=original.device, dtype=original.dtype
            )
            seconds = measure_prefill(models.as_dict(), inputs, warmup=warmup, repeats=repeats)
            costs = analytic_costs(config, models.plan, settings, image_tokens, dtype_bytes)
            points.append(_sweep_point(image_tokens, text_tokens, seconds, costs))
            logger.info(
                "Sweep: %d image + %d text tokens: speedup %.3f (bound %.3f)",
                image_tokens,
                text_tokens,
                points[-1]["speedup"],
                points[-1]["flop_bound"],
            )
    return points


def _sweep_point(image_tokens: int, text_tokens: int, seconds: dict[str, list[float]], costs: dict) -> dict:
    original = summarize(seconds["original"])
    converted = summarize(seconds["converted"])
    speedup = original["median"] / converted["median"]
    flop_bound = (
        costs["original"]["language_model_prefill_flops"] / costs["converted"]["language_model_prefill_flops"]
    )
    return {
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "original_seconds": original,
        "converted_seconds": converted,
        "speedup": speedup,
        "speedup_per_repeat": _paired(original, converted),
        "flop_bound": flop_bound,
        "share_of_flop_bound": speedup / flop_bound,
    }


# ---------------------------------------------------------------------------------------------------
# Text output


def format_bench_report(report: dict) -> str:
    """Format a `run_bench` report as text tables for a terminal."""
    sections = [_format_header(report), _format_main_table(report), _format_ratios(report)]
    if report["no_cache"]:
        sections.append(_format_no_cache(report["no_cache"]))
    sections.append(_format_goals(report["goals"]))
    return "\n\n".join(sections) + "\n"


def _format_header(report: dict) -> str:
    environment = report["environment"]
    prompt = report["prompt"]
    plan = report["plan"]
    repetitions = report["repetitions"]
    images = prompt["num_images"]
    load = ""
    if environment.get("load_average_1min") is not None:
        load = (
            f"; load average {environment['load_average_1min']:.1f} at start, "
            f"{environment['load_average_1min_after']:.1f} at end"
        )
    lines = [
        f"Bench: {report['model']} [{SOURCE_DESCRIPTIONS.get(report['source'], report['source'])}], "
        f"{environment['dtype']}, {environment['attn_implementation']}",
        f"Machine: {environment['device']} ({environment['device_name']}), torch threads: {environment['torch_threads']}"
        f"{load}",
        f"Prompt: batch {prompt['batch_size']}, {images} {'image' if images == 1 else 'images'} x "
        f"{prompt['image_tokens_per_image']} tokens + {prompt['text_tokens']} text tokens = "
        f"{prompt['sequence_length']} positions per row; {prompt['new_tokens']} new tokens",
        f"Plan: split layer {plan['split_layer']}, side branch {plan['side_branch_depth']}, "
        f"fusion {plan['num_fusion_layers']}",
        f"Times: median [min-max] of {repetitions['repeats']} runs after {repetitions['warmup']} warm-up, "
        "models interleaved",
    ]
    return "\n".join(lines)


def _format_stats_ms(stats: dict | None) -> str:
    if stats is None:
        return "n/a"
    return f"{1000 * stats['median']:.2f} [{1000 * stats['min']:.2f}-{1000 * stats['max']:.2f}]"


def _format_optional(value, formatter) -> str:
    return "n/a" if value is None else formatter(value)


def _format_main_table(report: dict) -> str:
    original = report["original"]
    converted = report["converted"]
    analytic = report["analytic"]

    def mib(value: int) -> str:
        return f"{value / MIB:,.2f}"

    def gflops(value: int) -> str:
        return f"{value / 1e9:,.2f}"

    def ratio(first, second) -> str:
        if first is None or second is None or first == 0:
            return ""
        return f"{second / first:.3f}"

    def median_of(stats: dict | None) -> float | None:
        return None if stats is None else stats["median"]

    rows = [
        ("", "original", "converted", "conv/orig"),
        (
            "prefill ms",
            _format_stats_ms(original["prefill_seconds"]),
            _format_stats_ms(converted["prefill_seconds"]),
            ratio(original["prefill_seconds"]["median"], converted["prefill_seconds"]["median"]),
        ),
        (
            "decode ms per token",
            _format_stats_ms(original["decode_seconds_per_token"]),
            _format_stats_ms(converted["decode_seconds_per_token"]),
            ratio(median_of(original["decode_seconds_per_token"]), median_of(converted["decode_seconds_per_token"])),
        ),
        (
            "decode tokens/s",
            _format_optional(original["decode_tokens_per_second"], lambda value: f"{value:,.1f}"),
            _format_optional(converted["decode_tokens_per_second"], lambda value: f"{value:,.1f}"),
            ratio(original["decode_tokens_per_second"], converted["decode_tokens_per_second"]),
        ),
        (
            "KV cache MiB, measured",
            mib(original["kv_cache_bytes"]),
            mib(converted["kv_cache_bytes"]),
            ratio(original["kv_cache_bytes"], converted["kv_cache_bytes"]),
        ),
        (
            "KV cache MiB, analytic",
            mib(analytic["original"]["kv_cache_bytes"]),
            mib(analytic["converted"]["kv_cache_bytes"]),
            ratio(analytic["original"]["kv_cache_bytes"], analytic["converted"]["kv_cache_bytes"]),
        ),
        (
            "peak memory MiB above weights",
            _format_optional(original["peak_memory_bytes"], mib),
            _format_optional(converted["peak_memory_bytes"], mib),
            ratio(original["peak_memory_bytes"], converted["peak_memory_bytes"]),
        ),
        ("weights MiB", mib(original["weights_bytes"]), mib(converted["weights_bytes"]),
         ratio(original["weights_bytes"], converted["weights_bytes"])),
        (
            "decoder + lm_head GFLOPs",
            gflops(analytic["original"]["language_model_prefill_flops"]),
            gflops(analytic["converted"]["language_model_prefill_flops"]),
            ratio(
                analytic["original"]["language_model_prefill_flops"],
                analytic["converted"]["language_model_prefill_flops"],
            ),
        ),
        (
            "prefill GFLOPs with vision",
            gflops(analytic["original"]["prefill_flops"]),
            gflops(analytic["converted"]["prefill_flops"]),
            ratio(analytic["original"]["prefill_flops"], analytic["converted"]["prefill_flops"]),
        ),
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        f"  {label:<{widths[0]}}  {first:>{widths[1]}}  {second:>{widths[2]}}  {third:>{widths[3]}}"
        for label, first, second, third in rows
    ]
    return "\n".join(lines)


def _format_ratios(report: dict) -> str:
    ratios = report["ratios"]
    per_repeat = ratios["prefill_speedup_per_repeat"]
    lines = [
        f"Prefill speedup {ratios['prefill_speedup']:.3f}x against a FLOP bound of {ratios['flop_bound']:.3f}x: "
        f"{100 * ratios['share_of_flop_bound']:.1f} % of the bound (within each repeat: median "
        f"{per_repeat['median']:.3f}x, {per_repeat['min']:.3f}-{per_repeat['max']:.3f})",
        f"Analytic change: decoder token-layers {100 * ratios['token_layers_change']:+.1f} %, decoder FLOPs "
        f"{100 * ratios['decoder_flops_change']:+.1f} %, prefill FLOPs with vision {100 * ratios['prefill_flops_change']:+.1f} %",
    ]
    decode_per_repeat = ratios["decode_time_ratio_per_repeat"]
    if decode_per_repeat:
        lines.append(
            f"Decode time per token, converted / original: {ratios['decode_time_ratio']:.3f} (within each repeat: "
            f"median {decode_per_repeat['median']:.3f}, {decode_per_repeat['min']:.3f}-{decode_per_repeat['max']:.3f})"
        )
    vision = report["vision_encoder_seconds"]
    if vision:
        lines.append(
            f"Vision encoder {1000 * vision['median']:.2f} ms (same in both); with it, prefill speedup "
            f"{ratios['end_to_end_prefill_speedup']:.3f}x against {ratios['end_to_end_flop_bound']:.3f}x "
            "(sum of separately timed parts)"
        )
    return "\n".join(lines)


def _format_no_cache(no_cache: dict) -> str:
    lines = ["Converted model, decoding with the cache against recomputing the context at every step:"]
    for length, entry in no_cache.items():
        no_cache_ms = 1000 * entry["no_cache_seconds_per_token"]
        if entry["interpolated"]:
            timing_method = "interpolated from steps " + ", ".join(str(step) for step in entry["timed_steps"])
        else:
            timing_method = "every step timed"
        if entry["cached_seconds_per_token"] is None:
            lines.append(f"  {length} new tokens: no cache {no_cache_ms:.2f} ms per token ({timing_method})")
            continue
        cached_ms = 1000 * entry["cached_seconds_per_token"]
        lines.append(
            f"  {length} new tokens: cached {cached_ms:.2f} ms, no cache {no_cache_ms:.2f} ms per token, "
            f"ratio {entry['cached_over_no_cache']:.4f} ({timing_method})"
        )
    return "\n".join(lines)


def _format_goals(goals: list[dict]) -> str:
    lines = ["Goals:"]
    for goal in goals:
        value = goal["value"]
        value_text = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"  [{'met' if goal['met'] else 'MISSED'}] {goal['name']}: {value_text} (target {goal['target']})")
    return "\n".join(lines)
