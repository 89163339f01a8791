"""Every packaged recipe: in the registry, composable on the tiny model, and a cached rerun hits every stage."""

from __future__ import annotations

import pytest
import train_helpers as h

from ftpipe import engine, stages
from ftpipe.cache import Cache
from ftpipe.paths import RECIPES_DIR
from ftpipe.recipes import RECIPES


def test_the_registry_lists_exactly_the_recipe_files_and_each_header_is_its_command():
    assert {r.name for r in RECIPES} == {p.stem for p in RECIPES_DIR.glob("*.yaml")}
    for entry in RECIPES:
        assert entry.path.read_text().startswith("# @package _global_\n")
        assert entry.command.startswith("ftpipe ") and f"+recipe={entry.name}" in entry.command


@pytest.mark.parametrize("name", [r.name for r in RECIPES])
def test_each_recipe_composes_on_the_tiny_model_and_a_rerun_hits(name, tmp_path):
    cfg = h.composed(f"+recipe={name}", f"cache_dir={tmp_path}", "stages=[pack]")
    assert cfg["model"]["path"] == "tiny:llama"
    cache = Cache(tmp_path)
    first = engine.run(stages.plan(cfg, cache), cache)
    assert [r["name"] for r in first] == ["download-model", "download-data", "map", "pack"]
    again = engine.run(stages.plan(cfg, cache), cache)
    assert all(r["hit"] for r in again) and [r["key"] for r in again] == [r["key"] for r in first]
    full = stages.plan({**cfg, "stages": None}, cache)  # the whole chain plans, keys for every stage
    exports = bool(cfg["export"]["gguf"])  # export is in the chain only when the recipe asks for it
    assert [s.stage.name for s in full] == [s.name for s in stages.CHAIN if s.name != "export" or exports]
