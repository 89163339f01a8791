"""The stage engine's promises: stable keys, precise invalidation, atomic commits, one computation per key."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import toy_chain

from ftpipe import engine
from ftpipe.cache import Cache
from ftpipe.errors import FtpipeError

WORKER = Path(toy_chain.__file__)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text('{"x": 1}\n')
    log = tmp_path / "runs.log"
    monkeypatch.setenv("FTPIPE_TEST_LOG", str(log))
    for var in ("FTPIPE_TEST_FAIL", "FTPIPE_TEST_SLEEP"):
        monkeypatch.delenv(var, raising=False)
    cache = Cache(tmp_path / "cache")
    return cache, toy_chain.base_config(str(data)), log, data


def executions(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if " " not in line] if log.exists() else []


def keys(cfg, cache) -> dict[str, str]:
    return {s.stage.name: s.key for s in engine.plan(cfg, toy_chain.CHAIN, cache)}


def run(cfg, cache):
    return engine.run(engine.plan(cfg, toy_chain.CHAIN, cache), cache)


def worker(cache: Cache, cfg: dict, *extra: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(cache.root), json.dumps(cfg), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **kw,
    )


def test_same_config_same_key_in_another_process(setup):
    cache, cfg, _, _ = setup
    out, err = worker(cache, cfg, "--keys").communicate(timeout=60)
    assert json.loads(out) == keys(cfg, cache), err


def test_changing_a_slice_changes_that_stage_and_downstream_only(setup):
    cache, cfg, _, _ = setup
    before = keys(cfg, cache)
    changed = copy.deepcopy(cfg)
    changed["b"]["size"] = 4
    after = keys(changed, cache)
    assert after["a"] == before["a"]
    assert after["b"] != before["b"] and after["c"] != before["c"]

    changed = copy.deepcopy(cfg)
    changed["c"]["lr"] = 0.2
    after = keys(changed, cache)
    assert (after["a"], after["b"]) == (before["a"], before["b"]) and after["c"] != before["c"]


def test_runtime_only_keys_change_nothing(setup):
    cache, cfg, _, _ = setup
    before = keys(cfg, cache)
    changed = copy.deepcopy(cfg)
    changed["data"]["num_proc"] = 8
    changed["c"]["num_workers"] = 4
    assert keys(changed, cache) == before


def test_input_content_not_location_makes_the_key(setup, tmp_path):
    cache, cfg, _, data = setup
    before = keys(cfg, cache)
    moved = tmp_path / "elsewhere" / "copy.jsonl"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    assert keys({**cfg, "data": {**cfg["data"], "path": str(moved)}}, cache) == before
    data.write_text('{"x": 2}\n')
    after = keys(cfg, cache)
    assert all(after[s] != before[s] for s in "abc")


def test_second_run_hits_everything_and_reruns_nothing(setup):
    cache, cfg, log, _ = setup
    first = run(cfg, cache)
    assert [r["hit"] for r in first] == [False, False, False]
    second = run(cfg, cache)
    assert [r["hit"] for r in second] == [True, True, True]
    assert executions(log) == ["a", "b", "c"]
    assert second[2]["c_metric"] == first[2]["c_metric"] > 0  # metrics come back from the manifest


def test_a_failing_stage_leaves_no_entry_and_the_rerun_resumes_at_it(setup, monkeypatch):
    cache, cfg, log, _ = setup
    monkeypatch.setenv("FTPIPE_TEST_FAIL", "b")
    with pytest.raises(RuntimeError, match="b failed"):
        run(cfg, cache)
    k = keys(cfg, cache)
    assert cache.has("a", k["a"]) and not cache.has("b", k["b"])
    assert not cache.entry_dir("b", k["b"]).exists() and not cache.tmp_dir("b", k["b"]).exists()
    monkeypatch.delenv("FTPIPE_TEST_FAIL")
    rows = run(cfg, cache)
    assert [r["hit"] for r in rows] == [True, False, False]
    assert executions(log) == ["a", "b", "c"]


def test_sigkill_mid_stage_leaves_no_entry_and_the_rerun_completes(setup):
    cache, cfg, log, _ = setup
    proc = worker(cache, cfg, env={"FTPIPE_TEST_SLEEP": "b:60"})
    deadline = time.time() + 60
    while "b started" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline and proc.poll() is None, (
            proc.stderr.read() if proc.poll() is not None else ""
        )
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    k = keys(cfg, cache)
    assert not cache.has("b", k["b"]) and not cache.entry_dir("b", k["b"]).exists()
    assert (cache.tmp_dir("b", k["b"]) / "partial.txt").exists()  # the killed work is there, but is no entry
    rows = run(cfg, cache)
    assert [r["hit"] for r in rows] == [True, False, False]
    assert executions(log) == ["a", "b", "c"]
    assert not cache.tmp_dir("b", k["b"]).exists()


def test_two_processes_on_one_key_compute_it_once(setup):
    cache, cfg, log, _ = setup
    env = {"FTPIPE_TEST_SLEEP": "a:3"}
    procs = [worker(cache, cfg, env=env) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert executions(log) == ["a", "b", "c"]
    # Which process wins each stage's lock is a race; what must hold is that each stage
    # was computed by exactly one of them and found as a hit by the other.
    per_stage = [sorted(rows[i]["hit"] for rows in results) for i in range(3)]
    assert per_stage == [[False, True]] * 3
    assert results[0][2]["key"] == results[1][2]["key"]


def test_a_deleted_output_is_rebuilt_without_rerunning_upstream(setup):
    cache, cfg, log, _ = setup
    run(cfg, cache)
    k = keys(cfg, cache)
    value = (cache.entry_dir("c", k["c"]) / "value.txt").read_text()
    shutil.rmtree(cache.entry_dir("c", k["c"]))
    rows = run(cfg, cache)
    assert [r["hit"] for r in rows] == [True, True, False]
    assert executions(log) == ["a", "b", "c", "c"]
    assert (cache.entry_dir("c", k["c"]) / "value.txt").read_text() == value


def test_a_subset_of_stages_runs_its_upstream_too(setup):
    cache, cfg, log, _ = setup
    rows = run({**cfg, "stages": ["b"]}, cache)
    assert [r["name"] for r in rows] == ["a", "b"]
    assert executions(log) == ["a", "b"]


def test_gc_removes_partial_work_but_keeps_entries(setup, monkeypatch):
    cache, cfg, _, _ = setup
    monkeypatch.setenv("FTPIPE_TEST_FAIL", "c")
    with pytest.raises(RuntimeError):
        run(cfg, cache)
    leftover = cache.root / "c" / "deadbeef.tmp"
    leftover.mkdir(parents=True)
    removed = cache.gc()
    assert [e.path for e in removed] == [leftover]
    k = keys(cfg, cache)
    assert cache.has("a", k["a"]) and cache.has("b", k["b"])


def test_an_unknown_stage_is_a_config_error_naming_the_key(setup):
    cache, cfg, _, _ = setup
    with pytest.raises(FtpipeError, match="config key `stages`.*nope"):
        run({**cfg, "stages": ["nope"]}, cache)


def test_gc_never_deletes_through_a_symlink(tmp_path):
    """A stage folder, an entry or a .tmp that is a symlink out of the cache is left alone, and so is its target."""
    outside = tmp_path / "out"
    for victim in ("victim.tmp", "0123abcd.tmp", "0123abcd"):
        (outside / victim).mkdir(parents=True)
        (outside / victim / "f").write_text("user data")
    (outside / "0123abcd" / "manifest.json").write_text("{}")
    root = tmp_path / "cache"
    (root / "train").mkdir(parents=True)
    (root / "evilstage").symlink_to(outside)
    (root / "train" / "0123abcd.tmp").symlink_to(outside / "0123abcd.tmp")
    (root / "train" / "0123abcd").symlink_to(outside / "0123abcd")
    (root / "train" / "feed.tmp").mkdir()  # real partial work: still removed
    cache = Cache(root)

    assert [e.path for e in cache.entries()] == [root / "train" / "feed.tmp"]
    assert [e.path for e in cache.gc(older_than_days=0, dry_run=True)] == [root / "train" / "feed.tmp"]
    result = subprocess.run(
        [sys.executable, "-m", "ftpipe", "cache", "gc", "--older-than", "0", "--cache-dir", str(root)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "removed 1 item(s)" in result.stdout
    assert "left alone: evilstage is a symlink" in result.stdout
    assert sorted(p.name for p in outside.iterdir()) == ["0123abcd", "0123abcd.tmp", "victim.tmp"]
    assert all(
        (outside / v / "f").read_text() == "user data" for v in ("victim.tmp", "0123abcd.tmp", "0123abcd")
    )
    assert not (root / "train" / "feed.tmp").exists()
    with pytest.raises(FtpipeError, match="evilstage is a symlink"):
        cache.tmp_dir("evilstage", "0123abcd")


def test_a_damaged_entry_is_recomputed_not_used_and_verify_finds_same_size_edits(setup):
    cache, cfg, log, _ = setup
    run(cfg, cache)
    k = keys(cfg, cache)
    value = cache.entry_dir("b", k["b"]) / "value.txt"
    value.write_text(value.read_text()[:-3])  # truncated after commit
    assert not cache.has("b", k["b"])
    rows = {r["name"]: r for r in run(cfg, cache)}
    assert not rows["b"]["hit"] and rows["a"]["hit"] and rows["c"]["hit"]
    assert executions(log).count("b") == 2 and cache.damaged(cache.entry_dir("b", k["b"])) == []

    edited = cache.entry_dir("a", k["a"]) / "value.txt"
    edited.write_text("X" * edited.stat().st_size)  # same size: only the hash tells
    assert cache.has("a", k["a"])  # the cheap check passes ...
    assert cache.damaged(cache.entry_dir("a", k["a"])) == ["value.txt changed after commit (sha256 differs)"]
    verify = subprocess.run(
        [sys.executable, "-m", "ftpipe", "cache", "verify", "--cache-dir", str(cache.root)],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 1 and f"damaged a/{k['a']}: value.txt changed" in verify.stdout
    removed = subprocess.run(
        [sys.executable, "-m", "ftpipe", "cache", "verify", "--remove", "--cache-dir", str(cache.root)],
        capture_output=True,
        text=True,
    )
    assert removed.returncode == 0 and not cache.has("a", k["a"])
