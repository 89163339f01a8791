"""Composition with Hydra's compose API, validation that names the key, recipes found from anywhere."""

from __future__ import annotations

import pytest

from ftpipe.config import compose, validate
from ftpipe.errors import FtpipeError
from ftpipe.paths import RECIPES_DIR

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def test_the_four_contract_recipes_exist():
    assert {"colorist_lora", "colorist_qlora", "assistant_lora", "assistant_qlora"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(recipe):
    cfg = validate(compose([f"+recipe={recipe}", "model=tiny_llama"]))
    assert cfg["model"]["path"] == "tiny:llama"
    assert cfg["stages"] and cfg["train"]["method"] in {"full", "lora", "qlora", "lora8bit"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_files_start_with_package_then_the_command(recipe):
    lines = (RECIPES_DIR / f"{recipe}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith("# ftpipe ") and f"+recipe={recipe}" in lines[1].split()


def test_recipe_overrides_groups():
    assert validate(compose(["+recipe=colorist_qlora"]))["train"]["method"] == "qlora"
    assert validate(compose(["+recipe=assistant_lora", "dataset.name=Ada"]))["dataset"]["name"] == "Ada"


def test_unknown_key_on_the_command_line_names_it():
    with pytest.raises(FtpipeError, match=r"optimizer\.lrr"):
        compose(["+recipe=colorist_lora", "optimizer.lrr=1"])


def test_unknown_key_added_with_plus_names_it():
    with pytest.raises(FtpipeError, match=r"optimizer\.lrr"):
        validate(compose(["+recipe=colorist_lora", "+optimizer.lrr=1"]))


def test_unknown_key_in_a_user_recipe_names_it(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text("# @package _global_\ntrain:\n  epoch: 3\n")
    with pytest.raises(FtpipeError, match=r"train\.epoch"):
        validate(compose(["+recipe=mine"], config_dir=str(tmp_path)))


def test_wrong_type_names_the_key():
    with pytest.raises(FtpipeError, match=r"optimizer\.lr"):
        validate(compose(["optimizer.lr=fast"]))


def test_bad_choice_names_the_key():
    with pytest.raises(FtpipeError, match=r"train\.method"):
        validate(compose(["train.method=magic"]))


def test_qlora_with_zero3_is_refused_before_anything_runs():
    with pytest.raises(FtpipeError, match="ZeRO-3"):
        validate(compose(["+recipe=colorist_qlora", "launcher=deepspeed_zero3"]))


def test_user_config_dir_recipe_is_found(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: tiny_llama\noptimizer:\n  lr: 0.123\n"
    )
    cfg = validate(compose(["+recipe=mine"], config_dir=str(tmp_path)))
    assert cfg["optimizer"]["lr"] == 0.123 and cfg["model"]["path"] == "tiny:llama"
