"""Ctrl-C during training: a clean stop within seconds that keeps the checkpoint and says how to resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def test_ctrl_c_in_train_stops_cleanly_and_the_rerun_resumes(tmp_path):
    args = [
        sys.executable, "-m", "ftpipe", "+recipe=assistant_lora", "model=tiny_llama", "dataset.name=Ada",
        "stages=[train]", "train.max_steps=200", "train.save_steps=2", "train.precision=fp32",
    ]  # fmt: skip
    env = {**os.environ, "FTPIPE_CACHE": str(tmp_path / "cache")}
    # SIGINT at its default, as under a terminal: a suite started in the background (`make test &`) ignores
    # SIGINT, and a child inherits that, so the Ctrl-C below would never arrive
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.time() + 300
    while not list((tmp_path / "cache" / "train").glob("*.tmp/checkpoints/checkpoint-2/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    stdout, stderr = proc.communicate(timeout=60)
    out = stdout + stderr
    assert proc.returncode == 130 and time.time() - sent < 30, out[-3000:]
    assert "interrupted: finished stages stay cached" in out and "rerun the same command to resume" in out
    assert "Traceback" not in out, out[-3000:]
    (tmp,) = (tmp_path / "cache" / "train").glob("*.tmp")
    assert (tmp / "checkpoints" / "checkpoint-2").is_dir()

    last = max(int(p.name.split("-")[1]) for p in (tmp / "checkpoints").glob("checkpoint-*"))
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    run_json = max(tmp_path.glob("outputs/*/*/run.json"), key=lambda p: p.stat().st_mtime)
    (row,) = [r for r in json.loads(run_json.read_text())["stages"] if r["name"] == "train"]
    assert row["resumed_from_step"] == last and row["train_steps"] == 200
