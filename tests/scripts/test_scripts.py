"""Every script in scripts/ runs on a tiny input, so a change that breaks one fails here rather than unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={
            **os.environ,
            "FTPIPE_CACHE": str(tmp_path / "cache"),
            # shell scripts call `python`: the interpreter running these tests
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            **env,
        },
        timeout=600,
    )


def test_bench_data_measures_the_data_stages_only_and_accounts_for_every_token(tmp_path):
    rows = tmp_path / "rows.jsonl"
    with open(rows, "w") as fh:
        for i in range(300):
            fh.write(
                json.dumps({"instruction": f"say {i}", "input": "", "output": f"number {i} " * (i % 7 + 1)})
            )
            fh.write("\n")
    done = _run(
        [
            sys.executable,
            str(SCRIPTS / "bench_data.py"),
            str(rows),
            "--num-proc",
            "1",
            "--baseline",
            "--cache-dir",
            str(tmp_path / "bench-cache"),
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(300 rows)" in done.stdout and "unaccounted 0" in done.stdout
    assert "tokenizer batched call only" in done.stdout
    assert not (tmp_path / "bench-cache" / "train").exists()  # the data benchmark never trains


def test_make_colorist_regenerates_the_packaged_rows(tmp_path):
    out = tmp_path / "colorist.jsonl"
    done = _run([sys.executable, str(SCRIPTS / "make_colorist.py"), str(out)], tmp_path)
    assert done.returncode == 0, done.stderr
    packaged = Path(__file__).resolve().parents[2] / "ftpipe" / "data" / "embedded" / "colorist.jsonl"
    assert out.read_text() == packaged.read_text()


def test_colorist_grid_runs_a_sweep_and_copies_its_summary(tmp_path):
    tiny = "model=tiny_llama stages=[train] train.max_steps=1 train.save_steps=1"
    done = _run(
        ["bash", str(SCRIPTS / "colorist_grid.sh"), str(tmp_path / "grid"), "lora_lr"],
        tmp_path,
        GRID_EXTRA=tiny,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (tmp_path / "grid" / "lora_lr.md").read_text()
    assert summary.count("optimizer.lr=") >= 3, summary


def test_scaleout_runs_its_cases_through_ftpipe_and_reports_each(tmp_path):
    done = _run(
        [sys.executable, str(SCRIPTS / "scaleout.py"), str(tmp_path / "so"), "--shape", "tiny",
         "--cases", "lora_local", "--steps", "4", "--save-steps", "100"],
        tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (case,) = json.loads((tmp_path / "so" / "scaleout.json").read_text())["cases"].values()
    assert case["rc"] == 0 and len(case["losses"]) == 2 and case["merged"]
    assert case["loss_max_rel_gap_vs_local"] == 0.0


def test_bench_builds_every_case_through_ftpipes_own_config_and_training_arguments(tmp_path, monkeypatch):
    """scripts/bench.py times on a GPU only; here its glue to ftpipe (config slice, levers, Trainer arguments)
    runs for every case, so a renamed key or hook breaks this test instead of the next GPU call."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench

    from ftpipe.training import speed
    from ftpipe.training.fit import training_arguments

    for shape in bench.SHAPES:
        assert bench.model_config(shape).num_hidden_layers > 0
    for name, case in bench.CASES.items():
        cfg = bench.ftpipe_cfg(case, {})
        levers = speed.resolve(cfg["train"], "cuda")
        args = training_arguments(cfg, str(tmp_path / name), levers, "fp32", bench.ROW)  # bf16 needs the GPU
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps == case["batch"], name
