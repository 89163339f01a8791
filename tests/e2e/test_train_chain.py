"""The real chain download → map → pack → train → convert → merge on tiny_llama, composed like a user's run."""

from __future__ import annotations

import json
from pathlib import Path

from ftpipe import engine, stages
from ftpipe.cache import Cache
from ftpipe.config import compose, validate


def config(cache: Path, *overrides: str) -> dict:
    return validate(
        compose(
            [
                "+recipe=colorist_lora",
                "model=tiny_llama",
                "stages=[merge]",
                "train.max_steps=3",
                "train.save_steps=2",
                "train.micro_batch_size=2",
                "dataset.max_length=96",
                f"cache_dir={cache}",
                *overrides,
            ]
        )
    )


def run(cfg: dict) -> dict[str, dict]:
    cache = Cache(cfg["cache_dir"])
    return {row["name"]: row for row in engine.run(stages.plan(cfg, cache), cache)}


def test_changing_the_learning_rate_reruns_train_and_after_only(tmp_path):
    first = run(config(tmp_path))
    assert set(first) == {"download-model", "download-data", "map", "pack", "train", "convert", "merge"}
    assert not any(row["hit"] for row in first.values())
    assert first["train"]["train_steps"] == 3

    again = run(config(tmp_path, "optimizer.lr=1e-3"))
    assert {name for name, row in again.items() if row["hit"]} == {
        "download-model",
        "download-data",
        "map",
        "pack",
    }
    assert again["train"]["key"] != first["train"]["key"]
    assert again["merge"]["key"] != first["merge"]["key"]

    same = run(config(tmp_path, "optimizer.lr=1e-3"))
    assert all(row["hit"] for row in same.values())


def test_sample_replies_during_training_use_the_training_prompt_format(tmp_path):
    rows = run(config(tmp_path, "stages=[train]", "train.sample_every=2", "train.sample_max_new_tokens=4"))
    samples = [json.loads(line) for line in (Path(rows["train"]["output"]) / "samples.jsonl").open()]
    assert [s["step"] for s in samples] == [2, 2, 2]  # three prompts at step 2 of 3
    assert all(isinstance(s["reply"], str) and s["input"] for s in samples)
