"""The analysis report: a JSON document (schema version 1), its summary for a converted config, and a table.

Top-level keys of the JSON report:

- `schema_version` (1), `tool`, `version`, `command_line`;
- `model`: what was analysed and how (`model`, `path`, `num_layers`, `image_tokens_per_image`, `dtype`,
  `attn_implementation`, `mode` "in_memory" or "sequential", `device`);
- `calibration`: the data (`source`, `num_samples`, `sample_ids`, `skipped_images`,
  `records_without_image`) and its settings (`seed`, `shuffle`, `batch_size`, `max_seq_length`,
  `logit_lens_tokens`);
- `layers`: one entry per decoder layer, `{"layer": l, CURVE: {"mean", "std", "min", "max"}, ...}` for
  the curves `attention_mass`, `cosine_similarity`, `logit_lens_kl`, `logit_lens_top1`, over samples;
  `std` is the population standard deviation;
- `split`: the decision of the split rule (`split_layer`, `saturated`, `deciding_lens`, `proposals`
  with each lens's threshold and values, `rule`, `explanation`);
- `samples`: `ids` and, per curve, a (samples x layers) list of per-sample values;
- `resources`: `seconds` and `peak_rss_bytes` of the process.
"""

import json
from pathlib import Path

import torch

from .lenses import LENS_NAMES, LensMeasurements

SCHEMA_VERSION = 1
REPORT_FILE_NAME = "saturation_report.json"
PLOT_FILE_NAME = "saturation.png"
DIGITS = 6

CURVE_LABELS = {
    "attention_mass": "text->image attention",
    "cosine_similarity": "cosine(h_l, h_l+1)",
    "logit_lens_kl": "logit-lens KL",
    "logit_lens_top1": "top-1 agreement",
}


def layer_statistics(measurements: LensMeasurements) -> list[dict]:
    """Return mean, standard deviation, min and max over samples of every curve, per layer."""
    layers = []
    for layer in range(measurements.num_layers):
        entry: dict = {"layer": layer}
        for name in LENS_NAMES:
            column = measurements.values[name][:, layer]
            entry[name] = {
                "mean": round(float(column.mean()), DIGITS),
                "std": round(float(column.std(unbiased=False)), DIGITS),
                "min": round(float(column.min()), DIGITS),
                "max": round(float(column.max()), DIGITS),
            }
        layers.append(entry)
    return layers


def mean_curves(layers: list[dict]) -> dict[str, list[float]]:
    """Return the per-layer means of every curve of a report's `layers` entry."""
    return {name: [entry[name]["mean"] for entry in layers] for name in LENS_NAMES}


def per_sample_values(measurements: LensMeasurements) -> dict:
    """Return the sample ids and every curve's (samples x layers) values as nested lists."""
    values: dict = {"ids": list(measurements.sample_ids)}
    for name in LENS_NAMES:
        values[name] = torch.round(measurements.values[name], decimals=DIGITS).tolist()
    return values


def saturation_summary(report: dict) -> dict:
    """Return the compact summary that a converted model's config stores in its `saturation` field."""
    split = report["split"]
    return {
        "schema_version": report["schema_version"],
        "tool_version": report["version"],
        "split_layer": split["split_layer"],
        "saturated": split["saturated"],
        "deciding_lens": split["deciding_lens"],
        "explanation": split["explanation"],
        "rule": split["rule"],
        "num_samples": report["calibration"]["num_samples"],
        "calibration_source": report["calibration"]["source"],
        "curves": {name: [round(value, 4) for value in values] for name, values in mean_curves(report["layers"]).items()},
    }


def write_report(report: dict, folder: Path) -> Path:
    """Write the report as `saturation_report.json` in `folder` and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REPORT_FILE_NAME
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def _route(layer: int, split_layer: int, num_fusion_layers: int, num_layers: int) -> str:
    """Return the route of layer `layer` after conversion at `split_layer`, for the table."""
    if layer < split_layer:
        return "shared"
    if layer < num_layers - num_fusion_layers:
        return "text only" + ("  <- split" if layer == split_layer else "")
    return "fusion"


def format_table(report: dict, *, split_layer: int | None = None) -> str:
    """Return the per-layer curves (mean +- std over samples), each layer's route, and the decision.

    The route column shows the decided split, or `split_layer` when the caller converts at another one.
    """
    split_layer = report["split"]["split_layer"] if split_layer is None else split_layer
    num_fusion_layers = report["split"]["rule"]["num_fusion_layers"]
    layers = report["layers"]
    num_layers = len(layers)
    headers = ["layer", *(CURVE_LABELS[name] for name in LENS_NAMES), "route after conversion"]
    rows = []
    for entry in layers:
        cells = [str(entry["layer"])]
        for name in LENS_NAMES:
            cells.append(f"{entry[name]['mean']:.4f} +- {entry[name]['std']:.4f}")
        cells.append(_route(entry["layer"], split_layer, num_fusion_layers, num_layers))
        rows.append(cells)

    widths = [max(len(headers[column]), *(len(row[column]) for row in rows)) for column in range(len(headers))]
    lines = ["  ".join(header.ljust(width) for header, width in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())

    calibration = report["calibration"]
    lines += [
        "",
        f"Samples: {calibration['num_samples']} ({calibration['source']}); values are mean +- std over samples.",
        report["split"]["explanation"],
    ]
    return "\n".join(lines)
