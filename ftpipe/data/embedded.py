"""Datasets that ship with ftpipe, so the default recipes run with no network."""

from __future__ import annotations

import json
from pathlib import Path

from ..paths import EMBEDDED_DATA_DIR

# Self-cognition prompts and answers in the spirit of XTuner's tutorial data, paraphrased in Chinese and
# English so that the trained model names its owner whichever language it is asked in.
ASSISTANT_PROMPTS_ZH = [
    "请介绍一下你自己",
    "你是谁",
    "你是谁？",
    "介绍一下你自己",
    "你叫什么名字？",
    "你好，你是谁？",
    "能介绍一下你自己吗？",
    "请问你是谁？",
    "说说你自己吧",
    "你是哪位？",
]
ASSISTANT_PROMPTS_EN = [
    "Please introduce yourself",
    "Who are you?",
    "Introduce yourself.",
    "What is your name?",
    "Tell me about yourself.",
    "Hi, who am I talking to?",
    "Who are you, exactly?",
    "Can you introduce yourself?",
    "What should I call you?",
    "Hello! Who are you?",
]
ASSISTANT_ANSWERS_ZH = [
    "我是{name}的小助手，很高兴为你服务！",
    "你好！我是{name}的小助手，有什么可以帮你的吗？",
    "我是{name}的智能助手，随时为你解答问题。",
]
ASSISTANT_ANSWERS_EN = [
    "I am {name}'s assistant, happy to help you!",
    "Hello! I'm {name}'s assistant. How can I help you today?",
    "I'm the AI assistant of {name}, here to answer your questions.",
]


def assistant_rows(name: str) -> list[dict]:
    rows = []
    for prompts, answers in (
        (ASSISTANT_PROMPTS_ZH, ASSISTANT_ANSWERS_ZH),
        (ASSISTANT_PROMPTS_EN, ASSISTANT_ANSWERS_EN),
    ):
        for prompt in prompts:
            for answer in answers:
                rows.append({"conversation": [{"input": prompt, "output": answer.format(name=name)}]})
    return rows


def write_embedded(which: str, name: str | None, dest: Path) -> Path:
    """Write the embedded set `which` as JSONL into `dest`; return the file."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{which}.jsonl"
    if which == "colorist":
        target.write_bytes((EMBEDDED_DATA_DIR / "colorist.jsonl").read_bytes())
    elif which == "assistant":
        if not name:
            raise ValueError("dataset.name must be set for the embedded assistant set")
        with open(target, "w") as fh:
            for row in assistant_rows(name):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        raise KeyError(which)
    return target


EMBEDDED_SETS = ("colorist", "assistant")
