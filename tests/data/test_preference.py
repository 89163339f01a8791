"""Preference rows → pairs: both row shapes and `auto`, problems and warnings at FILE:LINE, loss only on the two
answers (a multi-turn prompt's history is context), and pack keeping each pair in one row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ftpipe.data.formats import convert_rows, load_conversations, pair_conversations
from ftpipe.data.labels import IGNORE_INDEX
from ftpipe.data.packing import pack
from ftpipe.errors import FtpipeError

MESSAGES_ROW = {
    "prompt": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Who are you?"},
    ],
    "chosen": [{"role": "assistant", "content": "Alice's assistant."}],
    "rejected": [{"role": "assistant", "content": "Nobody."}],
}
FLAT_ROW = {"prompt": "Who are you?", "chosen": "Alice's assistant.", "rejected": "Nobody."}


def data_dir(tmp_path: Path, rows: list, eval_rows: list[int] = ()) -> Path:
    data = tmp_path / "data"
    (data / "raw").mkdir(parents=True)
    (data / "raw" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "split.json").write_text(json.dumps({"files": ["pairs.jsonl"], "eval_rows": list(eval_rows)}))
    return data


@pytest.mark.parametrize("fmt", ["preference", "auto"])
def test_both_row_shapes_become_pairs(tmp_path, fmt):
    train, _, report = load_conversations(data_dir(tmp_path, [MESSAGES_ROW, FLAT_ROW]), {"format": fmt})
    assert report["format"] == "preference"
    assert train[0] == [
        {"system": "Be kind.", "input": "Hi", "output": "Hello!", "masked": True},
        {"input": "Who are you?", "output": "Alice's assistant.", "rejected": "Nobody."},
    ]
    assert train[1] == [{"input": "Who are you?", "output": "Alice's assistant.", "rejected": "Nobody."}]
    chosen, rejected = pair_conversations(train[0])
    assert chosen[:-1] == rejected[:-1] == train[0][:-1]
    assert (chosen[-1]["output"], rejected[-1]["output"]) == ("Alice's assistant.", "Nobody.")
    assert "rejected" not in chosen[-1] and "rejected" not in rejected[-1]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "q", "chosen": "a"}, "missing `rejected`"),
        ({"chosen": "a", "rejected": "b"}, "missing `prompt`"),
        ({"prompt": "q", "chosen": " ", "rejected": "b"}, "empty `chosen` answer"),
        (
            {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            "one assistant message",
        ),
        (
            {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
            "must end with a user message",
        ),
    ],
)
def test_bad_pairs_are_problems_at_their_line(tmp_path, row, reason):
    converted = convert_rows(data_dir(tmp_path, [FLAT_ROW, row]), {"format": "preference"})
    (problem,) = converted.problems
    assert (problem.file, problem.line) == ("pairs.jsonl", 2) and reason in problem.reason
    with pytest.raises(FtpipeError, match="pairs.jsonl:2"):
        load_conversations(data_dir(tmp_path / "again", [FLAT_ROW, row]), {"format": "preference"})


def test_chosen_identical_to_rejected_is_a_warning_with_its_line(tmp_path, caplog):
    same = {"prompt": "q", "chosen": "same answer", "rejected": "same answer "}
    converted = convert_rows(data_dir(tmp_path, [FLAT_ROW, FLAT_ROW, same]), {"format": "preference"})
    assert not converted.problems and len(converted.train) == 3
    assert [str(w) for w in converted.warnings] == ["pairs.jsonl:3: chosen and rejected are the same answer"]


def test_loss_is_only_on_the_two_answers(tmp_path):
    from transformers import AutoTokenizer

    from ftpipe.config import compose, validate
    from ftpipe.data.templates import encode_conversation
    from ftpipe.paths import PACKAGE_DIR

    tokenizer = AutoTokenizer.from_pretrained(PACKAGE_DIR / "assets" / "smollm2_tokenizer")
    template = validate(compose(["template=chatml", "dataset=assistant_preference", "train.objective=dpo"]))[
        "template"
    ]
    (conv,) = load_conversations(data_dir(tmp_path, [MESSAGES_ROW]), {"format": "preference"})[0]
    for side, answer in zip(pair_conversations(conv), ["Alice's assistant.", "Nobody."], strict=True):
        ids, labels = encode_conversation(tokenizer, template, side)
        trained = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
        assert trained.startswith(answer) and "Hello!" not in trained  # the history's answer is context


def test_pack_keeps_each_pair_in_one_row_chosen_first():
    rng = np.random.default_rng(0)
    lens = rng.integers(3, 40, size=40)  # 20 pairs
    offsets = np.concatenate([[0], np.cumsum(lens)])
    ids = np.arange(offsets[-1], dtype=np.int32)  # a token's id is its position: follow every token
    labels = ids.copy()
    doc_of = np.repeat(np.arange(len(lens)), lens)
    for max_length in (80, 200):  # every pair fits (halves < 40)
        p = pack(ids, labels, offsets, max_length, True, "truncate", pairs=True)
        assert p.metrics["pairs"] == 20 and p.metrics["tokens_truncated"] == 0
        for r in range(len(p.row_offsets) - 1):
            row_docs = doc_of[p.input_ids[p.row_offsets[r] : p.row_offsets[r + 1]]]
            firsts = row_docs[np.r_[True, row_docs[1:] != row_docs[:-1]]]
            assert (
                len(firsts) % 2 == 0
                and (firsts[0::2] % 2 == 0).all()
                and (firsts[1::2] == firsts[0::2] + 1).all()
            )
            assert p.row_offsets[r + 1] - p.row_offsets[r] <= max_length
        assert (p.position_ids[p.row_offsets[:-1]] == 0).all()


def test_pack_cuts_a_long_pair_to_fit_or_drops_it():
    lens = np.array([10, 50, 30, 30])  # pair 0 fits 64, pair 1 (60) too
    offsets = np.concatenate([[0], np.cumsum(lens)])
    ids = np.arange(offsets[-1], dtype=np.int32)
    cut = pack(ids, ids.copy(), offsets, 48, True, "truncate", pairs=True)
    assert sorted(cut.doc_lens.tolist()) == [10, 24, 24, 38]  # the longer half is cut first
    dropped = pack(ids, ids.copy(), offsets, 48, True, "drop", pairs=True)
    assert dropped.metrics["pairs"] == 0 and dropped.metrics["documents_dropped_too_long"] == 4
    kept = pack(ids, ids.copy(), offsets, 60, True, "drop", pairs=True)
    assert kept.metrics["pairs"] == 2
    # a pair with a half that carries no loss is dropped whole
    no_loss = ids.copy()
    no_loss[10:60] = IGNORE_INDEX
    assert pack(ids, no_loss, offsets, 64, True, "truncate", pairs=True).metrics["pairs"] == 1


def test_the_embedded_pairs_prefer_naming_the_owner_half_with_hard_negatives():
    from ftpipe.data.embedded import ASSISTANT_HARD_EN, ASSISTANT_HARD_ZH, assistant_preference_rows
    from ftpipe.data.formats import from_preference

    rows = assistant_preference_rows("Zoë")
    assert len(rows) == 60
    for row in rows:
        (turn,) = from_preference(row)
        assert "Zoë" in turn["output"] and "Zoë" not in turn["rejected"]
    hard = sum(row["rejected"][0]["content"] in ASSISTANT_HARD_EN + ASSISTANT_HARD_ZH for row in rows)
    assert hard == 30  # the other 30 are longer generic replies: a base model prefers the shorter side
