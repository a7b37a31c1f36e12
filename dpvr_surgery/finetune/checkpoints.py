"""Training checkpoints: `accelerate` state (trainable weights, optimizer, scheduler, RNG) plus the step reached.

A checkpoint is written to `checkpoint-N.partial` and renamed to `checkpoint-N` once every file is
in place, so a process killed while saving leaves no folder that looks complete. Only the trainable
weights are stored (in the single-device and DDP cases); the frozen ones come from the converted model.
"""

import json
import logging
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import load_file

from ..errors import InvalidInputError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE_NAME = "finetune_state.json"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Return the complete checkpoints in `folder` as (step, path), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / STATE_FILE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_checkpoint_state(path: Path) -> dict:
    """Read the step, epoch and settings fingerprint saved with a checkpoint."""
    return json.loads((Path(path) / STATE_FILE_NAME).read_text(encoding="utf-8"))


def check_fingerprint(saved: dict, current: dict, checkpoint: Path) -> None:
    """Raise InvalidInputError when the settings that shape training differ from the checkpoint's."""
    changed = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
    if changed:
        details = "; ".join(f"{key}: {saved.get(key)!r} then, {current.get(key)!r} now" for key in changed)
        raise InvalidInputError(
            f"Cannot resume from {checkpoint}: it was trained with other settings ({details}). Resume with the "
            "same settings, or pass --overwrite to start over."
        )


def save_checkpoint(accelerator: Accelerator, folder: Path, step: int, state: dict, keep: int | None) -> Path:
    """Save the training state at optimizer step `step`; every process must call this."""
    folder = Path(folder)
    final = folder / f"checkpoint-{step}"
    partial = folder / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE_NAME).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        prune_checkpoints(folder, keep)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(folder: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoints (None keeps all)."""
    if keep is None:
        return
    checkpoints = list_checkpoints(folder)
    for _, path in checkpoints[: max(len(checkpoints) - keep, 0)]:
        shutil.rmtree(path, ignore_errors=True)


def clear_checkpoints(folder: Path) -> None:
    """Delete every checkpoint and partial checkpoint in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.startswith("checkpoint-"):
            shutil.rmtree(path, ignore_errors=True)


def register_trainable_state_hooks(accelerator: Accelerator) -> None:
    """Make `save_state` store, and `load_state` restore, only the parameters that require gradients.

    With FSDP and DeepSpeed, `accelerate` saves models through their own checkpoint formats and the hooks
    see no weights, so those checkpoints hold every weight.
    """

    def keep_trainable(models, weights, output_dir):
        for index, model in enumerate(models[: len(weights)]):
            names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
            weights[index] = {key: tensor for key, tensor in weights[index].items() if key in names}

    def load_trainable(models, input_dir):
        for index, model in enumerate(models):
            file = Path(input_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")
            state = load_file(file)
            names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
            if set(state) != names:
                raise InvalidInputError(
                    f"Checkpoint {input_dir} contains {len(state)} trained tensors but this run trains {len(names)} "
                    f"(for example {sorted(set(state) ^ names)[:3]}). Resume with the same trainable selection."
                )
            model.load_state_dict(state, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)
