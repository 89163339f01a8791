"""Preference pairs through the cached chain on tiny_llama: map writes chosen/rejected documents, pack keeps
them in rows, a beta sweep reuses the data stages, objective/format mismatches fail before any stage, and a
DPO run reaches convert, merge and evaluate-chat's preference metrics."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import train_helpers as h

from ftpipe import engine, stages
from ftpipe.cache import Cache
from ftpipe.data.labels import IGNORE_INDEX
from ftpipe.errors import FtpipeError

FAST = (
    "+recipe=assistant_dpo",
    "dataset.name=Ada",
    "train.max_steps=2",
    "train.micro_batch_size=4",
    "eval.max_new_tokens=4",
)


def run(cfg: dict) -> dict[str, dict]:
    cache = Cache(cfg["cache_dir"])
    return {row["name"]: row for row in engine.run(stages.plan(cfg, cache), cache)}


def test_map_writes_pairs_and_pack_keeps_them_together(tmp_path):
    from transformers import AutoTokenizer

    cfg = h.composed(*FAST, f"cache_dir={tmp_path}", "stages=[pack]", "dataset.pack=true")
    rows = run(cfg)
    assert rows["map"]["format"] == "preference" and rows["map"]["pairs"] == 48
    mapped = datasets.load_from_disk(str(Path(rows["map"]["output"]) / "dataset"))
    assert len(mapped) == 96
    tokenizer = AutoTokenizer.from_pretrained(Path(rows["download-model"]["output"]) / "model")

    def answer(row) -> str:
        return tokenizer.decode(
            [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE_INDEX]
        )

    assert all("Ada" in answer(mapped[i]) for i in range(0, 96, 2))  # chosen: names the owner
    assert not any("Ada" in answer(mapped[i]) for i in range(1, 96, 2))  # rejected: does not
    packed = datasets.load_from_disk(str(Path(rows["pack"]["output"]) / "dataset"))
    assert rows["pack"]["pairs"] == 48 and len(packed) < 48  # several pairs a row
    assert sum(len(r["doc_lens"]) for r in packed) == 96
    for row in packed:
        assert len(row["doc_lens"]) % 2 == 0


def test_a_beta_sweep_reuses_download_map_and_pack(tmp_path):
    cache = Cache(tmp_path)
    base = h.composed(*FAST, f"cache_dir={tmp_path}", "stages=[pack]")
    first = run(base)
    assert not any(r["hit"] for r in first.values())
    keys = set()
    for beta in (0.05, 0.1, 0.3):
        cfg = h.composed(*FAST, f"cache_dir={tmp_path}", f"train.dpo.beta={beta}")
        plan = {s.stage.name: s for s in stages.plan({**cfg, "stages": None}, cache)}
        assert all(plan[name].hit for name in ("download-model", "download-data", "map", "pack")), beta
        assert not plan["train"].hit
        keys.add(plan["train"].key)
    assert len(keys) == 3
    # a setting of the objective not in use does not reach the key
    orpo = [
        {s.stage.name: s.key for s in stages.plan({**c, "stages": None}, cache)}["train"]
        for c in (
            h.composed(*FAST, f"cache_dir={tmp_path}", "train.objective=orpo", f"train.dpo.beta={b}")
            for b in (0.05, 0.3)
        )
    ]
    assert orpo[0] == orpo[1]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (("+recipe=assistant_dpo", "train.objective=sft"), "train.objective"),
        (("+recipe=assistant_lora", "train.objective=dpo"), "train.objective"),
        (("+recipe=assistant_dpo", "dataset.truncation=split"), "dataset.truncation"),
        (("+recipe=assistant_dpo", "train.dpo.beta=0"), "train.dpo.beta"),
        (("+recipe=assistant_dpo", "train.dpo.loss_type=kto"), "train.dpo.loss_type"),
    ],
)
def test_mismatches_fail_before_any_stage_naming_the_key(overrides, key):
    with pytest.raises(FtpipeError, match=f"`{key}`"):
        h.composed(*overrides)


def test_auto_data_with_the_wrong_objective_fails_in_train(tmp_path):
    cfg = h.composed(
        "+recipe=assistant_lora", "dataset.name=Ada", f"cache_dir={tmp_path}", "dataset.format=auto"
    )
    cfg["train"]["objective"] = "dpo"  # as if validation could not see the format (auto)
    with pytest.raises(FtpipeError, match="needs preference pairs"):
        run({**cfg, "stages": ["train"]})
    assert not list((tmp_path / "train").glob("*/manifest.json"))


def test_dpo_reaches_convert_merge_and_the_preference_metrics(tmp_path):
    rows = run(h.composed(*FAST, f"cache_dir={tmp_path}"))
    assert rows["convert"]["convert_format"] == "peft-adapter"
    assert (Path(rows["convert"]["output"]) / "adapter" / "adapter_model.safetensors").is_file() or any(
        Path(rows["convert"]["output"]).rglob("adapter_model.safetensors")
    )
    metrics = rows["evaluate-chat"]
    assert metrics["eval_task"] == "preference" and metrics["preference_pairs"] == 12
    for key in (
        "preference_accuracy_before",
        "preference_accuracy_after",
        "reward_margin",
        "name_rate_after",
    ):
        assert key in metrics
    # the DPO steps moved the chosen answers' log-prob up relative to the rejected ones (against the base)
    assert metrics["reward_margin"] > 0 and metrics["reward_chosen"] > metrics["reward_rejected"]


def test_check_lists_bad_pairs_and_warns_on_identical_answers(tmp_path):
    import json
    import os
    import subprocess
    import sys

    rows = [
        {"prompt": "Who are you?", "chosen": "Ada's assistant.", "rejected": "Nobody."},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": "Hello"},
        {"prompt": "x", "chosen": "", "rejected": "y"},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "FTPIPE_CACHE": str(tmp_path / "c"), "PYTHONPATH": str(repo)}
    res = subprocess.run(
        [sys.executable, "-m", "ftpipe", "check", "+recipe=assistant_dpo", "model=tiny_llama"]
        + [f"dataset.path={data}", "dataset.eval_size=0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode != 0
    assert "format preference" in res.stdout
    assert "pairs.jsonl:3: empty `chosen` answer" in res.stdout
    assert "warning: pairs.jsonl:2: chosen and rejected are the same answer" in res.stdout
    # both answers of a pair are shown, only the answers marked as trained
    assert "--- chosen: pairs.jsonl:1 " in res.stdout and "[[Ada's assistant.<|im_end|>]]" in res.stdout
    assert "--- rejected: pairs.jsonl:1 " in res.stdout and "[[Nobody.<|im_end|>]]" in res.stdout
