"""The `colorist` task: colour descriptions → `#rrggbb`, scored on the held-out colours.

Metrics: the share of replies that are one valid hex code, the mean RGB distance of valid replies to the
reference, the answer loss, and two baselines a model that learned nothing about names would score.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from ..data.info import DataInfo
from ..errors import FtpipeError

_HEX = re.compile(r"#([0-9a-fA-F]{6})")

RGB = tuple[int, int, int]


def parse_hex(text: str) -> RGB | None:
    """The colour of a reply that is exactly one `#rrggbb` code (surrounding whitespace allowed)."""
    match = _HEX.fullmatch(text.strip())
    if not match:
        return None
    value = match.group(1)
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def color_metrics(replies: Sequence[str], references: Sequence[str], suffix: str) -> dict[str, float | None]:
    """hex_valid_rate_<suffix> and color_distance_<suffix> (mean over valid replies, None if none is valid)."""
    targets = [parse_hex(r) for r in references]
    if any(t is None for t in targets):
        raise ValueError("colorist references must all be #rrggbb codes")
    parsed = [parse_hex(r) for r in replies]
    distances = [math.dist(p, t) for p, t in zip(parsed, targets, strict=True) if p is not None]  # type: ignore[arg-type]
    return {
        f"hex_valid_rate_{suffix}": len(distances) / len(replies) if replies else 0.0,
        f"color_distance_{suffix}": sum(distances) / len(distances) if distances else None,
    }


def color_baselines(train_colors: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """What a model that learned nothing about names would score.

    mean baseline: always answer the mean training colour; random baseline: answer a training colour drawn
    uniformly at random, computed as its exact expectation (the mean over all training colours).
    """
    train = [c for c in (parse_hex(c) for c in train_colors) if c is not None]
    targets = [parse_hex(r) for r in references]
    mean = tuple(sum(c[i] for c in train) / len(train) for i in range(3))
    mean_baseline = sum(math.dist(mean, t) for t in targets) / len(targets)  # type: ignore[arg-type]
    random_baseline = sum(math.dist(c, t) for t in targets for c in train) / (len(targets) * len(train))  # type: ignore[arg-type]
    return {"color_distance_mean_baseline": mean_baseline, "color_distance_random_baseline": random_baseline}


def questions(data: DataInfo, dataset_cfg: dict[str, Any]) -> list:
    from . import Question

    if not data.held_out:
        raise FtpipeError("eval.task=colorist needs held-out rows: set dataset.eval_size > 0")
    return [Question(conv[0]["input"], conv[0]["output"], "held_out") for conv in data.held_out]


def score(phase: Any, questions: list, replies: list[str], data: DataInfo, dataset_cfg: dict) -> dict:
    from ..data.templates import encode_conversation
    from ..evaluation.generate import answer_loss

    held = [(q.reference, r) for q, r in zip(questions, replies, strict=False) if q.group == "held_out"]
    metrics: dict[str, Any] = color_metrics([r for _, r in held], [ref for ref, _ in held], phase.name)
    samples = [
        encode_conversation(phase.tokenizer, phase.template, conv) for conv in data.held_out[: len(held)]
    ]
    metrics[f"answer_loss_{phase.name}"] = answer_loss(phase.model, samples)
    return metrics


def baselines(data: DataInfo, questions: list) -> dict[str, float]:
    return color_baselines(data.answers, [q.reference for q in questions if q.group == "held_out"])
