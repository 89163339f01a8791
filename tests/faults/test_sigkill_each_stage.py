"""SIGKILL inside each stage of the chain in turn, then the next run goes on: nothing partial is ever used,
every finished stage stays a hit, and the final cache verifies clean (sizes and hashes of every entry)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from ftpipe import stages

RUN = (
    "+recipe=assistant_lora", "model=tiny_llama", "dataset.name=Ada", "train.max_steps=6", "train.save_steps=2",
    "eval.max_samples=2", "eval.max_new_tokens=4", "export.gguf=[q8_0]",
)  # fmt: skip


def test_a_kill_in_each_stage_then_rerun_completes_with_a_clean_cache(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "FTPIPE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "ftpipe", *RUN]
    rng = random.Random(0)
    killed_in = []
    for stage in [s.name for s in stages.CHAIN]:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while proc.poll() is None and not list((cache / stage).glob("*.tmp")):
            time.sleep(0.005)
        if proc.poll() is None:  # inside the stage: at a random point of it
            time.sleep(rng.uniform(0, 0.3))
            proc.send_signal(signal.SIGKILL)
            killed_in.append(stage)
        proc.wait()
        # whatever was killed, no entry is half there: every committed one is whole
        for manifest in cache.glob("*/*/manifest.json"):
            assert json.loads(manifest.read_text())["key"] == manifest.parent.name
    print(f"killed inside: {killed_in}")
    assert len(killed_in) >= 5, killed_in  # convert lasts milliseconds and may finish before the kill lands

    final = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    run_json = max(tmp_path.glob("outputs/*/*/run.json"), key=lambda p: p.stat().st_mtime)
    rows = json.loads(run_json.read_text())["stages"]
    assert [r["name"] for r in rows] == [s.name for s in stages.CHAIN]
    verify = subprocess.run(
        [sys.executable, "-m", "ftpipe", "cache", "verify", "--cache-dir", str(cache)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert verify.returncode == 0 and "0 damaged entries" in verify.stdout, verify.stdout
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    run_json = max(tmp_path.glob("outputs/*/*/run.json"), key=lambda p: p.stat().st_mtime)
    assert all(r["hit"] for r in json.loads(run_json.read_text())["stages"])
