"""Wall-clock timing of models in one process, interleaved so that machine noise hits each model alike."""

import statistics
import time
from collections.abc import Mapping

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_prefill(
    models: Mapping[str, torch.nn.Module], inputs: Mapping[str, torch.Tensor], *, warmup: int = 1, repeats: int = 5
) -> dict[str, list[float]]:
    """Time one prefill forward (with a fresh KV cache, as `generate()` runs it) per model and repeat.

    Models take turns within every repeat. Returns the seconds of each timed repeat per model name.
    """
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for iteration in range(warmup + repeats):
        for name, model in models.items():
            synchronize(model.device)
            started = time.perf_counter()
            with torch.no_grad():
                model(**inputs, use_cache=True, logits_to_keep=1)
            synchronize(model.device)
            if iteration >= warmup:
                seconds[name].append(time.perf_counter() - started)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)
