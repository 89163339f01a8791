"""Packing: token accounting, per-document positions, and the loss contract with training on tiny_llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftpipe.config import compose, validate
from ftpipe.data.labels import IGNORE_INDEX
from ftpipe.data.packing import best_fit_decreasing, pack
from ftpipe.data.templates import encode_conversation
from ftpipe.models.sources import materialize_model
from ftpipe.paths import CONF_DIR


def flat(docs: list[tuple[list[int], list[int]]]):
    ids = np.array([t for d in docs for t in d[0]], dtype=np.int32)
    labels = np.array([t for d in docs for t in d[1]], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(d[0]) for d in docs])])
    return ids, labels, offsets


def rows_of(p):
    return [
        (
            p.input_ids[a:b].tolist(),
            p.labels[a:b].tolist(),
            p.position_ids[a:b].tolist(),
            p.doc_lens[c:d].tolist(),
        )
        for a, b, c, d in zip(
            p.row_offsets[:-1], p.row_offsets[1:], p.doc_offsets[:-1], p.doc_offsets[1:], strict=True
        )
    ]


def toy_docs(lens: list[int]) -> list[tuple[list[int], list[int]]]:
    docs, token = [], 1
    for n in lens:
        ids = list(range(token, token + n))
        docs.append((ids, list(ids)))  # every token carries loss
        token += n
    return docs


def test_best_fit_decreasing_fills_rows():
    assert best_fit_decreasing(np.array([5, 4, 3, 3, 1]), 8).tolist() == [0, 1, 0, 1, 1]
    assert best_fit_decreasing(np.array([8, 8, 1]), 8).tolist() == [0, 1, 2]


def test_packed_rows_keep_every_token_restart_positions_and_mask_first_labels():
    docs = toy_docs([5, 4, 3, 2, 2])
    p = pack(*flat(docs), max_length=8)
    rows = rows_of(p)
    assert [r[3] for r in rows] == [[5, 3], [4, 2, 2]]
    assert rows[0][0] == docs[0][0] + docs[2][0]
    assert rows[0][2] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[1][2] == [0, 1, 2, 3, 0, 1, 0, 1]
    assert rows[0][1] == [IGNORE_INDEX, *docs[0][0][1:], IGNORE_INDEX, *docs[2][0][1:]]
    assert sorted(t for r in rows for t in r[0]) == sorted(t for d in docs for t in d[0])
    m = p.metrics
    assert (m["tokens_in"], m["tokens_out"], m["tokens_truncated"], m["rows"], m["fill_ratio"]) == (
        16,
        16,
        0,
        2,
        1.0,
    )


def test_unpacked_gives_one_document_per_row():
    docs = toy_docs([5, 4, 3])
    rows = rows_of(pack(*flat(docs), max_length=8, pack_rows=False))
    assert [r[0] for r in rows] == [d[0] for d in docs]
    assert [r[3] for r in rows] == [[5], [4], [3]]


def test_truncate_split_and_drop_account_for_every_token():
    docs = toy_docs([10, 3])
    cut = pack(*flat(docs), max_length=4, truncation="truncate")
    assert (cut.metrics["tokens_out"], cut.metrics["tokens_truncated"]) == (7, 6)
    assert [r[0] for r in rows_of(cut)] == [[1, 2, 3, 4], [11, 12, 13]]
    split = pack(*flat(docs), max_length=4, truncation="split")
    assert (split.metrics["tokens_out"], split.metrics["tokens_truncated"]) == (13, 0)
    assert sorted(r[3] for r in rows_of(split)) == [[2], [3], [4], [4]]
    assert sorted(t for r in rows_of(split) for t in r[0]) == list(range(1, 14))
    drop = pack(*flat(docs), max_length=4, truncation="drop")  # Axolotl's way: too long → left out whole
    assert (drop.metrics["tokens_out"], drop.metrics["tokens_truncated"]) == (3, 10)
    assert drop.metrics["documents_dropped_too_long"] == 1
    assert [r[0] for r in rows_of(drop)] == [[11, 12, 13]]


def test_documents_without_loss_are_dropped_and_counted():
    # a one-token document has no prediction to train once its first label is masked
    one = pack(*flat(toy_docs([1, 2])), max_length=8).metrics
    assert (one["documents"], one["documents_dropped_no_loss"], one["tokens_out"]) == (1, 1, 2)
    docs = toy_docs([3, 6])
    docs[1] = (docs[1][0], [IGNORE_INDEX] * 3 + docs[1][1][3:])  # its answer is in the last 3 tokens
    p = pack(*flat(docs), max_length=3)
    m = p.metrics
    assert (m["documents"], m["documents_dropped_no_loss"], m["tokens_dropped_no_loss"]) == (1, 1, 3)
    assert m["tokens_out"] + m["tokens_truncated"] + m["tokens_dropped_no_loss"] == m["tokens_in"]


# ---- the loss contract with train ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = yaml.safe_load((CONF_DIR / "model" / "tiny_llama.yaml").read_text())
    dest = tmp_path_factory.mktemp("tiny") / "model"
    materialize_model(cfg, dest, dest.parent / "downloads")
    return dest


def documents(tokenizer) -> list[tuple[list[int], list[int]]]:
    """Chat documents of different lengths, trained on inputs too so every first label would count."""
    template = validate(compose(["template=chatml"]))["template"]  # as a run composes it
    convs = [
        [{"system": "Colours.", "input": "acid green", "output": "#8ffe09"}],
        [{"input": "a long question about the colour of the evening sky", "output": "#ff7f50, coral"}],
        [{"input": "hi", "output": "hello"}, {"input": "and?", "output": "bye"}],
        [{"input": "blue", "output": "#0000ff"}],
    ]
    return [encode_conversation(tokenizer, template, c, train_on_inputs=True) for c in convs]


def loss(model, ids, labels, position_ids=None) -> torch.Tensor:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([ids]),
            labels=torch.tensor([labels]),
            position_ids=None if position_ids is None else torch.tensor([position_ids]),
            use_cache=False,
        )
    return out.loss.double()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_token_weighted_loss_of_documents_alone(tiny, attn):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation=attn).eval()
    docs = documents(tokenizer)
    assert all(labels[0] != IGNORE_INDEX for _, labels in docs)  # the first-label mask is really exercised
    p = pack(*flat(docs), max_length=4096)
    ((ids, labels, positions, doc_lens),) = rows_of(p)
    assert len(doc_lens) == len(docs)

    # reference: each document alone, weighted by the tokens its loss averages over
    total, weight = 0.0, 0
    start = 0
    for n in doc_lens:
        alone = next(d for d in docs if d[0] == ids[start : start + n])
        count = sum(label != IGNORE_INDEX for label in alone[1][1:])
        total += loss(model, *alone).item() * count
        weight += count
        start += n
    reference = total / weight

    packed = loss(model, ids, labels, positions).item()
    assert abs(packed - reference) < 1e-5, (packed, reference)

    # without per-document positions attention crosses documents: a visibly different loss
    naive = loss(model, ids, labels, list(range(len(ids)))).item()
    assert abs(naive - reference) > 1e-3, (naive, reference)
    # and without the first-label mask the row also trains across each boundary
    flat_labels = [t for d in sorted(docs, key=lambda d: -len(d[0])) for t in d[1]]
    unmasked = loss(model, ids, flat_labels, positions).item()
    assert abs(unmasked - reference) > 1e-3, (unmasked, reference)
