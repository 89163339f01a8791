"""Length limits and packing on flat token arrays (numpy; no per-token Python).

A document is one tokenised sample. Packing lays documents into rows of at most `max_length` tokens with
best-fit decreasing; `position_ids` restart at 0 for every document and `doc_lens` lists the documents of
each row, so attention can stay inside documents (cu_seqlens = cumsum([0, *doc_lens])).

The label of each document's first token is −100: a causal LM's loss at position t predicts token t+1 from
the labels shifted by one, so that label would be predicted from the previous document's last token. With
it masked, the loss of a packed row equals the token-weighted loss of its documents run one by one.

Preference pairs (`pairs=True`): documents 2k and 2k+1 are pair k's chosen and rejected answers (map writes
them so). A pair is packed as one unit: both halves in the same row, chosen right before rejected, so the
documents of every row — and of a micro-batch of rows — still alternate chosen, rejected. Truncation cuts the
longer half first so that the pair fits in `max_length`; `drop` leaves out pairs longer than that, and a pair
with a half that carries no loss is dropped whole.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import numpy as np

from .labels import IGNORE_INDEX


@dataclass
class Packed:
    input_ids: np.ndarray  # flat, int32
    labels: np.ndarray  # flat, int32
    position_ids: np.ndarray  # flat, int32
    row_offsets: np.ndarray  # rows: [row_offsets[i], row_offsets[i+1]) of the flat arrays
    doc_lens: np.ndarray  # flat document lengths, row by row
    doc_offsets: np.ndarray  # row i's documents: doc_lens[doc_offsets[i]:doc_offsets[i+1]]
    metrics: dict[str, Any]


def _limit(starts: np.ndarray, lens: np.ndarray, max_length: int, truncation: str):
    """(starts, lens) after truncating, splitting into max_length chunks, or dropping documents that are too
    long."""
    if truncation == "drop":
        fits = lens <= max_length
        return starts[fits], lens[fits]
    if truncation == "split":
        chunks = -(-lens // max_length)
        doc = np.repeat(np.arange(len(lens)), chunks)
        first_chunk = np.repeat(np.cumsum(chunks) - chunks, chunks)
        k = np.arange(len(doc)) - first_chunk
        new_starts = starts[doc] + k * max_length
        new_lens = np.minimum(max_length, lens[doc] - k * max_length)
        return new_starts, new_lens
    return starts, np.minimum(lens, max_length)


def _limit_pairs(starts: np.ndarray, lens: np.ndarray, max_length: int, truncation: str):
    """(starts, lens, kept) for pairs (chosen, rejected alternating): `kept` marks documents whose pair fits
    (drop), else every pair is cut to fit, the longer half first (truncate)."""
    chosen, rejected = lens[0::2], lens[1::2]
    if truncation == "drop":
        fits = np.repeat(chosen + rejected <= max_length, 2)
        return starts, lens, fits
    if truncation != "truncate":
        raise ValueError(f"preference pairs cannot be packed with truncation={truncation!r}")
    half = max_length // 2
    new_chosen = np.minimum(chosen, np.maximum(half, max_length - rejected))
    new_rejected = np.minimum(rejected, max_length - new_chosen)
    out = np.empty_like(lens)
    out[0::2], out[1::2] = new_chosen, new_rejected
    return starts, out, np.ones(len(lens), dtype=bool)


def best_fit_decreasing(lens: np.ndarray, capacity: int) -> np.ndarray:
    """Bin of each item: longest first, each into the fullest row that still has room."""
    n = len(lens)
    order = np.argsort(-lens, kind="stable")
    bin_of = np.empty(n, dtype=np.int64)
    scale = n + 1  # key = remaining * scale + bin: sorted by room left, then by bin
    open_keys: list[int] = []
    n_bins = 0
    for d, length in zip(order.tolist(), lens[order].tolist(), strict=True):
        i = bisect.bisect_left(open_keys, length * scale)
        if i < len(open_keys):
            key = open_keys.pop(i)
            b, room = key % scale, key // scale - length
        else:
            b, room = n_bins, capacity - length
            n_bins += 1
        bin_of[d] = b
        if room > 0:
            bisect.insort(open_keys, room * scale + b)
    return bin_of


def pack(
    input_ids: np.ndarray,
    labels: np.ndarray,
    offsets: np.ndarray,
    max_length: int,
    pack_rows: bool = True,
    truncation: str = "truncate",
    pairs: bool = False,
) -> Packed:
    """Documents given as flat arrays + offsets → rows; see the module doc. Counts every token in and out."""
    offsets = offsets.astype(np.int64)
    starts, lens = offsets[:-1], np.diff(offsets)
    tokens_in = int(lens.sum())
    n_in = len(lens)
    if pairs:
        if n_in % 2:
            raise ValueError(f"preference pairs: {n_in} documents, not chosen/rejected pairs")
        starts, lens, fits = _limit_pairs(starts, lens, max_length, truncation)
        starts, kept = starts[fits], lens[fits]
    else:
        starts, kept = _limit(starts, lens, max_length, truncation)
    truncated = tokens_in - int(kept.sum())  # with truncation=drop: the tokens of the documents left out
    dropped_too_long = n_in - len(kept) if truncation == "drop" else 0
    lens = kept

    # Documents whose answer was cut away (or that had none) carry no loss: a row made only of them would
    # give a 0/0 loss, so they are dropped and counted.
    # cumsum over int8 into int32 is ten times faster than numpy's default bool → int64
    counter = np.int32 if len(labels) < 2**31 else np.int64
    has_loss = np.zeros(len(labels) + 1, dtype=counter)
    np.cumsum((labels != IGNORE_INDEX).view(np.int8), dtype=counter, out=has_loss[1:])
    loss_tokens = has_loss[starts + lens] - has_loss[np.minimum(starts + 1, starts + lens)]
    useful = loss_tokens > 0
    if pairs:  # a pair trains only as a whole
        useful = np.repeat(useful[0::2] & useful[1::2], 2)
    dropped_docs = int((~useful).sum())
    dropped_tokens = int(lens[~useful].sum())
    starts, lens = starts[useful], lens[useful]

    if pairs:
        unit = np.arange(len(lens)) // 2
        unit_lens = lens[0::2] + lens[1::2]
        row_of_unit = best_fit_decreasing(unit_lens, max_length) if pack_rows else np.arange(len(unit_lens))
        row_of = row_of_unit[unit]
        # row by row; inside a row pairs longest first; inside a pair chosen, then rejected
        seq = np.lexsort((np.arange(len(lens)) % 2, unit, -unit_lens[unit], row_of))
    elif pack_rows:
        row_of = best_fit_decreasing(lens, max_length)
        seq = np.lexsort((-lens, row_of))  # row by row; inside a row longest first, as best-fit placed them
    else:
        row_of = np.arange(len(lens))
        seq = row_of
    out_lens = lens[seq]
    out_first = np.cumsum(out_lens) - out_lens
    total = int(out_lens.sum())
    within = np.arange(total, dtype=np.int64) - np.repeat(out_first, out_lens)
    gather = np.repeat(starts[seq], out_lens) + within

    new_ids = input_ids[gather].astype(np.int32, copy=False)
    new_labels = labels[gather].astype(np.int32, copy=False)
    new_labels[out_first] = IGNORE_INDEX
    n_rows = int(row_of.max()) + 1 if len(row_of) else 0
    docs_per_row = np.bincount(row_of, minlength=n_rows)
    tokens_per_row = np.bincount(row_of, weights=lens, minlength=n_rows).astype(np.int64)
    row_offsets = np.concatenate([[0], np.cumsum(tokens_per_row)])
    doc_offsets = np.concatenate([[0], np.cumsum(docs_per_row)])
    assert total + truncated + dropped_tokens == tokens_in  # nothing lost that is not reported
    metrics = {
        "documents_in": n_in,
        "documents": int(len(lens)),
        "documents_dropped_no_loss": dropped_docs,
        "documents_dropped_too_long": dropped_too_long,
        "rows": n_rows,
        "tokens_in": tokens_in,
        "tokens_out": total,
        "tokens_truncated": truncated,
        "tokens_dropped_no_loss": dropped_tokens,
        "loss_tokens": int((new_labels != IGNORE_INDEX).sum()),
        "fill_ratio": round(total / (n_rows * max_length), 4) if n_rows else 0.0,
        **({"pairs": int(len(lens)) // 2} if pairs else {}),
    }
    return Packed(
        new_ids,
        new_labels,
        within.astype(np.int32),
        row_offsets,
        out_lens.astype(np.int32),
        doc_offsets,
        metrics,
    )
