"""Continued pretraining (`+recipe=pretrain_lora`): both of XTuner's document shapes, loss on every token,
documents that attend only to themselves in a packed row, and held-out perplexity that falls with training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from datasets import load_from_disk

from ftpipe import engine, stages
from ftpipe.cache import Cache
from ftpipe.config import compose, validate
from ftpipe.data.labels import IGNORE_INDEX
from ftpipe.data.templates import encode_pretrain

DOCS = ["Teal is a medium cyan colour.", "Its hex code is #008080.", "Maroon is a dark red colour, #800000."]


def _chain(tmp_path, rows: list[dict], *overrides: str) -> dict[str, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = validate(
        compose(
            [
                "+recipe=pretrain_lora",
                "model=tiny_llama",
                f"dataset.path={data}",
                "dataset.format=auto",
                "dataset.eval_size=0",
                "dataset.max_length=64",
                f"cache_dir={tmp_path / 'cache'}",
                "stages=[download,map,pack]",
                *overrides,
            ]  # fmt: skip
        )
    )
    cache = Cache(cfg["cache_dir"])
    return {r["name"]: r for r in engine.run(stages.plan(cfg, cache), cache)}


def test_text_rows_and_xtuner_conversation_rows_pack_the_same_documents_with_loss_on_every_token(tmp_path):
    plain = _chain(tmp_path / "a", [{"text": d} for d in DOCS])
    xtuner = _chain(tmp_path / "b", [{"conversation": [{"input": "", "output": d}]} for d in DOCS])
    rows_a = load_from_disk(str(plain["pack"]["output"]) + "/dataset")
    rows_b = load_from_disk(str(xtuner["pack"]["output"]) + "/dataset")
    assert rows_a["input_ids"] == rows_b["input_ids"] and rows_a["labels"] == rows_b["labels"]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plain["download-model"]["output"] + "/model")
    ids, _ = encode_pretrain(tokenizer, DOCS)
    (row,) = rows_a  # three short documents, one packed row
    assert sorted(row["doc_lens"]) == sorted(len(d) for d in ids)
    starts = {i for i, p in enumerate(row["position_ids"]) if p == 0}
    # every token is a target except where a document starts (its BOS: nothing before it to predict from)
    assert [t for i, t in enumerate(row["input_ids"]) if i not in starts] == [
        t for i, t in enumerate(row["labels"]) if i not in starts
    ]
    assert all(row["labels"][i] == IGNORE_INDEX for i in starts)
    assert row["input_ids"][-1] == tokenizer.eos_token_id  # each document ends with EOS


def test_documents_in_a_packed_row_attend_only_to_themselves(tmp_path):
    from transformers import AutoModelForCausalLM

    from ftpipe.training.speed.attention import register_docs

    rows = _chain(tmp_path, [{"text": d} for d in DOCS])
    (row,) = load_from_disk(str(rows["pack"]["output"]) + "/dataset")
    model = AutoModelForCausalLM.from_pretrained(
        rows["download-model"]["output"] + "/model", attn_implementation=register_docs()
    ).train()  # the training path: per-document attention from the restarting position_ids
    ids, pos = torch.tensor([row["input_ids"]]), torch.tensor([row["position_ids"]])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits[0]
        start = 0
        for length in row["doc_lens"]:
            alone = model(input_ids=ids[:, start : start + length]).logits[0]
            torch.testing.assert_close(packed[start : start + length], alone, atol=1e-5, rtol=1e-4)
            start += length


def test_pretrain_recipe_reports_held_out_perplexity_that_falls(tmp_path):
    args = [
        sys.executable, "-m", "ftpipe", "+recipe=pretrain_lora", "model=tiny_llama", "train.lora.last_layers=2",
        "train.max_steps=20", "optimizer.lr=3e-3", "dataset.eval_size=20", "train.precision=fp32",
    ]  # fmt: skip
    env = {**os.environ, "FTPIPE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (run_json,) = tmp_path.glob("outputs/*/*/run.json")
    (evaluation,) = [r for r in json.loads(run_json.read_text())["stages"] if r["name"] == "evaluate-chat"]
    assert evaluation["eval_task"] == "pretrain"
    assert evaluation["perplexity_after"] < 0.8 * evaluation["perplexity_before"]
