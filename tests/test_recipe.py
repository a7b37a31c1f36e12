"""Recipe files: validation, overrides and the saved copy."""

import pytest
import yaml

from dpvr_surgery.errors import InvalidInputError
from dpvr_surgery.recipe import apply_overrides, load_recipe, validate_recipe, write_recipe


def test_load_and_override(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("version: 1\nconvert:\n  split: 18\n  dtype: bf16\n")
    sections = load_recipe(path)
    assert sections["convert"] == {"split": 18, "dtype": "bf16"}

    updated = apply_overrides(sections, ["convert.split=20", "convert.side_init=copy-last"])
    assert updated["convert"]["split"] == 20
    assert updated["convert"]["side_init"] == "copy-last"
    assert sections["convert"]["split"] == 18


@pytest.mark.parametrize(
    "data, message",
    [
        ({"version": 2}, "version 2 is not supported"),
        ({"convrt": {}}, r"unknown section\(s\) convrt"),
        ({"convert": {"splt": 3}}, r"unknown key\(s\) splt in section convert"),
        ({"convert": [1, 2]}, "section convert must be a mapping"),
        ([1, 2], "expected a mapping of sections"),
    ],
)
def test_invalid_recipes_rejected(data, message):
    with pytest.raises(InvalidInputError, match=message):
        validate_recipe(data)


@pytest.mark.parametrize("override", ["split=3", "convert.split", "=3"])
def test_malformed_override_rejected(override):
    with pytest.raises(InvalidInputError, match="expected SECTION.KEY=VALUE"):
        apply_overrides(validate_recipe({}), [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(InvalidInputError, match="Recipe not found"):
        load_recipe(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("convert: [unclosed\n")
    with pytest.raises(InvalidInputError, match="not valid YAML"):
        load_recipe(broken)


def test_written_recipe_round_trips(tmp_path):
    path = write_recipe(tmp_path, {"convert": {"split": 5}})
    data = yaml.safe_load(path.read_text())
    assert data == {"version": 1, "convert": {"split": 5}}
    assert load_recipe(path)["convert"] == {"split": 5}
