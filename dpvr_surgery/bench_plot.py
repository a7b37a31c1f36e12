"""Plot a `sweep_prefill` result: prefill speedup against image-token count, one line per text length."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

from .errors import InvalidInputError  # noqa: E402


def plot_speedup(points: list[dict], path: str | Path, *, title: str = "") -> Path:
    """Write a PNG of measured prefill speedup (solid) and its FLOP bound (dashed) against image tokens.

    `points` are the dicts that `sweep_prefill` returns; each text length gets its own colour. The
    measured value is the median over repeats of the speedup within each repeat (the two models ran
    back to back), with bars from the smallest to the largest of those speedups.
    """
    if not points:
        raise InvalidInputError("no sweep points to plot: pass at least one image-token count and one text length")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    text_lengths = sorted({point["text_tokens"] for point in points})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, text_tokens in enumerate(text_lengths):
        series = sorted((point for point in points if point["text_tokens"] == text_tokens), key=_image_tokens)
        image_tokens = [point["image_tokens"] for point in series]
        colour = colours[index % len(colours)]
        per_repeat = [point["speedup_per_repeat"] for point in series]
        medians = [summary["median"] for summary in per_repeat]
        spread = [
            [median - summary["min"] for median, summary in zip(medians, per_repeat)],
            [summary["max"] - median for median, summary in zip(medians, per_repeat)],
        ]
        axes.errorbar(image_tokens, medians, yerr=spread, fmt="o-", color=colour, capsize=3,
                      label=f"{text_tokens} text tokens, measured")
        axes.plot(image_tokens, [point["flop_bound"] for point in series], "--", color=colour,
                  label=f"{text_tokens} text tokens, FLOP bound")

    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xscale("log", base=2)
    ticks = sorted({point["image_tokens"] for point in points})
    axes.set_xticks(ticks, [str(tick) for tick in ticks])
    axes.minorticks_off()
    axes.set_xlabel("image tokens per prompt")
    axes.set_ylabel("prefill speedup (original / converted)")
    axes.set_title(title or "DPVR-LF prefill speedup", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _image_tokens(point: dict) -> int:
    return point["image_tokens"]
