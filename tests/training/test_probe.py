"""`ftpipe probe`: the search for the longest sequence that trains, and the command on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ftpipe.training.probe import Attempt, longest, search


def _machine(capacity: int):
    tried: list[int] = []

    def step(tokens: int) -> Attempt:
        tried.append(tokens)
        return Attempt(tokens, fits=tokens <= capacity, step_seconds=1.0 if tokens <= capacity else None)

    return step, tried


def test_search_doubles_then_bisects_to_the_resolution() -> None:
    step, tried = _machine(50_000)
    attempts = search(step, start=8192, limit=262144, resolution=4096)
    assert tried[:4] == [8192, 16384, 32768, 65536]  # doubling until the first failure
    best = longest(attempts)
    assert best is not None and 50_000 - 4096 < best.tokens <= 50_000
    assert all(t % 4096 == 0 for t in tried) and len(tried) == len(set(tried))
    assert best.tokens_per_second == best.tokens  # one second a step


def test_search_stops_at_the_limit_and_reports_nothing_when_nothing_fits() -> None:
    step, tried = _machine(10**9)
    assert longest(search(step, 8192, 100_000, 4096)).tokens == 100_000 and tried[-1] == 100_000
    step, tried = _machine(10**9)
    assert longest(search(step, 65536, 16384, 4096)).tokens == 16384 and tried == [16384]  # start above limit
    step, tried = _machine(1000)
    assert longest(search(step, 8192, 100_000, 4096)) is None and tried == [8192, 4096]  # bisects below too


def test_probe_command_trains_steps_of_growing_length(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    env = {**os.environ, "FTPIPE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["model=tiny_llama", "train.speed.mlp_chunk_tokens=256", "--start", "256", "--max-tokens", "1024"]
    done = subprocess.run(
        [sys.executable, "-m", "ftpipe", "probe", *args, "--resolution", "256", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    attempts = json.loads(out.read_text())
    assert [a["tokens"] for a in attempts] == [256, 512, 1024] and all(a["fits"] for a in attempts)
    assert all(a["tokens_per_second"] > 0 for a in attempts)
    assert "longest sequence that trains: 1024 tokens" in done.stdout
