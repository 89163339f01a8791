"""One run: validate the composed config, plan and run the stage chain, write run.json into the run dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from . import engine
from .cache import Cache
from .config import validate
from .stages import CHAIN


def run(cfg: DictConfig, run_dir: Path) -> list[dict[str, Any]]:
    resolved = validate(cfg)
    cache = Cache(resolved["cache_dir"])
    rows = engine.run(engine.plan(resolved, CHAIN, cache), cache)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"stages": rows}, indent=2, default=str))
    return rows
