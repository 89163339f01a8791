"""Bad input, as a user types it: one line naming the file, row or config key, a non-zero exit, no traceback,
nothing half-written in the cache, and no entry for the stage that met the bad input."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
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
LONG_ROW = {"instruction": "word " * 60, "input": "", "output": "answer " * 30}
ALPACA = ("dataset.format=alpaca", "dataset.eval_size=0", "stages=[pack]")
NOBODY = 65534  # cases about permissions run as this user when the suite runs as root (root reads anything)


def _unreadable(path: Path) -> Path:
    _alpaca(path, [GOOD_ROW]).chmod(0)
    return path


def _read_only_dir(path: Path) -> Path:
    path.mkdir(mode=0o555)
    return path


# (case id, overrides built from the run's folder, what the one line must say, options):
# `user`: run as another user (permission cases); `reached`: stages allowed to have committed before the bad
# input was met (by default only the downloads)
CASES = [
    (
        "malformed JSON line",
        lambda t: [f"dataset.path={_alpaca(t / 'd.jsonl', [GOOD_ROW, '{broken'])}", *ALPACA],
        "d.jsonl:2: broken JSON line",
        {},
    ),
    (
        "missing field",
        lambda t: [f"dataset.path={_alpaca(t / 'd.jsonl', [{'instruction': 'x'}])}", *ALPACA],
        "d.jsonl:1: missing `output`",
        {},
    ),
    (
        "wrong field type",
        lambda t: [f"dataset.path={_alpaca(t / 'd.jsonl', [{**GOOD_ROW, 'output': 5}])}", *ALPACA],
        "d.jsonl:1: `output` must be a string, got int",
        {},
    ),
    (
        "answers all empty",
        lambda t: [f"dataset.path={_alpaca(t / 'd.jsonl', [{**GOOD_ROW, 'output': ''}] * 2)}", *ALPACA],
        "d.jsonl:2: empty `output`",
        {},
    ),
    (
        "empty file",
        lambda t: [f"dataset.path={_alpaca(t / 'd.jsonl', [])}", *ALPACA],
        "no rows in d.jsonl",
        {},
    ),
    (
        "empty folder",
        lambda t: [f"dataset.path={(t / 'dir').mkdir() or t / 'dir'}", *ALPACA],
        "no ['.csv'",
        {},
    ),
    (
        "all rows longer than max_length (truncation=drop)",
        lambda t: [
            f"dataset.path={_alpaca(t / 'd.jsonl', [LONG_ROW] * 3)}",
            *ALPACA,
            "dataset.max_length=32",
            "dataset.truncation=drop",
        ],
        "all 3 samples are longer than dataset.max_length=32",
        {"reached": {"map"}},
    ),
    (
        "unreadable file (permissions)",
        lambda t: [f"dataset.path={_unreadable(t / 'd.jsonl')}", *ALPACA],
        "Permission denied: <tmp>/d.jsonl",
        {"user": NOBODY},
    ),
    ("unknown format", lambda t: ["dataset.format=yaml"], "dataset.format", {}),
    ("unknown template", lambda t: ["template=nope"], "Could not find 'template/nope'", {}),
    ("unknown recipe", lambda t: ["+recipe=nope"], "Could not find 'recipe/nope'", {}),
    ("unknown model path", lambda t: [f"model.path={t / 'missing'}"], "no such file or folder", {}),
    (
        "model folder without weights",
        lambda t: [f"model.path={_model_folder(t / 'm', weights=False, tokenizer=True)}"],
        "has config.json but no weights",
        {},
    ),
    (
        "model folder without tokenizer",
        lambda t: [f"model.path={_model_folder(t / 'm', weights=True, tokenizer=False)}"],
        "has no tokenizer",
        {},
    ),
    (
        "a .gguf that is not one",
        lambda t: [f"model.path={(t / 'fake.gguf').write_bytes(b'nope') and t / 'fake.gguf'}"],
        "is not a GGUF file",
        {},
    ),
    ("typo in an override key", lambda t: ["optimizer.lrr=1"], "Could not override 'optimizer.lrr'", {}),
    ("wrong value type", lambda t: ["train.epochs=many"], "train.epochs=many", {}),
    ("non-numeric lr", lambda t: ["optimizer.lr=abc"], "optimizer.lr=abc", {}),
    ("negative lr", lambda t: ["optimizer.lr=-1"], "optimizer.lr", {}),
    ("negative MLP chunk", lambda t: ["train.speed.mlp_chunk_tokens=-5"], "train.speed.mlp_chunk_tokens", {}),
    ("negative profile steps", lambda t: ["train.profile.steps=-1"], "train.profile.steps", {}),
    ("unknown train method", lambda t: ["train.method=qlora_full"], "train.method", {}),
    (
        "ZeRO-3 + 4-bit",
        lambda t: ["train.method=qlora", "launcher=deepspeed_zero3"],
        "ZeRO-3 cannot shard",
        {},
    ),
    (
        "8-bit AdamW under DeepSpeed",
        lambda t: ["optimizer=adamw_8bit", "launcher=deepspeed_zero2"],
        "adamw_8bit runs under launcher=local or torchrun",
        {},
    ),
    ("fp16 on CPU", lambda t: ["train.precision=fp16"], "fp16 needs a CUDA GPU", {}),
    ("colorist without held-out rows", lambda t: ["dataset.eval_size=0"], "dataset.eval_size", {}),
    ("cache_dir is a file", lambda t: [f"cache_dir={(t / 'f').write_text('') or t / 'f'}"], "is a file", {}),
    (
        "cache_dir not writable",
        lambda t: [f"cache_dir={_read_only_dir(t / 'ro')}"],
        "cache_dir=<tmp>/ro is not writable",
        {"user": NOBODY},
    ),
]
# bad input met by a fault test elsewhere in this file, with the words its line must hold
FAULT_ROWS = [("a disk that fills during download", "filled up while writing")]

REPORT = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
SEEN: dict[str, str] = {}  # case -> the line the user saw (tmp paths replaced)


def user_line(out: str, expected: str, where: Path) -> str:
    out = out.replace(str(where), "<tmp>")
    line = next(line for line in out.splitlines() if expected in line)
    return line.split("] - ", 1)[-1].removeprefix("error: ")  # Hydra's log prefix, the verbs' prefix


def run_ftpipe(args: list[str], where: Path, cache: Path, user: int | None = None, **kw):
    env = {**os.environ, "FTPIPE_CACHE": str(cache), "HYDRA_FULL_ERROR": "0", "HOME": str(where)}
    prefix = []
    if user is not None:
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "ftpipe", *args],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


@functools.cache
def _can_import_ftpipe_as(user: int) -> bool:
    cmd = [
        "setpriv",
        f"--reuid={user}",
        f"--regid={user}",
        "--clear-groups",
        sys.executable,
        "-c",
        "import ftpipe",
    ]
    return subprocess.run(cmd, cwd="/", capture_output=True, timeout=120).returncode == 0


@pytest.mark.parametrize(("case", "overrides", "expected", "options"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line_and_leaves_no_entry(tmp_path, case, overrides, expected, options):
    where, user = tmp_path, None
    if options.get("user") is not None and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("runs as root without setpriv: root reads and writes anything")
        if not _can_import_ftpipe_as(options["user"]):
            pytest.skip(
                f"user {options['user']} cannot import this checkout's ftpipe (a folder only root may enter, "
                "such as a 0700 mktemp folder): the permission cases need another user who can run ftpipe"
            )
        # another user can reach neither pytest's tmp_path nor root's home: a folder of its own
        user = options["user"]
        where = Path(tempfile.mkdtemp(prefix="ftpipe-bad-"))
        os.chown(where, user, user)  # its own run folder (Hydra writes outputs/ there)
    try:
        cache = where / "cache"
        cache.mkdir()
        if user is not None:
            os.chown(cache, user, user)
        done = run_ftpipe(["model=tiny_llama", *overrides(where)], where, cache, user)
        out = done.stdout + done.stderr
        assert done.returncode != 0, out[-2000:]
        assert expected.replace("<tmp>", str(where)) in out, out[-2000:]
        assert "Traceback" not in out, out[-3000:]
        assert not list(cache.glob("*/*.tmp"))  # nothing half-written
        # nothing past what was fine: a bad row leaves the fetched model and rows cached, never a later entry
        committed = {p.parts[-3] for p in cache.glob("*/*/manifest.json")}
        assert committed <= {"download-model", "download-data", *options.get("reached", ())}
        SEEN[case] = user_line(out, expected, where)
    finally:
        if where != tmp_path:
            shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB filesystem (tmpfs): room for the data, not for the model. Needs root (mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()[:200]}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_disk_that_fills_during_download_says_so_and_keeps_earlier_entries(tmp_path, small_disk):
    cache, args = small_disk / "cache", ["model=tiny_llama", "+recipe=assistant_lora", "dataset.name=Ada"]
    first = run_ftpipe([*args, "stages=[download-data]"], tmp_path, cache)
    assert first.returncode == 0, first.stderr[-2000:]

    full = run_ftpipe([*args, "stages=[download-model]"], tmp_path, cache)  # the tiny model is ~16 MB
    out = full.stdout + full.stderr
    assert full.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert "download-model: the disk holding" in out and "filled up while writing" in out, out[-2000:]
    assert not list(cache.glob("*/*.tmp"))
    assert [p.parts[-3] for p in cache.glob("*/*/manifest.json")] == ["download-data"]
    verify = run_ftpipe(["cache", "verify", "--cache-dir", str(cache)], tmp_path, cache)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    SEEN[FAULT_ROWS[0][0]] = user_line(out, FAULT_ROWS[0][1], tmp_path)

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    again = run_ftpipe([*args, "stages=[download]"], tmp_path, cache)
    assert again.returncode == 0, again.stderr[-2000:]
    log = again.stdout + again.stderr
    assert "[download-data] hit" in log and "[download-model] ran" in log, log[-2000:]


def test_docs_reliability_md_shows_the_line_each_bad_input_gets():
    """docs/reliability.md is this suite's table; FTPIPE_WRITE_DOCS=1 rewrites it, otherwise it must match."""
    rows_wanted = [(case, expected) for case, _, expected, _ in CASES] + FAULT_ROWS
    if len(SEEN) < len(rows_wanted):
        pytest.skip("run with the bad-input cases above (not alone)")
    bar = "\\|"  # a | inside a table cell
    rows = "\n".join(f"| {case} | {SEEN[case].strip().replace('|', bar)} |" for case, _ in rows_wanted)
    table = (
        "# Reliability: bad input and faults\n\n"
        "Generated by `FTPIPE_WRITE_DOCS=1 pytest tests/faults/test_bad_input.py`; the default suite checks that it is\n"
        f"current. {len(rows_wanted)} bad inputs tried, {len(SEEN)} answered with one line (exit ≠ 0, no traceback,\n"
        "nothing half-written in the cache). Faults: `tests/faults/test_sigkill_each_stage.py` kills each of the nine\n"
        "stages at a random point in turn (9 of 9 killed inside the stage in its last run, all recovered: the rerun\n"
        "completes, `ftpipe cache verify` finds nothing damaged); `test_interrupt.py` (Ctrl-C in train),\n"
        "`tests/test_engine.py` (damaged entries recomputed, two runs on one key compute it once),\n"
        "`tests/training/test_launch.py` (a killed rank or torchrun agent), and the full disk above (a 4 MiB tmpfs:\n"
        "the error names the stage, no entry is left, the earlier entry verifies and is a hit once there is room).\n\n"
        "| bad input | what the user sees |\n|---|---|\n" + rows + "\n"
    )
    if os.environ.get("FTPIPE_WRITE_DOCS"):
        REPORT.write_text(table)
    # current in substance: every case has its row, saying what the test demands (library wording may vary)
    written = {line.split(" | ")[0].removeprefix("| "): line for line in REPORT.read_text().splitlines()}
    for case, expected in rows_wanted:
        assert expected in written.get(case, ""), (
            f"docs/reliability.md is stale for {case!r}: FTPIPE_WRITE_DOCS=1"
        )
