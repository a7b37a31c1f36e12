"""The small trained LLaVA: SmolLM2-135M-Instruct with a CLIP vision tower trained on shape scenes.

`examples/build_small_llava.py` trains the vision tower and projector (the language model stays frozen)
and writes them to `dpvr_surgery/assets/small_llava_vision.safetensors`, which ships with the package.
`build_small_llava` assembles the full checkpoint from that file and the SmolLM2 GGUF weights. The
held-out questions and the calibration scenes come from `dpvr_surgery.scenes` with fixed seeds, and the
held-out layouts never appear in training, calibration or fine-tuning data.
"""

import hashlib
from importlib import resources
from pathlib import Path

from .demo_model import build_demo_llava
from .errors import InvalidInputError
from .scenes import SceneRecord, held_out_records, training_records

# 96 px images in 8 px patches: 144 image tokens, about 80 % of a one-question prompt.
VISION_SETTINGS = {"image_size": 96, "patch_size": 8, "vision_hidden_size": 256, "vision_layers": 4, "vision_heads": 4}
WEIGHTS_FILE_NAME = "small_llava_vision.safetensors"
HELD_OUT_SEED = 7
HELD_OUT_PER_CATEGORY = 30
CALIBRATION_SEED = 101
BUILD_COMMAND = "python examples/build_small_llava.py"


def vision_weights_path() -> Path:
    """Return the path of the trained vision tower and projector weights shipped in `dpvr_surgery/assets`."""
    path = Path(str(resources.files("dpvr_surgery").joinpath("assets", WEIGHTS_FILE_NAME)))
    if not path.is_file():
        raise InvalidInputError(
            f"Trained vision weights not found: {path}. Reinstall dpvr-surgery, or train them with `{BUILD_COMMAND}` "
            "from a source checkout."
        )
    return path


def weights_digest(path: Path) -> str:
    """Return the SHA-256 hex digest of a weights file, to tell whether a built checkpoint is current."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_small_llava(output_dir: Path, *, vision_weights: Path | None = None, overwrite: bool = False) -> Path:
    """Save the small LLaVA checkpoint to `output_dir`, with the shipped weights unless `vision_weights` is given."""
    weights = Path(vision_weights) if vision_weights is not None else vision_weights_path()
    return build_demo_llava(output_dir, vision_weights=weights, overwrite=overwrite, **VISION_SETTINGS)


def held_out_questions(per_category: int = HELD_OUT_PER_CATEGORY) -> list[SceneRecord]:
    """Return the first `per_category` held-out questions of each category (the same for any larger count)."""
    return held_out_records(HELD_OUT_SEED, per_category=per_category, image_size=VISION_SETTINGS["image_size"])


def held_out_layouts() -> set[frozenset]:
    """Return the layouts of all held-out scenes, which training and calibration data must not reuse."""
    return {record.scene.layout() for record in held_out_questions()}


def calibration_scenes(count: int) -> list[SceneRecord]:
    """Return `count` one-question records from the training distribution for the saturation analysis."""
    return training_records(CALIBRATION_SEED, count, questions_per_scene=1, image_size=VISION_SETTINGS["image_size"],
                            exclude_layouts=held_out_layouts())
