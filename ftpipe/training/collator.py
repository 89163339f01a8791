"""Padding-free batches: a micro-batch of packed rows becomes ONE row of all their tokens.

transformers' `DataCollatorWithFlattening` restarts positions per *row*; packed rows already hold several
documents each with their own restarting `position_ids`, so we keep those. Given restarting position_ids and
no attention_mask (and no KV cache), the eager/sdpa/flex attention paths build a per-document causal mask,
and each document's first label is -100, so neither attention nor the loss crosses a document boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class HostTensor:
    """A tensor that stays on the host: Trainer moves tensors in a batch to the GPU, not other objects."""

    tensor: torch.Tensor


class PackedCollator:
    """Concatenate packed rows into one [1, total_tokens] row, keeping each document's position_ids.

    With `boundaries=True` (the speed levers on CUDA) it also hands the model what it would otherwise read back
    from the GPU (a host sync each): the document boundaries `cu_seq_lens_q/k` (int32) and `max_length_q/k`
    (the longest document rounded up to a power of two, an upper bound the varlen kernel accepts and that
    varies little from batch to batch, so compiled layers rarely see a new value), and `loss_tokens`."""

    def __init__(self, boundaries: bool = False, host_ids: bool = False) -> None:
        self.boundaries = boundaries
        self.host_ids = host_ids

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
                lab[0] = -100
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
            spans = documents(batch["position_ids"])
            total = batch["input_ids"].shape[1]
            cu = torch.tensor([0] + [end for _, end in spans], dtype=torch.int32)
            longest = max(end - start for start, end in spans)
            bound = min(max(256, 1 << (longest - 1).bit_length()), total)
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=bound, max_length_k=bound)
            # How many next-token targets train (not -100, not across a document start): lets the fused loss
            # pick the trained positions on the GPU without reading a count back (no host sync).
            lab, pos = batch["labels"][0], batch["position_ids"][0]
            batch["loss_tokens"] = int(((lab[1:] != -100) & (pos[1:] == pos[:-1] + 1)).sum())
        if self.host_ids:  # the ids for an input embedding kept in host memory (levers.HostEmbedding)
            batch["host_input_ids"] = HostTensor(batch["input_ids"])
        return batch


def documents(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each document in a flattened row, read from where position_ids restart at 0."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().reshape(-1).tolist() + [flat.numel()]
    return list(zip(starts[:-1], starts[1:], strict=True))
