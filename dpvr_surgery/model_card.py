"""The README model card of a converted folder, written from local facts only (no network)."""

import yaml

from .plan import format_plan_report

CARD_TAGS = ["dpvr-surgery", "dpvr-lf", "llava", "vision-token-routing", "image-text-to-text"]


def render_model_card(
    *,
    base_model: str,
    report: dict,
    command_line: str,
    verification: dict | None,
    saturation_plot: str | None = None,
) -> str:
    """Return the model card text: Hub metadata, settings, the exact command, plan and verification."""
    metadata = {
        "base_model": base_model,
        "base_model_relation": "finetune",
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": CARD_TAGS,
    }
    plan = report["plan"]
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {base_model} with dual-path vision token routing (DPVR-LF)",
        "",
        f"This model is `{base_model}` converted by `dpvr-surgery`. Image tokens run through the first "
        f"{plan['split_layer']} language-model layers with the text, then leave the deep stack: "
        f"{plan['side_branch_depth']} side-branch layer(s) carry them to the last "
        f"{plan['num_fusion_layers']} layer(s), where they rejoin the text. The deep layers in between "
        "compute and cache text tokens only, so prefill is cheaper and the KV cache smaller.",
        "",
        "Load it with the package installed, or with `trust_remote_code=True` from this folder alone:",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        'model = AutoModelForImageTextToText.from_pretrained("PATH", trust_remote_code=True)',
        'processor = AutoProcessor.from_pretrained("PATH")',
        "```",
        "",
        "## How it was made",
        "",
        "```bash",
        command_line,
        "```",
        "",
        f"Side-branch initialisation: `{plan['side_branch_init']}`. Only the side branch is new; every other "
        "weight is the source's, unchanged. Until it is fine-tuned (`dpvr-surgery finetune`), answers about "
        "images can differ from the source model's; text-only prompts give the source's logits.",
        "",
        "## Plan and estimated savings",
        "",
        "Analytic figures for one image and the prompt shape below (not measured):",
        "",
        "```text",
        format_plan_report(report).rstrip(),
        "```",
    ]
    if saturation_plot:
        lines += ["", "## Visual saturation", "", f"![saturation curves]({saturation_plot})"]
    if verification:
        lines += ["", "## Verification", "", _verification_text(verification)]
    return "\n".join(lines) + "\n"


def _verification_text(verification: dict) -> str:
    if verification.get("skipped"):
        return f"Logit check skipped: {verification['reason']}."
    return (
        f"Text-only logits of this model and the source differ by at most {verification['max_abs_diff']:.3g} "
        f"({verification['dtype']}, {verification['num_tokens']} tokens; tolerance {verification['atol']:g}). "
        "An image prompt ran end to end with finite logits."
    )
