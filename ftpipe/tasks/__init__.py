"""Evaluation tasks: what evaluate-chat asks the model before and after training, and how it scores the replies.

One module per task (`colorist`, `assistant`, `pretrain`, `preference`, `generic`), each exposing
`questions(data, dataset_cfg)` and
`score(phase, replies, run)` and `baselines(data, questions)`; `task_for` picks one from `eval.task`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from . import assistant, colorist, generic, preference, pretrain

TASKS: dict[str, ModuleType] = {
    "colorist": colorist,
    "assistant": assistant,
    "pretrain": pretrain,
    "preference": preference,
    "none": generic,
}


@dataclass
class Question:
    input: str
    reference: str | None = None  # the answer the data holds, where there is one
    group: str | None = None  # a subset the task also scores alone (e.g. the prompt's language)


@dataclass
class Phase:
    """One model being evaluated (the base `before`, the merged `after`) and how to prompt it."""

    name: str
    model: Any
    tokenizer: Any
    template: dict[str, Any]
    # what one phase leaves for the next (the same dict for both): the preference task's base log-probs
    shared: dict[str, Any] = field(default_factory=dict)


def task_name(eval_task: str, data_format: str, owner: str | None) -> str:
    """`eval.task`, with `auto` read from the data: colour rows → colorist, documents → pretrain, an owner's
    name → assistant."""
    if eval_task != "auto":
        return eval_task
    if data_format == "colors":
        return "colorist"
    if data_format == "pretrain":
        return "pretrain"
    if data_format == "preference":
        return "preference"
    if owner:  # only self-cognition data has an owner's name
        return "assistant"
    return "none"


def task_for(name: str) -> ModuleType:
    return TASKS[name]
