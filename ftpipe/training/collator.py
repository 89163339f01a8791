"""Padding-free batches: a micro-batch of packed rows becomes ONE row of all their tokens.

transformers' `DataCollatorWithFlattening` restarts positions per *row*; packed rows already hold several
documents each with their own `position_ids`, so we keep those. Given those position_ids and no attention_mask
(and no KV cache), every attention path attends per document (ftpipe/data/boundaries.py: the one rule for
where documents start), and each document's first label is -100, so neither attention nor the loss crosses a
document boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data import boundaries
from ..data.labels import IGNORE_INDEX


@dataclass
class HostTensor:
    """A tensor that stays on the host: Trainer moves tensors in a batch to the GPU, not other objects."""

    tensor: torch.Tensor


class PackedCollator:
    """Concatenate packed rows into one [1, total_tokens] row, keeping each document's position_ids.

    With `boundaries=True` (the speed levers on CUDA) it also hands the model what it would otherwise read back
    from the GPU (a host sync each): the document boundaries `cu_seq_lens_q/k` (int32) and `max_length_q/k`
    (`boundaries.length_bound` of the longest document), and `loss_tokens`."""

    def __init__(self, boundaries: bool = False, host_ids: bool = False, row_index: bool = False) -> None:
        self.boundaries = boundaries
        self.host_ids = host_ids
        self.row_index = (
            row_index  # pass each row's index on (speed.frozen_prefix looks its hidden states up)
        )

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        # Tensor ops, not per-token Python: with num_workers=0 this runs on the training loop's thread, between
        # two steps, where the GPU may be waiting for it.
        ids_parts: list[torch.Tensor] = []
        lab_parts: list[torch.Tensor] = []
        pos_parts: list[torch.Tensor] = []
        for row in rows:
            ids, lab, pos = (
                torch.as_tensor(row[key], dtype=torch.long).reshape(-1)
                for key in ("input_ids", "labels", "position_ids")
            )
            if not ids.numel() == lab.numel() == pos.numel():
                raise ValueError(
                    f"packed row with {ids.numel()} input_ids, {lab.numel()} labels, {pos.numel()} positions"
                )
            if pos.numel() and int(pos[0]) != 0:
                raise ValueError("packed row must start a document (position_ids[0] == 0)")
            if lab.numel():
                # A row boundary is a document boundary: never learn the next row's first token from this one.
                lab = lab.clone()  # as_tensor may share memory with the dataset's array
                lab[0] = IGNORE_INDEX
            ids_parts.append(ids)
            lab_parts.append(lab)
            pos_parts.append(pos)
        empty = torch.empty(0, dtype=torch.long)
        batch: dict[str, Any] = {
            "input_ids": torch.cat(ids_parts or [empty])[None],
            "labels": torch.cat(lab_parts or [empty])[None],
            "position_ids": torch.cat(pos_parts or [empty])[None],
        }
        if self.boundaries:
            cu, longest = boundaries.cu_seqlens(batch["position_ids"])
            bound = boundaries.length_bound(longest, batch["input_ids"].shape[1])
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=bound, max_length_k=bound)
            # How many next-token targets train (not -100, not across a document start): lets the fused loss
            # pick the trained positions on the GPU without reading a count back (no host sync).
            batch["loss_tokens"] = boundaries.loss_tokens(batch["labels"], batch["position_ids"])
        if self.row_index:
            batch["row_index"] = torch.tensor([int(row["row_index"]) for row in rows])
        if self.host_ids:  # the ids for an input embedding kept in host memory (speed.host_embedding)
            batch["host_input_ids"] = HostTensor(batch["input_ids"])
        return batch
