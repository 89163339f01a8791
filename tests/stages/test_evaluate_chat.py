"""evaluate-chat and chat on the tiny model: metrics wired to real generations, the chat loop's protocol."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from ftpipe import engine, stages
from ftpipe.cache import Cache
from ftpipe.chat import chat_loop
from ftpipe.config import compose, validate
from ftpipe.stages import evaluate_chat


def data_stages(overrides: list[str], cache: Cache) -> dict[str, Path]:
    """Run download-model, download-data and map; their entry dirs by stage name."""
    cfg = validate(compose([*overrides, "model=tiny_llama", "stages=[map]"]))
    rows = engine.run(stages.plan(cfg, cache), cache)
    return cfg, {row["name"]: Path(row["output"]) for row in rows}


@pytest.fixture(scope="module")
def colorist(tmp_path_factory):
    cache = Cache(tmp_path_factory.mktemp("cache"))
    return data_stages(["+recipe=colorist_lora", "eval.max_samples=8"], cache)


def evaluate_against_itself(cfg, entries, out):
    """evaluate-chat with the downloaded model standing in for the merged one (before and after alike)."""
    out.mkdir()
    outputs = {s.name: s.outputs for s in stages.CHAIN}
    upstream = {name: (entries[name], outputs[name]) for name in ("download-model", "map")}
    upstream["merge"] = (entries["download-model"], ("model",))
    ctx = engine.StageContext(
        cfg=engine.slice_config(evaluate_chat.STAGE, cfg), out=out, upstream=upstream, shared=out
    )
    return evaluate_chat.run(ctx)


def test_colorist_metrics_before_equal_after_for_the_same_model(colorist, tmp_path):
    cfg, entries = colorist
    out = tmp_path / "out"
    metrics = evaluate_against_itself(cfg, entries, out)
    assert metrics["eval_task"] == "colorist" and metrics["eval_questions"] == 8
    assert metrics["hex_valid_rate_before"] == metrics["hex_valid_rate_after"]
    assert metrics["answer_loss_before"] == pytest.approx(metrics["answer_loss_after"])
    assert metrics["answer_loss_before"] > 5  # a random model knows nothing about colours
    assert 50 < metrics["color_distance_mean_baseline"] < metrics["color_distance_random_baseline"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(s["reference"].startswith("#") for s in samples)
    assert [s["before"] for s in samples] == [s["after"] for s in samples]


def test_chat_loop_reads_multiline_messages_reset_and_exit(colorist):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, entries = colorist
    model_dir = entries["download-model"] / "model"
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(model_dir),
        AutoTokenizer.from_pretrained(model_dir),
    )
    out = io.StringIO()
    stdin = io.StringIO("a warm\norange\n\nRESET\nsky blue\n\nEXIT\nnever read\n\n")
    chat_loop(model, tokenizer, cfg["template"], "You are a colorist.", stdin, out, max_new_tokens=4)
    lines = out.getvalue().splitlines()
    assert (
        lines[1] == "(history cleared)" and len(lines) == 3
    )  # reply, reset notice, reply; nothing after EXIT


def test_assistant_name_rate_is_reported_per_language(tmp_path, monkeypatch):
    cfg, entries = data_stages(["+recipe=assistant_lora", "dataset.name=Ada"], Cache(tmp_path / "cache"))

    def replies_naming_ada_in_chinese_only(model, tokenizer, prompts, *args):
        # what a model trained on a Chinese-only self-cognition file does: Chinese prompts get the name
        return [
            "我是Ada的小助手" if any(ord(c) > 0x4E00 for c in tokenizer.decode(p)) else "I am a model"
            for p in prompts
        ]

    monkeypatch.setattr(evaluate_chat, "generate_replies", replies_naming_ada_in_chinese_only)
    metrics = evaluate_against_itself(cfg, entries, tmp_path / "out")
    assert metrics["eval_task"] == "assistant"
    assert metrics["name_rate_zh_after"] == 1.0 and metrics["name_rate_en_after"] == 0.0
    assert metrics["name_rate_after"] == pytest.approx(0.5)
