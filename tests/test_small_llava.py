"""The shipped small-LLaVA assets: the trained vision weights and the committed held-out questions."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from safetensors.torch import load_file

from dpvr_surgery.demo_model import VISION_KEY_PREFIXES
from dpvr_surgery.scenes import llava_conversation, render_scene
from dpvr_surgery.small_llava import HELD_OUT_PER_CATEGORY, VISION_SETTINGS, held_out_questions, vision_weights_path

HELD_OUT_JSON = Path(__file__).resolve().parent.parent / "examples" / "small_llava" / "heldout" / "questions.json"


def test_vision_weights_layout():
    path = vision_weights_path()
    state = load_file(path)

    assert path.stat().st_size <= 20 * 1024 * 1024
    assert all(name.startswith(VISION_KEY_PREFIXES) for name in state)
    assert {tensor.dtype for tensor in state.values()} == {torch.float16}
    patches = (VISION_SETTINGS["image_size"] // VISION_SETTINGS["patch_size"]) ** 2
    hidden = VISION_SETTINGS["vision_hidden_size"]
    assert state["model.vision_tower.embeddings.position_embedding.weight"].shape == (patches + 1, hidden)
    assert state["model.multi_modal_projector.linear_1.weight"].shape == (576, hidden)
    assert all(torch.isfinite(tensor.float()).all() for tensor in state.values())


def test_committed_held_out_matches_generator():
    rows = json.loads(HELD_OUT_JSON.read_text())
    records = held_out_questions(HELD_OUT_PER_CATEGORY)

    assert len(rows) == len(records)
    for row, record in zip(rows, records):
        assert row["id"] == record.record_id
        assert row["conversations"] == llava_conversation(record)

    for row, record in list(zip(rows, records))[:6]:
        with PIL.Image.open(HELD_OUT_JSON.parent / row["image"]) as image:
            committed = np.asarray(image.convert("RGB"))
        assert np.array_equal(committed, np.asarray(render_scene(record.scene)))
