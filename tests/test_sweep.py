"""Hydra multirun on the tiny model: shared stages computed once (also in parallel), summary, Optuna."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = [
    "model=tiny_llama",
    "train.max_steps=2",
    "eval.max_samples=4",
    "eval.max_new_tokens=4",
    "train.save_steps=1000",
]


def multirun(tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "FTPIPE_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(
        [sys.executable, "-m", "ftpipe.cli", "-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((tmp_path / "sweep" / "sweep.json").read_text())


def executions(summary: dict) -> dict[str, int]:
    """How often each stage was computed: in the jobs, and before they fanned out (sweep.DataFirst)."""
    counts: dict[str, int] = {stage: int(not hit) for stage, hit in summary["data_first"].items()}
    for job in summary["jobs"]:
        for stage, hit in job["hits"].items():
            counts[stage] = counts.get(stage, 0) + (not hit)
    return counts


# joblib in make test-full: submitit_local already runs the jobs as parallel processes in the default suite
@pytest.mark.parametrize(
    # parallel launchers (~1.5 min each on 2 cores) in `make test-full`
    "launcher",
    [
        "basic",
        pytest.param("joblib", marks=pytest.mark.slow),
        pytest.param("submitit_local", marks=pytest.mark.slow),
    ],
)
def test_a_three_value_sweep_computes_shared_stages_once(tmp_path, launcher):
    extra = {
        "basic": [],
        "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"],
        "submitit_local": ["hydra/launcher=submitit_local"],  # the Slurm path, as local processes
    }[launcher]
    summary = multirun(tmp_path, "+recipe=colorist_lora", *TINY, "optimizer.lr=0.0001,0.0002,0.0003", *extra)
    assert len(summary["jobs"]) == 3
    data_stages = ["download-model", "download-data", "map", "pack"]
    # computed once, in the launching process before the jobs fanned out; every job found them cached
    assert summary["data_first"] == dict.fromkeys(data_stages, False)
    assert all(job["hits"][stage] for job in summary["jobs"] for stage in data_stages)
    assert executions(summary) == {
        "download-model": 1,
        "download-data": 1,
        "map": 1,
        "pack": 1,
        "train": 3,
        "convert": 3,
        "merge": 3,
        "evaluate-chat": 3,
        "export": 3,  # colorist_lora writes a GGUF
    }
    keys = {e.parent.name for e in (tmp_path / "cache" / "pack").glob("*/manifest.json")}
    assert len(keys) == 1  # one committed pack entry, never a second or a half-written one
    sweep_dir = tmp_path / "sweep"
    table = (sweep_dir / "sweep.md").read_text()
    for lr in ("0.0001", "0.0002", "0.0003"):
        assert f"optimizer.lr={lr}" in table
    for job in summary["jobs"]:
        assert "train_loss" in job["metrics"] and "hex_valid_rate_after" in job["metrics"]
    assert (sweep_dir / "sweep.png").stat().st_size > 1000


def test_optuna_sweep_of_four_trials_reports_the_best(tmp_path):
    summary = multirun(
        tmp_path,
        "+recipe=colorist_lora",
        *TINY,
        "objective.metric=answer_loss_after",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.direction=minimize",
        "hydra.sweeper.sampler.seed=1",
        "optimizer.lr=interval(1e-4,1e-2)",
    )
    assert len(summary["jobs"]) == 4
    values = [j["metrics"]["answer_loss_after"] for j in summary["jobs"]]
    assert (
        all(v == v for v in values) and len(set(values)) == 4
    )  # four different learning rates, four results
    best = yaml_best(tmp_path / "sweep" / "optimization_results.yaml")
    assert best == pytest.approx(min(values))
    assert "best (minimize `answer_loss_after`)" in (tmp_path / "sweep" / "sweep.md").read_text()


def yaml_best(path: Path) -> float:
    import yaml

    return float(yaml.safe_load(path.read_text())["best_value"])


@pytest.mark.slow
def test_every_recipe_runs_on_the_tiny_model(tmp_path):
    summary = multirun(tmp_path, "+recipe=glob(*)", *TINY)
    assert len(summary["jobs"]) == len(list((Path(__file__).parents[1] / "recipes").glob("*.yaml")))
