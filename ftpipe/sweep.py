"""Sweep summary: after a Hydra multirun, one table of every job's overrides, cache hits, loss and metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .report import _fmt

log = logging.getLogger("ftpipe")

DATA_FIRST = "data_first.json"  # the data stages the launching process ran before the jobs


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    jobs = []
    for run_json in sorted(
        sweep_dir.glob("*/run.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
    ):
        run = json.loads(run_json.read_text())
        overrides_file = run_json.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        stages = run["stages"]
        metrics: dict[str, Any] = {}
        for row in stages:
            metrics.update(
                {k: v for k, v in row.items() if k not in {"name", "key", "hit", "seconds", "output"}}
            )
        jobs.append(
            {
                "job": run_json.parent.name,
                "overrides": overrides,
                "hits": {r["name"]: r["hit"] for r in stages},
                "wall_seconds": run.get("wall_seconds"),
                "objective": run.get("objective"),
                "metrics": metrics,
            }
        )
    return jobs


def _swept(jobs: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for o in job["overrides"]:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    return [k for k, v in values.items() if len(v) > 1]


def write_summary(sweep_dir: Path, objective: dict[str, Any] | None) -> list[dict[str, Any]]:
    jobs = collect(sweep_dir)
    first = sweep_dir / DATA_FIRST
    before = {r["name"]: r["hit"] for r in json.loads(first.read_text())} if first.is_file() else {}
    summary = {"objective": objective, "data_first": before, "jobs": jobs}
    (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2))
    metric = (objective or {}).get("metric")
    metric_names = sorted({m for j in jobs for m in j["metrics"] if m.endswith(("_after", "loss"))})
    head = ["job", "overrides", "stages hit", "wall s", *metric_names]
    lines = ["# Sweep summary", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j in jobs:
        hit = ", ".join(name for name, h in j["hits"].items() if h) or "—"
        cells = [
            j["job"],
            " ".join(j["overrides"]),
            hit,
            _fmt(j["wall_seconds"]),
            *(_fmt(j["metrics"].get(m)) for m in metric_names),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    scored = [j for j in jobs if isinstance(j["metrics"].get(metric), int | float)]
    if metric and scored:
        pick = min if objective.get("direction", "minimize") == "minimize" else max  # type: ignore[union-attr]
        best = pick(scored, key=lambda j: j["metrics"][metric])
        lines += [
            "",
            f"best ({objective.get('direction', 'minimize')} `{metric}`): job {best['job']} "  # type: ignore[union-attr]
            f"`{' '.join(best['overrides'])}` → {_fmt(best['metrics'][metric])}",
        ]
    else:  # no objective, or no job produced it (e.g. no valid reply at all): plot the final train loss
        metric, scored = (
            "train_loss",
            [j for j in jobs if isinstance(j["metrics"].get("train_loss"), int | float)],
        )
    if scored:
        _plot(scored, metric, _swept(jobs), sweep_dir / "sweep.png")
        lines += ["", "![metric vs swept parameter](sweep.png)"]
    (sweep_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    return jobs


def _plot(jobs: list[dict[str, Any]], metric: str, swept: list[str], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    param = swept[0] if swept else None
    labels, xs = [], []
    for j in jobs:
        value = next(
            (o.partition("=")[2] for o in j["overrides"] if param and o.startswith(param + "=")), j["job"]
        )
        labels.append(value)
        try:
            xs.append(float(value))
        except ValueError:
            xs.append(float("nan"))
    ys = [j["metrics"][metric] for j in jobs]
    if param and all(x == x for x in xs):  # numeric parameter: a real x axis (log scale for rates)
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o")
        if min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
    else:
        ax.bar(range(len(ys)), ys, tick_label=labels)
    ax.set_xlabel(param or "job")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


class DataFirst(Callback):
    """Hydra callback: before a multirun fans out (in parallel, on other machines, as Slurm jobs), compute the
    data stages of the sweep's base config once in the launching process, so the jobs find them cached
    instead of racing to tokenise. Jobs whose sweep changes the data still compute their own, once per key."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from . import engine, stages
        from .cache import Cache
        from .config import validate
        from .errors import FtpipeError

        try:
            resolved = validate(config)
        except FtpipeError as exc:  # e.g. a swept value completes the config: the jobs do it themselves
            log.info("data stages left to the jobs (%s)", exc)
            return
        cache = Cache(resolved["cache_dir"])
        rows = engine.run(stages.plan({**resolved, "stages": ["pack"]}, cache), cache)
        log.info("data stages ready before the jobs: %s", ", ".join(f"{r['name']} {r['key']}" for r in rows))
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / DATA_FIRST).write_text(json.dumps(rows, indent=2, default=str))


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks`) that writes sweep.json, sweep.md and sweep.png."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        objective = dict(config.get("objective") or {}) or None
        jobs = write_summary(sweep_dir, objective)
        log.info("sweep summary of %d job(s): %s", len(jobs), sweep_dir / "sweep.md")
