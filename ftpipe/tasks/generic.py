"""The `none` task: replies to the held-out inputs (and `eval.inputs`) with no metric."""

from __future__ import annotations

from typing import Any

from ..data.info import DataInfo


def questions(data: DataInfo, dataset_cfg: dict[str, Any]) -> list:
    from . import Question

    return [Question(conv[0]["input"], conv[0]["output"]) for conv in data.held_out]


def score(phase: Any, questions: list, replies: list[str], data: DataInfo, dataset_cfg: dict) -> dict:
    return {}


def baselines(data: DataInfo, questions: list) -> dict[str, float]:
    return {}
