"""One run: validate the composed config, plan and run the stage chain, write run.json and the report."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from . import engine, stages
from .cache import Cache
from .config import validate
from .report import write_report


def run(cfg: DictConfig, run_dir: Path) -> float | None:
    """Run the chain; return the recipe's objective (for Optuna sweeps), None if it declares none."""
    started = time.time()
    resolved = validate(cfg)
    cache = Cache(resolved["cache_dir"])
    rows = engine.run(stages.plan(resolved, cache), cache)
    objective = _objective(resolved["objective"], rows)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {"stages": rows, "objective": objective, "wall_seconds": round(time.time() - started, 3)}
    (run_dir / "run.json").write_text(json.dumps(summary, indent=2, default=str))
    write_report(rows, run_dir)
    return objective


def _objective(spec: dict[str, Any], rows: list[dict[str, Any]]) -> float | None:
    metric = spec.get("metric")
    if not metric:
        return None
    values = [r[metric] for r in rows if isinstance(r.get(metric), int | float)]
    # a run that could not produce the metric (e.g. no valid colour reply) is the worst trial, not a crash
    worst = math.inf if spec.get("direction", "minimize") == "minimize" else -math.inf
    return float(values[-1]) if values else worst
