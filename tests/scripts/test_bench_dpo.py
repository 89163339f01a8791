"""scripts/bench_dpo.py on the CPU with a tiny shape: both sides train and report tokens/s (TRL where installed)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_dpo.py"


def test_bench_dpo_times_ftpipe_and_trl_on_the_same_pairs(tmp_path):
    sides = "ftpipe,trl" if importlib.util.find_spec("trl") else "ftpipe"
    args = ["--shape", "tiny", "--steps", "3", "--warmup", "1", "--pairs", "12", "--batch", "2"]
    args += ["--prompt-words", "8", "--answer-words", "6", "--sides", sides]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "FTPIPE_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "bench_dpo.json").read_text())
    for side in sides.split(","):
        r = result[side]
        assert "error" not in r, r
        assert r["tokens_per_second_median"] > 0 and r["tokens"] > 0
        assert r["loss_first"] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at step 0
    assert "tok/s (median)" in done.stdout
