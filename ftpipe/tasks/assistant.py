"""The `assistant` task (XTuner's self-cognition): does the model say whose assistant it is?

Asked in Chinese and English; a reply counts when it contains `dataset.name`. The last two prompts of each
language are not in the training set, so the rate also shows whether the model generalises beyond them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data.info import DataInfo

PROMPTS = {
    "zh": ["请介绍一下你自己", "你是谁", "你叫什么名字？", "可以告诉我你是谁吗？", "请简单介绍一下你自己。"],
    "en": [
        "Please introduce yourself",
        "Who are you?",
        "What is your name?",
        "Could you tell me who you are?",
        "Introduce yourself briefly, please.",
    ],
}


def name_rate(replies: Sequence[str], name: str) -> float:
    """Share of replies that state the owner's name (case-insensitive)."""
    return sum(name.lower() in r.lower() for r in replies) / len(replies) if replies else 0.0


def questions(data: DataInfo, dataset_cfg: dict[str, Any]) -> list:
    from . import Question

    return [Question(q, None, lang) for lang, prompts in PROMPTS.items() for q in prompts]


def score(phase: Any, questions: list, replies: list[str], data: DataInfo, dataset_cfg: dict) -> dict:
    # per language too: a user's Chinese-only file should still name its owner in Chinese
    name = dataset_cfg["name"]
    asked = [(q.group, r) for q, r in zip(questions, replies, strict=False) if q.group]
    metrics = {f"name_rate_{phase.name}": name_rate([r for _, r in asked], name)}
    for lang in PROMPTS:
        metrics[f"name_rate_{lang}_{phase.name}"] = name_rate([r for g, r in asked if g == lang], name)
    return metrics


def baselines(data: DataInfo, questions: list) -> dict[str, float]:
    return {}
