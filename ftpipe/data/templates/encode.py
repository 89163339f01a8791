"""Conversations → `input_ids` + `labels` (−100 except on answers); pretraining documents → loss on every token.

`encode` is the one dispatch map and `ftpipe check` share: the dataset's format picks pretraining or
conversation encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..labels import IGNORE_INDEX
from .hf import encode_with_chat_template, uses_tokenizer_template
from .segments import assemble, assemble_flat, segments
from .tokenize import special_id, tokenize

PRETRAIN_FORMAT = "pretrain"


def encode_batch(
    tokenizer: Any,
    template: dict[str, Any],
    conversations: Sequence[Sequence[dict[str, Any]]],
    train_on_inputs: bool = False,
) -> tuple[list[list[int]], list[list[int]]]:
    """encode_conversation for many conversations with one tokenizer call."""
    if uses_tokenizer_template(template):
        pairs = [
            encode_with_chat_template(tokenizer, template, conv, train_on_inputs) for conv in conversations
        ]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    return assemble(tokenizer, [segments(template, conv, train_on_inputs) for conv in conversations])


def encode_conversation(
    tokenizer: Any,
    template: dict[str, Any],
    conversation: Sequence[dict[str, Any]],
    train_on_inputs: bool = False,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are −100 except on answers and the suffix/EOS ending them."""
    ids, labels = encode_batch(tokenizer, template, [conversation], train_on_inputs)
    return ids[0], labels[0]


def encode_pretrain(tokenizer: Any, texts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Pretraining documents: BOS + text + EOS (where the tokenizer has them), loss on every token after BOS."""
    bos_id, eos_id = special_id(tokenizer, "bos"), special_id(tokenizer, "eos")
    head = [bos_id] if bos_id is not None else []
    tail = [eos_id] if eos_id is not None else []
    all_ids, all_labels = [], []
    for body in tokenize(tokenizer, list(texts)):
        all_ids.append(head + body + tail)
        all_labels.append([IGNORE_INDEX] * len(head) + body + tail)
    return all_ids, all_labels


def _flat(ids: list[list[int]], labels: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    return [t for x in ids for t in x], [t for x in labels for t in x], [len(x) for x in ids]


def encode(
    tokenizer: Any,
    template: dict[str, Any],
    conversations: Sequence[Sequence[dict[str, Any]]],
    format: str,
    train_on_inputs: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training rows of `conversations` (formats.load_conversations' output) as flat int32 arrays (ids,
    labels) + int64 offsets, the shape Arrow stores list columns in. Pretraining rows (one turn, the document
    as its output) are encoded without the template."""
    if format == PRETRAIN_FORMAT:
        flat_ids, flat_labels, lengths = _flat(
            *encode_pretrain(tokenizer, [conv[0]["output"] for conv in conversations])
        )
    elif uses_tokenizer_template(template):
        flat_ids, flat_labels, lengths = _flat(
            *encode_batch(tokenizer, template, conversations, train_on_inputs)
        )
    else:
        segs = [segments(template, conv, train_on_inputs) for conv in conversations]
        flat_ids, flat_labels, lengths = assemble_flat(tokenizer, segs)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.array(flat_ids, dtype=np.int32), np.array(flat_labels, dtype=np.int32), offsets
