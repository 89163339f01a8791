"""Bad input, as a user types it: one line naming the file, row or config key, a non-zero exit, no traceback,
nothing half-written in the cache, and no entry for the stage that met the bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _alpaca(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _model_folder(path: Path, *, weights: bool, tokenizer: bool) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if weights:
        (path / "model.safetensors").write_bytes(b"\0" * 8)
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


GOOD_ROW = {"instruction": "hi", "input": "", "output": "hello"}
ALPACA = ("dataset.format=alpaca", "dataset.eval_size=0", "stages=[pack]")

# (case id, overrides built from tmp_path, what the one line must say)
CASES = [
    (
        "malformed JSON line",
        lambda t: [f"dataset.path={_alpaca(t / 'd.jsonl', [GOOD_ROW, '{broken'])}", *ALPACA],
        "d.jsonl:2: broken JSON line",
    ),
    (
        "missing field",
        lambda t: [f"dataset.path={_alpaca(t / 'd.jsonl', [{'instruction': 'x'}])}", *ALPACA],
        "d.jsonl:1: missing `output`",
    ),
    ("empty file", lambda t: [f"dataset.path={_alpaca(t / 'd.jsonl', [])}", *ALPACA], "no rows in d.jsonl"),
    ("empty folder", lambda t: [f"dataset.path={(t / 'dir').mkdir() or t / 'dir'}", *ALPACA], "no ['.csv'"),
    ("unknown format", lambda t: ["dataset.format=yaml"], "dataset.format"),
    ("unknown template", lambda t: ["template=nope"], "template"),
    ("unknown recipe", lambda t: ["+recipe=nope"], "recipe"),
    ("unknown model path", lambda t: [f"model.path={t / 'missing'}"], "no such file or folder"),
    (
        "model folder without weights",
        lambda t: [f"model.path={_model_folder(t / 'm', weights=False, tokenizer=True)}"],
        "has config.json but no weights",
    ),
    (
        "model folder without tokenizer",
        lambda t: [f"model.path={_model_folder(t / 'm', weights=True, tokenizer=False)}"],
        "has no tokenizer",
    ),
    (
        "a .gguf that is not one",
        lambda t: [f"model.path={(t / 'fake.gguf').write_bytes(b'nope') and t / 'fake.gguf'}"],
        "is not a GGUF file",
    ),
    ("typo in an override key", lambda t: ["optimizer.lrr=1"], "optimizer.lrr"),
    ("wrong value type", lambda t: ["train.epochs=many"], "train.epochs"),
    ("negative lr", lambda t: ["optimizer.lr=-1"], "optimizer.lr"),
    ("unknown train method", lambda t: ["train.method=qlora_full"], "train.method"),
    ("ZeRO-3 + 4-bit", lambda t: ["train.method=qlora", "launcher=deepspeed_zero3"], "ZeRO-3 cannot shard"),
    ("colorist without held-out rows", lambda t: ["dataset.eval_size=0"], "dataset.eval_size"),
    ("cache_dir is a file", lambda t: [f"cache_dir={(t / 'f').write_text('') or t / 'f'}"], "is a file"),
]


REPORT = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
SEEN: dict[str, str] = {}  # case -> the line the user saw (tmp paths replaced)


def user_line(out: str, expected: str, tmp_path: Path) -> str:
    line = next(line for line in out.splitlines() if expected in line)
    line = line.split("] - ", 1)[-1].removeprefix("error: ")  # Hydra's log prefix, the verbs' prefix
    return line.replace(str(tmp_path), "<tmp>")


@pytest.mark.parametrize(("case", "overrides", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line_and_leaves_no_entry(tmp_path, case, overrides, expected):
    cache = tmp_path / "cache"
    args = ["model=tiny_llama", *overrides(tmp_path)]
    env = {**os.environ, "FTPIPE_CACHE": str(cache), "HYDRA_FULL_ERROR": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "ftpipe", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-2000:]
    assert expected in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    assert not list(cache.glob("*/*.tmp"))  # nothing half-written
    # nothing past what was fine: a bad row leaves the fetched model and rows cached, never a map entry
    assert {p.parts[-3] for p in cache.glob("*/*/manifest.json")} <= {"download-model", "download-data"}
    SEEN[case] = user_line(out, expected, tmp_path)


def test_docs_reliability_md_shows_the_line_each_bad_input_gets():
    """docs/reliability.md is this suite's table; FTPIPE_WRITE_DOCS=1 rewrites it, otherwise it must match."""
    if len(SEEN) < len(CASES):
        pytest.skip("run with the bad-input cases above (not alone)")
    bar = "\\|"  # a | inside a table cell
    rows = "\n".join(f"| {case} | {SEEN[case].strip().replace('|', bar)} |" for case, _, _ in CASES)
    table = (
        "# Reliability: bad input and faults\n\n"
        "Generated by `FTPIPE_WRITE_DOCS=1 pytest tests/faults/test_bad_input.py`; the default suite checks that it is\n"
        f"current. {len(CASES)} bad inputs tried, {len(SEEN)} answered with one line (exit ≠ 0, no traceback, nothing\n"
        "half-written in the cache). Faults: `tests/faults/test_sigkill_each_stage.py` kills each of the eight stages\n"
        "at a random point in turn (8 of 8 killed inside the stage in its last run, all recovered: the rerun completes,\n"
        "`ftpipe cache verify` finds nothing damaged); `test_interrupt.py` (Ctrl-C in train), `tests/test_engine.py`\n"
        "(damaged entries recomputed, two runs on one key compute it once), `tests/training/test_launch.py` (a\n"
        "killed rank or torchrun agent).\n\n"
        "| bad input | what the user sees |\n|---|---|\n" + rows + "\n"
    )
    if os.environ.get("FTPIPE_WRITE_DOCS"):
        REPORT.write_text(table)
    # current in substance: every case has its row, saying what the test demands (library wording may vary)
    written = {line.split(" | ")[0].removeprefix("| "): line for line in REPORT.read_text().splitlines()}
    for case, _, expected in CASES:
        assert expected in written.get(case, ""), (
            f"docs/reliability.md is stale for {case!r}: FTPIPE_WRITE_DOCS=1"
        )
