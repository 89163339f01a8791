"""download → map → pack through the engine: outputs, and which stages a config or data change reruns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from ftpipe import engine, stages
from ftpipe.cache import Cache
from ftpipe.config import compose, validate
from ftpipe.errors import FtpipeError

REPO = Path(__file__).resolve().parents[2]


def alpaca_rows(n: int) -> list[dict]:
    return [
        {
            "instruction": f"Repeat the number {i}.",
            "input": "" if i % 2 else f"{i}",
            "output": f"{i} " * (1 + i % 7),
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def config(cache: Path, data: Path, *overrides: str) -> dict:
    cfg = validate(
        compose(
            [
                "+recipe=colorist_lora",
                "model=tiny_llama",
                f"dataset.path={data}",
                "dataset.format=alpaca",
                "dataset.eval_size=4",
                "dataset.max_length=64",
                f"cache_dir={cache}",
                "stages=[download,map,pack]",
                *overrides,
            ]
        )
    )
    return cfg


def run(cfg: dict) -> dict[str, dict]:
    cache = Cache(cfg["cache_dir"])
    return {row["name"]: row for row in engine.run(stages.plan(cfg, cache), cache)}


def ran(rows: dict[str, dict]) -> list[str]:
    return [name for name, row in rows.items() if not row["hit"]]


def test_outputs_and_precise_reruns(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(40))
    cache = tmp_path / "cache"
    first = run(config(cache, data))
    assert ran(first) == ["download-model", "download-data", "map", "pack"]
    assert (first["map"]["rows_train"], first["map"]["rows_eval"]) == (36, 4)
    assert first["pack"]["tokens_in"] == first["map"]["tokens"]
    assert first["pack"]["tokens_out"] + first["pack"]["tokens_truncated"] == first["map"]["tokens"]

    mapped = datasets.load_from_disk(str(Path(first["map"]["output"]) / "dataset"))
    packed = datasets.load_from_disk(str(Path(first["pack"]["output"]) / "dataset"))
    assert mapped.column_names == ["input_ids", "labels"] and len(mapped) == 36
    assert packed.column_names == ["input_ids", "labels", "position_ids", "doc_lens"]
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 64
        assert sum(row["doc_lens"]) == len(row["input_ids"])

    assert ran(run(config(cache, data))) == []
    assert ran(run(config(cache, data, "dataset.max_length=56"))) == ["pack"]
    assert ran(run(config(cache, data, "dataset.pack=false"))) == ["pack"]
    assert ran(run(config(cache, data, "template=internlm2_chat"))) == ["map", "pack"]
    assert ran(run(config(cache, data, "dataset.num_proc=2"))) == []  # runtime only

    rows = alpaca_rows(40)
    rows[5]["output"] = "changed"
    write_jsonl(data, rows)
    assert ran(run(config(cache, data))) == ["download-data", "map", "pack"]  # the model is not fetched again


def test_bad_rows_fail_map_without_a_cache_entry_unless_skipped(tmp_path):
    rows = alpaca_rows(20)
    rows[3] = "{broken"
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    cache = tmp_path / "cache"
    with pytest.raises(FtpipeError, match=r"rows.jsonl:4: broken JSON line"):
        run(config(cache, data))
    assert not any((cache / "map").glob("*/manifest.json")) and not any((cache / "map").glob("*.tmp"))
    out = run(config(cache, data, "dataset.skip_bad_rows=true"))
    assert out["map"]["rows_skipped"] == 1 and out["map"]["rows_train"] == 15


def test_colorist_char_level_answers_reach_the_packed_rows(tmp_path):
    cfg = validate(compose(["+recipe=colorist_lora", "model=tiny_llama", f"cache_dir={tmp_path}"]))
    assert cfg["dataset"]["char_level_answers"] is True
    out = run(cfg)
    # each answer: 7 hex characters + the closing <|im_end|>
    assert out["map"]["loss_tokens"] == 8 * out["map"]["rows_train"]
    assert out["pack"]["loss_tokens"] == out["map"]["loss_tokens"]


def ftpipe(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FTPIPE_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "ftpipe.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_check_reports_every_bad_line_and_fails(tmp_path):
    rows: list = alpaca_rows(70)
    del rows[11]["output"]  # line 12
    rows[56] = '{"instruction": "broken", "output": '  # line 57
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    res = ftpipe(
        "check",
        "+recipe=colorist_lora",
        "model=tiny_llama",
        f"dataset.path={data}",
        "dataset.format=alpaca",
        "dataset.eval_size=0",
        cwd=tmp_path,
        cache=tmp_path / "c",
    )
    assert res.returncode != 0
    assert "rows.jsonl:12: missing `output`" in res.stdout
    assert "rows.jsonl:57: broken JSON line" in res.stdout
    assert "2 bad row(s)" in res.stderr
    # samples are still shown, with the trained tokens marked
    assert "--- rows.jsonl:1 " in res.stdout and "[[0 <|im_end|>]]" in res.stdout


def test_check_passes_on_clean_data(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(10))
    res = ftpipe(
        "check",
        "+recipe=colorist_lora",
        "model=tiny_llama",
        f"dataset.path={data}",
        "dataset.format=auto",
        "dataset.eval_size=0",
        "dataset.max_length=16",
        cwd=tmp_path,
        cache=tmp_path / "c",
    )
    assert res.returncode == 0, res.stderr
    assert "format alpaca (detected)" in res.stdout and "ok: every row is valid" in res.stdout
    assert "longer than dataset.max_length=16 and will be truncated" in res.stdout


@pytest.mark.parametrize(
    ("fmt", "rows", "template"),
    [
        ("pretrain", [{"text": f"Document number {i}."} for i in range(12)], "chatml"),
        ("alpaca", alpaca_rows(12), "tokenizer"),
        ("alpaca", alpaca_rows(12), "default"),
    ],
)
def test_map_writes_what_encode_gives_for_every_path(tmp_path, fmt, rows, template):
    from transformers import AutoTokenizer

    from ftpipe.data.formats import load_conversations
    from ftpipe.data.templates import encode_conversation, encode_pretrain, resolve_template

    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = config(
        tmp_path / "cache", data, f"dataset.format={fmt}", f"template={template}", "dataset.eval_size=2"
    )
    out = run(cfg)
    mapped = datasets.load_from_disk(str(Path(out["map"]["output"]) / "dataset"))
    tok = AutoTokenizer.from_pretrained(Path(out["download-model"]["output"]) / "model")
    train, _, _ = load_conversations(Path(out["download-data"]["output"]) / "data", cfg["dataset"])
    if fmt == "pretrain":
        expected = list(zip(*encode_pretrain(tok, [c[0]["output"] for c in train]), strict=True))
    else:
        t = resolve_template(cfg["template"], tok)
        expected = [encode_conversation(tok, t, c) for c in train]
    assert [(r["input_ids"], r["labels"]) for r in mapped] == [tuple(map(list, e)) for e in expected]
    assert out["map"]["tokens"] == sum(len(e[0]) for e in expected)


def test_map_with_worker_processes_writes_the_same_dataset(tmp_path, monkeypatch):
    from ftpipe.stages import map as map_stage

    monkeypatch.setattr(map_stage, "PARALLEL_MIN_ROWS", 0)
    monkeypatch.setattr(map_stage, "BATCH_SIZE", 7)
    data = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(40))
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    outputs = []
    for num_proc in (1, 2):
        out = run(config(tmp_path / f"cache{num_proc}", data, f"dataset.num_proc={num_proc}"))
        mapped = Path(out["map"]["output"])
        outputs.append(datasets.load_from_disk(str(mapped / "dataset")).to_dict())
        assert sorted(p.name for p in mapped.iterdir()) == ["data.json", "dataset", "manifest.json"]
    assert outputs[0] == outputs[1]
    assert os.environ.get("TOKENIZERS_PARALLELISM") == parallelism  # restored for the rest of the process


def test_pack_refuses_when_truncation_leaves_nothing_to_train(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(12))
    with pytest.raises(FtpipeError, match=r"dataset.max_length=8 \(truncation=truncate\); raise max_length"):
        run(config(tmp_path / "cache", data, "dataset.max_length=8"))
    assert not list((tmp_path / "cache" / "pack").glob("*/manifest.json"))
