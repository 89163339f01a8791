"""Raw rows → conversations: one fixture per format, the readers' FILE:LINE numbering, splits and bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftpipe.data.formats import convert_rows, iter_raw_rows, load_conversations
from ftpipe.data.sources import count_rows
from ftpipe.errors import FtpipeError

# XTuner's SYSTEM_TEMPLATE.alpaca and SYSTEM_TEMPLATE.colorist, verbatim: the formats' default system prompts
ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
COLORIST_SYSTEM = (
    "You are a professional color designer. Please provide the corresponding colors based on the description of "
    "Human.\n"
)


def make_data_dir(tmp_path: Path, files: dict[str, str], eval_rows: list[int] = ()) -> Path:
    """A download-stage `data/` folder: raw files plus split.json."""
    data = tmp_path / "data"
    (data / "raw").mkdir(parents=True)
    for name, text in files.items():
        (data / "raw" / name).write_text(text)
    (data / "split.json").write_text(json.dumps({"files": list(files), "eval_rows": list(eval_rows)}))
    return data


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)


FIXTURES = {
    "conversation": (
        [
            {
                "conversation": [
                    {
                        "system": "You are Bob's assistant.",
                        "input": "Who are you?",
                        "output": "Bob's helper.",
                    },
                    {"input": "Sure?", "output": "Yes."},
                ]
            },
            {"conversation": [{"input": "你是谁", "output": "我是小助手"}]},
        ],
        [
            [
                {"system": "You are Bob's assistant.", "input": "Who are you?", "output": "Bob's helper."},
                {"input": "Sure?", "output": "Yes."},
            ],
            [{"input": "你是谁", "output": "我是小助手"}],
        ],
    ),
    "alpaca": (
        [
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": "Unanswerable.", "input": "", "output": "<nooutput>"},
        ],
        [
            [{"system": ALPACA_SYSTEM, "input": "Add the numbers.\n2 and 3", "output": "5"}],
            [{"system": ALPACA_SYSTEM, "input": "Say hi.", "output": "Hi!"}],
        ],
    ),
    "openai": (
        [
            {
                "messages": [
                    {"role": "assistant", "content": "Hello, ask me anything."},
                    {"role": "system", "content": "Be terse."},
                    {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."},
                    {"role": "user", "content": "And Italy?"},
                    {"role": "assistant", "content": "Rome."},
                    {"role": "user", "content": "Thanks"},
                ]
            }
        ],
        [
            [
                {"system": "Be terse.", "input": "Capital of France?", "output": "Paris."},
                {"input": "And Italy?", "output": "Rome."},
            ]
        ],
    ),
    "oasst1": (
        [
            {
                "text": "### Human: Can you explain tides?### Assistant: The moon pulls the sea."
                "### Human: Why twice a day?### Assistant: Two bulges.### Human: ok thanks"
            }
        ],
        [
            [
                {"input": "Can you explain tides?", "output": "The moon pulls the sea."},
                {"input": "Why twice a day?", "output": "Two bulges."},
            ]
        ],
    ),
    "colors": (
        [
            {"description": "Acid Green: acid green", "color": "#8ffe09"},
            {"description": "Sky: light blue: like the sky ", "color": "#75bbfd"},
        ],
        [
            [{"system": COLORIST_SYSTEM, "input": "acid green", "output": "#8ffe09"}],
            [
                {
                    "system": COLORIST_SYSTEM,
                    "input": "light blue: like the sky",
                    "output": "#75bbfd",
                }
            ],
        ],
    ),
    "pretrain": (
        [{"text": "Once upon a time."}, {"text": "The end."}],
        [[{"input": "", "output": "Once upon a time."}], [{"input": "", "output": "The end."}]],
    ),
}


@pytest.mark.parametrize("fmt", list(FIXTURES))
def test_each_format_fixture_becomes_the_expected_conversations(tmp_path, fmt):
    rows, expected = FIXTURES[fmt]
    data = make_data_dir(tmp_path, {"rows.jsonl": jsonl(*rows)})
    train, evals, report = load_conversations(data, {"format": fmt})
    assert train == expected and evals == []
    assert report["format"] == fmt and report["rows"] == len(rows)
    assert report["rows_dropped"] == (1 if fmt == "alpaca" else 0)


@pytest.mark.parametrize("fmt", list(FIXTURES))
def test_auto_detects_each_format_and_says_so(tmp_path, fmt, caplog):
    rows, expected = FIXTURES[fmt]
    data = make_data_dir(tmp_path, {"rows.jsonl": jsonl(*rows)})
    with caplog.at_level("INFO", logger="ftpipe"):
        train, _, report = load_conversations(data, {"format": "auto"})
    assert report["format"] == fmt and report["format_detected"] is True
    assert train == expected
    assert f"detected {fmt!r} from the keys of rows.jsonl:1" in caplog.text


def test_eval_rows_are_indices_among_non_blank_rows_across_files(tmp_path):
    a = jsonl(*[{"text": f"a{i}"} for i in range(3)])
    b = "\n" + jsonl({"text": "b0"}) + "\n\n" + jsonl({"text": "b1"})
    data = make_data_dir(tmp_path, {"a.jsonl": a, "b.jsonl": b}, eval_rows=[1, 4])
    assert sum(count_rows(data / "raw" / f) for f in ("a.jsonl", "b.jsonl")) == 5
    train, evals, report = load_conversations(data, {"format": "pretrain"})
    assert [c[0]["output"] for c in train] == ["a0", "a2", "b0"]
    assert [c[0]["output"] for c in evals] == ["a1", "b1"]
    assert (report["rows_train"], report["rows_eval"]) == (3, 2)


def test_readers_give_the_line_of_each_row_in_every_file_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.json").write_text('[\n  {"text": "x"},\n\n  {"text":\n "y"},  {"text": "z"}\n]\n')
    (raw / "b.csv").write_text('text,other\n"multi\nline",1\n\nplain,2\n')
    pq.write_table(pa.table({"text": ["p", "q"]}), raw / "c.parquet")
    (raw / "d.jsonl").write_text('{"text": "ok"}\n\n{"text": broken\n')
    rows = list(iter_raw_rows(raw, ["a.json", "b.csv", "c.parquet", "d.jsonl"]))
    assert [(r.where, r.index) for r in rows] == [
        ("a.json:2", 0),
        ("a.json:4", 1),
        ("a.json:5", 2),
        ("b.csv:2", 3),
        ("b.csv:4", 4),  # a blank record: no data, no problem, but it has an index as in count_rows
        ("b.csv:5", 5),
        ("c.parquet:1", 6),
        ("c.parquet:2", 7),
        ("d.jsonl:1", 8),
        ("d.jsonl:3", 9),
    ]
    assert rows[3].data == {"text": "multi\nline", "other": "1"}
    assert rows[4].data is None and rows[4].error is None
    assert rows[9].error and rows[9].error.startswith("broken JSON line")
    # the same numbering as the download stage's held-out row choice
    assert sum(count_rows(raw / f) for f in ("a.json", "b.csv", "c.parquet", "d.jsonl")) == len(rows)


def test_bad_rows_are_reported_with_file_line_and_reason(tmp_path):
    rows = [
        {"instruction": "fine", "output": "ok"},
        "{not json",
        {"instruction": "no output"},
        {"instruction": "", "output": "empty instruction"},
        {"instruction": ["a"], "output": "wrong type"},
        [1, 2],
    ]
    data = make_data_dir(tmp_path, {"rows.jsonl": jsonl(*rows)})
    converted = convert_rows(data, {"format": "alpaca"})
    assert [str(p) for p in converted.problems] == [
        "rows.jsonl:2: broken JSON line: Expecting property name enclosed in double quotes",
        "rows.jsonl:3: missing `output` (format alpaca)",
        "rows.jsonl:4: empty `instruction` (format alpaca)",
        "rows.jsonl:5: `instruction` must be a string, got list (format alpaca)",
        "rows.jsonl:6: expected a JSON object, got list (format alpaca)",
    ]
    with pytest.raises(FtpipeError) as err:
        load_conversations(data, {"format": "alpaca"})
    assert "5 bad row(s)" in str(err.value) and "rows.jsonl:3: missing `output`" in str(err.value)
    assert "dataset.skip_bad_rows=true" in str(err.value)
    train, _, report = load_conversations(data, {"format": "alpaca", "skip_bad_rows": True})
    assert len(train) == 1 and report["rows_skipped"] == 5


def test_error_lists_the_first_twenty_problems_and_the_total(tmp_path):
    data = make_data_dir(tmp_path, {"rows.jsonl": jsonl(*[{"text": ""}] * 30)})
    with pytest.raises(FtpipeError) as err:
        load_conversations(data, {"format": "pretrain"})
    msg = str(err.value)
    assert "30 bad row(s)" in msg and "rows.jsonl:20: empty `text`" in msg
    assert "rows.jsonl:21:" not in msg and "… and 10 more" in msg


@pytest.mark.parametrize(
    ("fmt", "row", "reason"),
    [
        ("conversation", {"conversation": [{"input": "q"}]}, "conversation turn 1: missing `output`"),
        ("conversation", {"conversation": []}, "must be a non-empty list"),
        ("openai", {"messages": [{"role": "user", "content": "q"}]}, "no assistant reply"),
        ("openai", {"messages": [{"role": "tool", "content": "q"}]}, "role 'tool' is not one of"),
        ("oasst1", {"text": "### Human: only a question"}, "has no '### Human: … ### Assistant: …' turn"),
        ("colors", {"description": "Red: red", "color": "red"}, "is not a #rrggbb hex colour"),
        ("colors", {"description": "Nameless", "color": "#ff0000"}, "has no text after its 'Name:' prefix"),
        ("colors", {"description": "Red: ", "color": "#ff0000"}, "has no text after its 'Name:' prefix"),
    ],
)
def test_format_specific_problems(tmp_path, fmt, row, reason):
    data = make_data_dir(tmp_path, {"rows.jsonl": jsonl(row)})
    (problem,) = convert_rows(data, {"format": fmt}).problems
    assert problem.line == 1 and reason in problem.reason


def test_dataset_system_overrides_or_removes_the_system_prompt(tmp_path):
    rows, _ = FIXTURES["colors"]
    data = make_data_dir(tmp_path, {"rows.jsonl": jsonl(*rows)})
    train, _, _ = load_conversations(data, {"format": "colors", "system": "Hex only."})
    assert train[0] == [{"system": "Hex only.", "input": "acid green", "output": "#8ffe09"}]
    train, _, _ = load_conversations(data, {"format": "colors", "system": ""})
    assert train[0] == [{"input": "acid green", "output": "#8ffe09"}]
    assert all("system" not in turn for conv in train for turn in conv)


def test_colors_rows_get_xtuners_colorist_prompt_by_default(tmp_path):
    rows, _ = FIXTURES["colors"]
    data = make_data_dir(tmp_path, {"rows.jsonl": jsonl(*rows)})
    for cfg in ({"format": "colors"}, {"format": "colors", "system": None}):
        train, _, _ = load_conversations(data, cfg)
        assert [conv[0]["system"] for conv in train] == [COLORIST_SYSTEM] * len(rows)


@pytest.mark.parametrize("fmt", ["conversation", "openai"])
@pytest.mark.parametrize("system", ["", "Be kind."])
def test_dataset_system_replaces_the_default_not_the_rows_own_system_turns(tmp_path, fmt, system):
    """A recipe's `dataset.system` (colorist_lora: "") must not erase the system turns of a user's own file."""
    rows, expected = FIXTURES[fmt]
    data = make_data_dir(tmp_path, {"rows.jsonl": jsonl(*rows)})
    train, _, _ = load_conversations(data, {"format": fmt, "system": system})
    own = [conv for conv in expected if any("system" in turn for turn in conv)]
    assert own and all(conv in train for conv in own)  # rows with a system turn are kept as they are
    for conv, want in zip(train, expected, strict=True):
        if want not in own:  # rows without one get dataset.system, if any
            assert conv == ([{"system": system, **want[0]}, *want[1:]] if system else want)


def test_char_level_answers_marks_every_turn(tmp_path):
    rows, _ = FIXTURES["colors"]
    data = make_data_dir(tmp_path, {"rows.jsonl": jsonl(*rows)})
    train, _, _ = load_conversations(data, {"format": "colors", "char_level_answers": True})
    assert all(turn["char_level"] is True for conv in train for turn in conv)


def test_a_broken_json_array_file_is_reported_at_its_line(tmp_path):
    data = make_data_dir(tmp_path, {"rows.json": '[\n{"text": "a"},\n{"text": "b",,}\n]'})
    converted = convert_rows(data, {"format": "pretrain"})
    assert [str(p).split(":")[:2] for p in converted.problems] == [["rows.json", "3"]]
    assert len(converted.train) == 1


def test_a_wrong_format_hints_at_the_one_the_rows_look_like(tmp_path):
    rows, _ = FIXTURES["alpaca"]
    data = make_data_dir(tmp_path, {"rows.jsonl": jsonl(*rows)})
    with pytest.raises(FtpipeError, match="look like format 'alpaca': set dataset.format=alpaca"):
        load_conversations(data, {"format": "colors"})
