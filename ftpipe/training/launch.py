"""Run a training job under torchrun (data-parallel, one process per GPU; DeepSpeed through Trainer).

The engine stays in this process: it holds the cache lock and commits the entry. The ranks get the job
through a JSON file in its output dir, train into the same dir (rank 0 writes the outputs), and rank 0
leaves the metrics in `metrics.json` for this process to return.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import FtpipeError
from ..paths import PACKAGE_DIR
from .fit import TrainJob, build_env

log = logging.getLogger("ftpipe")

SPEC = "launch.json"
METRICS = "metrics.json"
LOGS = "logs"  # torchrun's per-rank stdout/stderr files, and each failed rank's `rank-N.error`
TAIL_LINES = 8
# torchrun's failure summary: "rank      : 1 (local_rank: 1)" then "exitcode  : -9 (pid: 123)"
_FAILED_RANK = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)\s*exitcode\s*:\s*(-?\d+)")


def torchrun_command(launcher: dict[str, Any], spec: str, log_dir: str) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={launcher['nproc_per_node']}",
        f"--log-dir={log_dir}",
        "--tee=3",  # each rank's output on the console and in its own file, for the failure message
    ]
    if launcher["nnodes"] > 1:
        # the same command on every node; c10d rendezvous assigns node ranks
        cmd += [
            f"--nnodes={launcher['nnodes']}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={launcher['rdzv_endpoint']}",
        ]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", "ftpipe.training.worker", spec]


def describe(cfg: dict[str, Any], spec: Path) -> list[str]:
    """What `ftpipe show` prints for the train stage: ranks, the global batch, the DeepSpeed config as it will
    be used, and the command each node runs."""
    from .devices import precision, train_device
    from .distributed import deepspeed_config, rows_per_step, world_size

    train, launcher = cfg["train"], cfg["launcher"]
    world = world_size(launcher)
    lines = [
        f"train: launcher={launcher['name']}, {world} rank(s); global batch = micro_batch_size "
        f"{train['micro_batch_size']} × grad_accum {train['grad_accum']} × world_size {world} = "
        f"{rows_per_step(train, launcher)} packed rows per optimizer step"
    ]
    if launcher["name"] == "local":
        return lines
    prec = precision(train, train_device())
    ds = deepspeed_config(
        launcher, train["micro_batch_size"], train["grad_accum"], prec, cfg["optimizer"]["max_grad_norm"]
    )
    if ds is not None:
        lines.append(f"deepspeed config: {json.dumps(ds, sort_keys=True)}")
    command = " ".join(torchrun_command(launcher, str(spec), str(spec.parent / LOGS / "torchrun")))
    if launcher["nnodes"] == 1:
        lines.append(f"ftpipe runs, after the data stages: {command}")
    else:
        lines += [
            f"node 0: run the ftpipe command itself (it runs the data stages, then: {command})",
            f"nodes 1..{launcher['nnodes'] - 1}: once node 0 logs 'launching', run: {command}",
            f"every node must see the cache at {spec.parents[2]} (a shared filesystem)",
        ]
    return lines


def check_gpus(launcher: dict[str, Any]) -> None:
    """One rank per GPU: more ranks than visible GPUs would die inside torchrun with "invalid device ordinal"."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible and launcher["nproc_per_node"] > visible:
        raise FtpipeError(
            f"config key `launcher.nproc_per_node`: {launcher['nproc_per_node']} ranks but {visible} GPU(s) "
            f"visible; set launcher.nproc_per_node={visible} (or CUDA_VISIBLE_DEVICES)"
        )


def launch(job: TrainJob) -> dict[str, Any]:
    check_gpus(job.cfg["launcher"])
    spec = job.out / SPEC
    spec.write_text(job.to_json())
    (job.out / METRICS).unlink(missing_ok=True)
    logs = job.out / LOGS
    shutil.rmtree(logs, ignore_errors=True)  # an earlier attempt's logs would be blamed for this one
    cmd = torchrun_command(job.cfg["launcher"], str(spec), str(logs / "torchrun"))
    env = dict(os.environ)
    # the ranks must import this same ftpipe, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_DIR.parent), env.get("PYTHONPATH")) if p)
    if job.build_dir is not None:  # compiled once per cache, not per run
        for name, value in build_env(job.build_dir).items():
            env.setdefault(name, value)
    log.info("[train] launching: %s", " ".join(cmd))
    returncode, tail = _run_echoing(cmd, env)
    if returncode != 0:
        raise FtpipeError(failure_message(job, returncode, tail))
    try:
        return json.loads((job.out / METRICS).read_text())
    except FileNotFoundError:
        raise FtpipeError(f"train: the ranks finished without writing {job.out / METRICS}") from None


def _run_echoing(cmd: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run torchrun with its stderr shown as it comes and its last lines kept (for its failure summary)."""
    tail: collections.deque[str] = collections.deque(maxlen=400)
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
    finally:
        returncode = proc.wait()  # on Ctrl-C torchrun gets the signal too and stops its ranks
    return returncode, list(tail)


def failure_message(job: TrainJob, returncode: int, torchrun_tail: list[str]) -> str:
    """Which rank failed, with what, and the last lines it wrote; one paragraph, no traceback."""
    logs = job.out / LOGS
    launcher = job.cfg["launcher"]["name"]
    raised = {int(p.stem.split("-")[1]): p.read_text().strip() for p in sorted(logs.glob("rank-*.error"))}
    # torchrun names the first failure "Root Cause"; a rank that dies takes the others down with follow-on errors
    text = "\n".join(torchrun_tail)
    root = _FAILED_RANK.findall(text.split("Root Cause")[-1]) if "Root Cause" in text else []
    if root:
        rank, local_rank, code = (int(x) for x in root[0])
    elif raised:
        rank = local_rank = min(raised)
        code = 1
    elif returncode < 0:  # the agent itself died; its ranks die with it (worker.die_with_the_launcher)
        return (
            f"train: the torchrun agent of launcher={launcher} was killed by {_signal_name(-returncode)}; its ranks "
            "stopped with it and no entry was committed; rerun the same command to resume from the last checkpoint"
        )
    else:
        return f"train: {launcher} exited with status {returncode} (no rank reported an error; see the log above)"
    if rank in raised:
        what = raised[rank]
    elif code < 0:
        what = f"killed by {_signal_name(-code)}"
    else:
        what = f"exited with status {code}"
    lines = _rank_log_tail(logs, local_rank)
    shown = "".join(f"\n    {line}" for line in lines)
    return (
        f"train: rank {rank} failed under launcher={launcher}: {what}"
        + (f"\n  last lines of rank {rank}'s output:{shown}" if lines else "")
        + "\n  the other ranks were stopped and no entry was committed; rerun the same command to resume from "
        "the last checkpoint"
    )


def _rank_log_tail(logs: Path, local_rank: int) -> list[str]:
    files = sorted((logs / "torchrun").glob(f"**/{local_rank}/stderr.log"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    lines = [line for line in files[-1].read_text(errors="replace").splitlines() if line.strip()]
    return lines[-TAIL_LINES:]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
