"""A three-stage toy chain for engine tests; also runnable as a process: `python toy_chain.py CACHE CFG_JSON`.

Each stage appends "<name>" to $FTPIPE_TEST_LOG when it runs, so tests count real executions. Behaviour
that must not change keys comes from the environment: FTPIPE_TEST_FAIL=<stage> raises inside that stage,
FTPIPE_TEST_SLEEP=<stage>:<seconds> sleeps inside it (after writing "<name> started").
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ftpipe import engine
from ftpipe.cache import Cache


def _stage_fn(name: str):
    def run(ctx: engine.StageContext) -> dict:
        log = Path(os.environ["FTPIPE_TEST_LOG"])
        with open(log, "a") as fh:
            fh.write(f"{name} started\n")
        (ctx.out / "partial.txt").write_text("half-written")
        sleep = os.environ.get("FTPIPE_TEST_SLEEP", "")
        if sleep.startswith(f"{name}:"):
            time.sleep(float(sleep.split(":")[1]))
        if os.environ.get("FTPIPE_TEST_FAIL") == name:
            raise RuntimeError(f"{name} failed on purpose")
        upstream = "".join(ctx.input(up, "value.txt").read_text() for up in sorted(ctx.upstream))
        (ctx.out / "value.txt").write_text(upstream + json.dumps(ctx.cfg, sort_keys=True))
        with open(log, "a") as fh:
            fh.write(f"{name}\n")
        return {f"{name}_metric": len(upstream)}

    return run


OUTPUTS = ("value.txt",)

CHAIN = [
    engine.Stage(
        "a", "1", reads=("data", "common.seed"), path_keys=("data.path",), outputs=OUTPUTS, run=_stage_fn("a")
    ),
    engine.Stage("b", "1", reads=("b",), upstream=("a",), outputs=OUTPUTS, run=_stage_fn("b")),
    engine.Stage("c", "1", reads=("c", "common.seed"), upstream=("b",), outputs=OUTPUTS, run=_stage_fn("c")),
]


def base_config(data_path: str) -> dict:
    return {
        "stages": ["a", "b", "c"],
        "data": {"path": data_path, "num_proc": 1},
        "b": {"size": 3},
        "c": {"lr": 0.1, "num_workers": 0},
        "common": {"seed": 1},
    }


if __name__ == "__main__":
    cache = Cache(sys.argv[1])
    cfg = json.loads(sys.argv[2])
    steps = engine.plan(cfg, CHAIN, cache)
    if len(sys.argv) > 3 and sys.argv[3] == "--keys":
        print(json.dumps({s.stage.name: s.key for s in steps}))
    else:
        print(json.dumps(engine.run(steps, cache)))
