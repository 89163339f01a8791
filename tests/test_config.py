"""Composition with Hydra's compose API, validation that names the key, recipes found from anywhere."""

from __future__ import annotations

import copy

import pytest
import yaml
from omegaconf import OmegaConf

from ftpipe.config import RootConfig, compose, validate
from ftpipe.errors import FtpipeError
from ftpipe.paths import CONF_DIR, RECIPES_DIR, default_cache_root

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


def _without(cfg: dict, *dotted: str) -> dict:
    out = copy.deepcopy(cfg)
    for key in dotted:
        *sections, leaf = key.split(".")
        node = out
        for section in sections:
            node = node[section]
        del node[leaf]
    return out


@pytest.mark.parametrize(
    ("qlora", "lora", "differ"),
    [
        ("colorist_qlora", "colorist_lora", ("train.method", "train.epochs", "optimizer.lr")),
        ("assistant_qlora", "assistant_lora", ("train.method",)),
        ("assistant_dpo_qlora", "assistant_dpo", ("train.method",)),
    ],
)
def test_qlora_recipes_are_their_lora_recipe_with_only_the_stated_changes(qlora, lora, differ):
    a = validate(compose([f"+recipe={qlora}", "model=tiny_llama"]))
    b = validate(compose([f"+recipe={lora}", "model=tiny_llama"]))
    assert a["train"]["method"] == "qlora" and b["train"]["method"] == "lora"
    assert _without(a, *differ) == _without(b, *differ)


def test_train_qlora_is_lora_plus_the_method_and_qwen_chat_is_chatml_renamed():
    qlora, lora = (validate(compose([f"train={m}"])) for m in ("qlora", "lora"))
    assert qlora["train"]["method"] == "qlora"
    assert _without(qlora, "train.method") == _without(lora, "train.method")
    qwen, chatml = (validate(compose([f"template={t}"]))["template"] for t in ("qwen_chat", "chatml"))
    assert qwen["name"] == "qwen_chat" and {**qwen, "name": "chatml"} == chatml


@pytest.mark.parametrize("group", ["dataset", "optimizer"])
def test_group_options_state_only_what_differs_from_the_schema(group):
    defaults = OmegaConf.to_container(OmegaConf.structured(RootConfig))[group]
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        assert "defaults" not in values, f"{path.name}: the schema (first in config.yaml) gives every default"
        restated = [k for k, v in values.items() if defaults.get(k) == v]
        assert not restated, f"{path.name} restates the schema's defaults of {restated}"


def test_cache_dir_is_the_command_line_else_ftpipe_cache_else_home(monkeypatch, tmp_path):
    monkeypatch.delenv("FTPIPE_CACHE", raising=False)
    assert validate(compose([]))["cache_dir"] == "~/.cache/ftpipe"
    assert default_cache_root() == "~/.cache/ftpipe"
    monkeypatch.setenv("FTPIPE_CACHE", str(tmp_path / "env"))
    assert validate(compose([]))["cache_dir"] == str(tmp_path / "env") == default_cache_root()
    assert validate(compose([f"cache_dir={tmp_path / 'cli'}"]))["cache_dir"] == str(tmp_path / "cli")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.precision=fp16"], "train.precision"),  # on a machine without CUDA
        (["dataset.eval_size=0"], "dataset.eval_size"),  # the colorist task scores held-out rows
    ],
)
def test_late_failures_are_refused_before_any_stage_naming_the_key(overrides, key):
    import torch

    if "train.precision=fp16" in overrides and torch.cuda.is_available():
        pytest.skip("fp16 is fine with a GPU")
    with pytest.raises(FtpipeError, match=f"config key `{key}`"):
        validate(compose(["model=tiny_llama", *overrides]))
    if key == "dataset.eval_size":  # fine when the chain stops before evaluate-chat
        validate(compose(["model=tiny_llama", *overrides, "stages=[pack]"]))


def test_an_empty_data_file_is_named_not_blamed_on_eval_size(tmp_path):
    from ftpipe.data.sources import materialize_dataset

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(FtpipeError, match="no rows in empty.jsonl"):
        materialize_dataset({"path": str(empty), "eval_size": 0}, tmp_path / "out")
