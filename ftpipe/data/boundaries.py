"""Where documents start in a packed row: the one rule every consumer (collator, attention, loss) reads.

A document starts at the start of each row and wherever `position_ids[t] != position_ids[t - 1] + 1`, the rule
transformers uses to detect packed rows (`find_packed_sequence_indices`). Packing restarts positions at 0, but a
document may also begin elsewhere (a continuation at position 256, positions written by another tool): the
varlen boundaries, the per-document spans, flex's document ids, the shifted loss targets and the trained-token
count all follow this rule, so they always see the same documents.

Shapes: `position_ids` is [T] or [B, T] (one row per batch entry); `spans` and `cu_seqlens` count over the
flattened batch, each row starting a document.
"""

from __future__ import annotations

import torch

from .labels import IGNORE_INDEX

# The smallest `max_length_q/k` handed to the varlen kernel: short batches share one compiled value.
MIN_LENGTH_BOUND = 256


def starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, T] (a [T] input is one row): True where a document begins."""
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    mask = torch.ones_like(pos, dtype=torch.bool)
    mask[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return mask


def spans(position_ids: torch.Tensor) -> tuple[list[int], list[int]]:
    """(starts, lengths) of the documents over the flattened batch, as host lists."""
    mask = starts(position_ids).reshape(-1)
    first = mask.nonzero().view(-1).tolist()
    ends = [*first[1:], mask.numel()]
    return first, [e - s for s, e in zip(first, ends, strict=True)]


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths over the flattened batch (int32, [n_docs + 1]) and the longest document.

    Reads back one scalar (a device sync on the GPU): call once per forward, not once per layer."""
    mask = starts(position_ids).reshape(-1)
    idx = torch.nonzero(mask).flatten().to(torch.int32)
    total = torch.tensor([mask.numel()], dtype=torch.int32, device=idx.device)
    cu = torch.cat([idx, total])
    return cu, int((cu[1:] - cu[:-1]).max().item())


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of each token ([B, T], int32), counted from 0 in each row."""
    return starts(position_ids).to(torch.int32).cumsum(-1) - 1


def round_up_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length()


def length_bound(longest: int, total: int) -> int:
    """`max_length_q/k` for the varlen kernel: the longest document rounded up to a power of two (at least
    MIN_LENGTH_BOUND, at most the batch's tokens). An upper bound is all the kernel needs, and it varies little
    from batch to batch, so compiled layers rarely see a new value."""
    return min(max(MIN_LENGTH_BOUND, round_up_pow2(longest)), total)


def shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets [B, T]: token t predicts labels[t + 1]; never across a document start (the last token
    of one document does not predict the first of the next), nor past the row's end."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        targets[:, :-1].masked_fill_(starts(position_ids.expand_as(labels))[:, 1:], IGNORE_INDEX)
    return targets


def loss_tokens(labels: torch.Tensor, position_ids: torch.Tensor) -> int:
    """How many next-token targets train: those of `shifted_targets` that are not IGNORE_INDEX."""
    return int((shifted_targets(labels, position_ids) != IGNORE_INDEX).sum())
