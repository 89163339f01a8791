"""Padding-free batches: a micro-batch of packed rows becomes ONE row of all their tokens.

transformers' `DataCollatorWithFlattening` restarts positions per *row*; packed rows already hold several
documents each with their own restarting `position_ids`, so we keep those. Given restarting position_ids and
no attention_mask (and no KV cache), the eager/sdpa/flex attention paths build a per-document causal mask,
and each document's first label is -100, so neither attention nor the loss crosses a document boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class PackedCollator:
    """Concatenate packed rows into one [1, total_tokens] row, keeping each document's position_ids."""

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for row in rows:
            ids, lab, pos = list(row["input_ids"]), list(row["labels"]), list(row["position_ids"])
            if not len(ids) == len(lab) == len(pos):
                raise ValueError(
                    f"packed row with {len(ids)} input_ids, {len(lab)} labels, {len(pos)} positions"
                )
            if pos and pos[0] != 0:
                raise ValueError("packed row must start a document (position_ids[0] == 0)")
            # A row boundary is a document boundary: never learn the next row's first token from this one.
            labels += [-100, *lab[1:]] if lab else []
            input_ids += ids
            position_ids += pos
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
        }


def documents(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each document in a flattened row, read from where position_ids restart at 0."""
    flat = position_ids.view(-1).tolist()
    starts = [i for i, p in enumerate(flat) if p == 0] + [len(flat)]
    return list(zip(starts[:-1], starts[1:], strict=True))
