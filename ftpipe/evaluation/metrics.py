"""Task metrics for evaluate-chat: colour replies (validity, RGB distance, baselines) and assistant naming."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

_HEX = re.compile(r"#([0-9a-fA-F]{6})")

RGB = tuple[int, int, int]


def parse_hex(text: str) -> RGB | None:
    """The colour of a reply that is exactly one `#rrggbb` code (surrounding whitespace allowed)."""
    match = _HEX.fullmatch(text.strip())
    if not match:
        return None
    value = match.group(1)
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def rgb_distance(a: RGB, b: RGB) -> float:
    return math.dist(a, b)


def colour_metrics(replies: Sequence[str], references: Sequence[str], suffix: str) -> dict[str, float | None]:
    """hex_valid_rate_<suffix> and color_distance_<suffix> (mean over valid replies, None if none is valid)."""
    targets = [parse_hex(r) for r in references]
    if any(t is None for t in targets):
        raise ValueError("colorist references must all be #rrggbb codes")
    parsed = [parse_hex(r) for r in replies]
    distances = [rgb_distance(p, t) for p, t in zip(parsed, targets, strict=True) if p is not None]  # type: ignore[arg-type]
    return {
        f"hex_valid_rate_{suffix}": len(distances) / len(replies) if replies else 0.0,
        f"color_distance_{suffix}": sum(distances) / len(distances) if distances else None,
    }


def colour_baselines(train_colours: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """What a model that learned nothing about names would score.

    mean baseline: always answer the mean training colour; random baseline: answer a training colour drawn
    uniformly at random, computed as its exact expectation (the mean over all training colours).
    """
    train = [parse_hex(c) for c in train_colours]
    targets = [parse_hex(r) for r in references]
    train_ok = [c for c in train if c is not None]
    mean = tuple(sum(c[i] for c in train_ok) / len(train_ok) for i in range(3))
    mean_baseline = sum(math.dist(mean, t) for t in targets) / len(targets)  # type: ignore[arg-type]
    random_baseline = sum(math.dist(c, t) for t in targets for c in train_ok) / (len(targets) * len(train_ok))  # type: ignore[arg-type]
    return {"color_distance_mean_baseline": mean_baseline, "color_distance_random_baseline": random_baseline}


def name_rate(replies: Sequence[str], name: str) -> float:
    """Share of replies that state the owner's name (case-insensitive)."""
    return sum(name.lower() in r.lower() for r in replies) / len(replies) if replies else 0.0
