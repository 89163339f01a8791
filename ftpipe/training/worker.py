"""One rank of a launched train stage: `python -m ftpipe.training.worker LAUNCH_JSON` (started by torchrun)."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from ..errors import FtpipeError
from .fit import TrainJob, fit
from .launch import LOGS, METRICS


def same_job_on_every_rank(spec_text: str, timeout_minutes: int) -> None:
    """Every rank must have read the same launch spec: ranks on a node whose cache is not the launching node's
    (a local folder at the same path, an old spec) would train on other data or write elsewhere."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    if not dist.is_initialized():  # Trainer / DeepSpeed reuse this group
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    digest = hashlib.sha256(spec_text.encode()).hexdigest()
    seen: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (socket.gethostname(), digest))
    hosts = sorted({host for host, d in seen if d != seen[0][1]})  # type: ignore[misc]
    if hosts:
        raise FtpipeError(
            f"the cache on {', '.join(hosts)} holds another launch spec than rank 0's at the same path: every "
            "node must see the same cache (a shared filesystem; set FTPIPE_CACHE or cache_dir= to it)"
        )


def die_with_the_launcher() -> None:
    """Linux: end this rank when its torchrun agent dies (killed, OOM), instead of training on as an orphan that
    would write into a stage dir nobody commits."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        try:  # the agent may have died while this rank was starting, before the line above
            parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            parent = b""
        if b"torch.distributed.run" not in parent:
            raise SystemExit("ftpipe: the torchrun agent that started this rank is gone")


def main(spec_path: str) -> None:
    die_with_the_launcher()
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(message)s")
    spec = Path(spec_path)
    if not spec.is_file():
        raise SystemExit(
            f"ftpipe: no launch spec at {spec} on {socket.gethostname()}: every node must see the launching "
            "node's cache (a shared filesystem)"
        )
    spec_text = spec.read_text()
    job = TrainJob.from_json(spec_text)
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        same_job_on_every_rank(spec_text, job.cfg["launcher"]["timeout_minutes"])
        metrics = fit(job)
    except BaseException as exc:  # the launching process names this rank and its exception
        logs = job.out / LOGS
        logs.mkdir(exist_ok=True)
        (logs / f"rank-{os.environ.get('RANK', '0')}.error").write_text(f"{type(exc).__name__}: {exc}")
        raise
    if metrics is not None:
        partial = job.out / (METRICS + ".part")
        partial.write_text(json.dumps(metrics))
        os.replace(partial, job.out / METRICS)
    import torch.distributed as dist

    if dist.is_initialized():
        # Left to interpreter exit, gloo/DeepSpeed threads can abort the rank. Torn down while another rank
        # still wrote its outputs, gloo once aborted one ("terminate called without an active exception"), so
        # every rank leaves the group together.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
