"""A PNG of the saturation curves with the chosen split marked, drawn with matplotlib's Agg canvas.

The figure is built on `matplotlib.figure.Figure` with an Agg canvas directly, so plotting neither
needs a display nor changes the pyplot backend of a program that imports this package.
"""

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


FIGURE_SIZE = (8.0, 8.0)
DPI = 80


def _band(axes, layers: list[int], entries: list[dict], name: str, color: str, label: str) -> None:
    means = [entry[name]["mean"] for entry in entries]
    low = [entry[name]["mean"] - entry[name]["std"] for entry in entries]
    high = [entry[name]["mean"] + entry[name]["std"] for entry in entries]
    axes.plot(layers, means, marker="o", markersize=3, color=color, label=label)
    axes.fill_between(layers, low, high, color=color, alpha=0.2, linewidth=0)


def _mark_split(axes, split: dict, num_layers: int) -> None:
    split_layer = split["split_layer"]
    last_skipped = num_layers - split["rule"]["num_fusion_layers"] - 1
    axes.axvspan(split_layer - 0.5, last_skipped + 0.5, color="0.85", zorder=0, label="layers image tokens skip")
    axes.axvline(split_layer - 0.5, color="black", linestyle="--", linewidth=1, label=f"split {split_layer}")


def _threshold_line(axes, split: dict, lens: str) -> None:
    for proposal in split["proposals"]:
        if proposal["lens"] == lens and proposal["used"]:
            axes.axhline(proposal["threshold"], color="tab:red", linestyle=":", linewidth=1, label="rule threshold")


def plot_saturation(report: dict, path: Path, *, title: str | None = None) -> Path:
    """Draw the three lenses per layer (mean with a +-1 std band over samples) and save a PNG at `path`.

    The dashed line marks the split, and the grey span covers the layers that image tokens skip after
    conversion. Dotted red lines are the thresholds of the lenses that the rule uses.
    """
    entries = report["layers"]
    layers = [entry["layer"] for entry in entries]
    split = report["split"]
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    attention_axes, cosine_axes, lens_axes = figure.subplots(3, 1, sharex=True)

    _band(attention_axes, layers, entries, "attention_mass", "tab:blue", "attention mass")
    _threshold_line(attention_axes, split, "attention")
    attention_axes.set_ylabel("text->image\nattention mass")

    _band(cosine_axes, layers, entries, "cosine_similarity", "tab:green", "cosine")
    _threshold_line(cosine_axes, split, "cosine")
    cosine_axes.set_ylabel("cosine(h_l, h_l+1)\nimage tokens")

    _band(lens_axes, layers, entries, "logit_lens_kl", "tab:purple", "KL to last layer")
    lens_axes.set_ylabel("logit lens\nKL (nats)")
    top1_axes = lens_axes.twinx()
    _band(top1_axes, layers, entries, "logit_lens_top1", "tab:orange", "top-1 agreement")
    _threshold_line(top1_axes, split, "logit_lens")
    top1_axes.set_ylabel("top-1 agreement")
    top1_axes.set_ylim(-0.05, 1.05)
    lens_axes.set_xlabel("decoder layer")

    for axes in (attention_axes, cosine_axes, lens_axes):
        _mark_split(axes, split, len(entries))
        axes.grid(True, alpha=0.3)
    attention_axes.legend(loc="upper right", fontsize="small")
    handles = lens_axes.get_legend_handles_labels()[0][:1] + top1_axes.get_legend_handles_labels()[0]
    lens_axes.legend(handles=handles, loc="center left", fontsize="small")

    heading = title or report["model"]["model"]
    status = "" if split["saturated"] else ", no saturation found"
    figure.suptitle(
        f"{heading}: split {split['split_layer']}{status} ({len(entries)} layers, "
        f"{report['calibration']['num_samples']} samples, mean +- std)",
        fontsize="medium",
    )
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
