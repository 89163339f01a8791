"""Run the train stage under torchrun (data-parallel, one process per GPU; DeepSpeed through Trainer).

The engine stays in this process: it holds the cache lock and commits the entry. The ranks get the stage's
context through a JSON file in the stage dir, train into the same dir (rank 0 writes the outputs), and rank 0
leaves the metrics in `metrics.json` for this process to return.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

from ..engine import StageContext
from ..errors import FtpipeError
from ..paths import PACKAGE_DIR

log = logging.getLogger("ftpipe")

SPEC = "launch.json"
METRICS = "metrics.json"


def torchrun_command(launcher: dict[str, Any], spec: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={launcher['nproc_per_node']}"]
    if launcher["nnodes"] > 1 or launcher.get("rdzv_endpoint"):
        if not launcher.get("rdzv_endpoint"):
            raise FtpipeError(
                "config key `launcher.rdzv_endpoint`: set HOST:PORT of the rendezvous for nnodes > 1"
            )
        cmd += [
            f"--nnodes={launcher['nnodes']}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={launcher['rdzv_endpoint']}",
        ]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", "ftpipe.training.worker", spec]


def check_gpus(launcher: dict[str, Any]) -> None:
    """One rank per GPU: more ranks than visible GPUs would die inside torchrun with "invalid device ordinal"."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible and launcher["nproc_per_node"] > visible:
        raise FtpipeError(
            f"config key `launcher.nproc_per_node`: {launcher['nproc_per_node']} ranks but {visible} GPU(s) "
            f"visible; set launcher.nproc_per_node={visible} (or CUDA_VISIBLE_DEVICES)"
        )


def launch(ctx: StageContext) -> dict[str, Any]:
    check_gpus(ctx.cfg["launcher"])
    spec = ctx.out / SPEC
    spec.write_text(
        json.dumps(
            {
                "cfg": ctx.cfg,
                "out": str(ctx.out),
                "inputs": {name: str(path) for name, path in ctx.inputs.items()},
                "cache": str(ctx.cache.root),
            }
        )
    )
    (ctx.out / METRICS).unlink(missing_ok=True)
    cmd = torchrun_command(ctx.cfg["launcher"], str(spec))
    env = dict(os.environ)
    # the ranks must import this same ftpipe, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_DIR.parent), env.get("PYTHONPATH")) if p)
    log.info("[train] launching: %s", " ".join(cmd))
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise FtpipeError(f"train: {ctx.cfg['launcher']['name']} exited with status {done.returncode}")
    try:
        return json.loads((ctx.out / METRICS).read_text())
    except FileNotFoundError:
        raise FtpipeError(f"train: the ranks finished without writing {ctx.out / METRICS}") from None
