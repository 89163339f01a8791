"""The train stage under each multi-process launcher on CPU (gloo), run as a user runs it.

For torchrun, DeepSpeed ZeRO-2 and ZeRO-3 with two ranks: rank 1 is SIGKILLed after a checkpoint; the stage
fails naming rank 1 with no entry and no process left; the rerun resumes from the checkpoint, and the whole
loss curve equals one process's at the same global batch (2 rows per step). The data stages run once.
A DeepSpeed run compiles its shared-memory op once (~50 s, kept in TORCH_EXTENSIONS_DIR); each launch ~20 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="two ranks need two GPUs here"
)

RUN = (
    "+recipe=assistant_lora",
    "model=tiny_llama",
    "dataset.name=Ada",
    "stages=[train]",
    "train.precision=fp32",
    "train.max_steps=12",
    "train.save_steps=2",
    "train.logging_steps=1",
    "train.epochs=1",
)
DATA_STAGES = ("download-model", "download-data", "map", "pack")
# two ranks of one row each = one process of two rows per step
TWO_RANKS = ("launcher.nproc_per_node=2", "train.micro_batch_size=1")
# Losses of the launched runs against one process: ZeRO reduces gradients in another order (measured ≤ 2e-6)
LOSS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    shared = Path(os.environ.get("FTPIPE_CACHE") or tmp_path_factory.mktemp("ops")) / "shared"
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(shared / "torch_extensions")}


def ftpipe(tmp_path: Path, env: dict, *args: str, wait: bool = True):
    cmd = [
        sys.executable, "-m", "ftpipe", *RUN, *args,
        f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path}/run-{time.time_ns()}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=900)
    return proc.returncode, stdout + stderr  # Hydra's log goes to stdout


def rows_of(tmp_path: Path) -> dict[str, dict]:
    newest = max(tmp_path.glob("run-*/run.json"), key=lambda p: p.stat().st_mtime)
    return {row["name"]: row for row in json.loads(newest.read_text())["stages"]}


def losses(train_row: dict) -> list[float]:
    history = json.loads((Path(train_row["output"]) / "log_history.json").read_text())
    return [row["loss"] for row in history if "loss" in row]


def worker_pids(where: Path, rank: int | None = None) -> list[int]:
    """Live ftpipe rank processes of the run in `where` (only global rank `rank` if given), read from /proc.
    Other tests' runs (other files, other pytest workers) are left out: their launch spec is elsewhere."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            # ranks, and the torchrun agent that started them, of this run
            if b"ftpipe.training.worker" not in cmdline or str(where).encode() not in cmdline:
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if rank is None or f"RANK={rank}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def ranks_gone(where: Path, within_s: float = 60) -> bool:
    """Whether the run's rank processes have all exited within `within_s`: a stopped rank takes a moment to
    exit, longer on a loaded machine, so the test waits for it rather than sleeping a fixed time."""
    deadline = time.time() + within_s
    while worker_pids(where) and time.time() < deadline:
        time.sleep(0.1)
    return worker_pids(where) == []


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, env) -> dict:
    where = tmp_path_factory.mktemp("one-process")
    rc, out = ftpipe(where, env, "train.micro_batch_size=2")
    assert rc == 0, out[-3000:]
    return rows_of(where)["train"]


# the DeepSpeed cases (2-5 min on 2 CPU cores) run in `make test-full`; torchrun covers the kill path here
@pytest.mark.parametrize(
    "launcher",
    [
        "torchrun",
        pytest.param("deepspeed_zero2", marks=pytest.mark.slow),
        pytest.param("deepspeed_zero3", marks=pytest.mark.slow),
    ],
)
def test_a_killed_rank_fails_the_stage_naming_it_and_the_rerun_resumes_to_one_process_curve(
    tmp_path, env, one_process, launcher
):
    args = (f"launcher={launcher}", *TWO_RANKS)
    proc = ftpipe(tmp_path, env, *args, wait=False)
    deadline, checkpoint = time.time() + 600, None
    while checkpoint is None and time.time() < deadline and proc.poll() is None:
        checkpoint = next(
            (tmp_path / "cache" / "train").glob("*.tmp/checkpoints/checkpoint-2/trainer_state.json"), None
        )
        time.sleep(0.05)
    assert checkpoint is not None, proc.communicate()[1][-3000:]
    (victim,) = worker_pids(tmp_path, rank=1)
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    out = stdout + stderr
    assert proc.returncode != 0
    assert f"rank 1 failed under launcher={launcher}: killed by SIGKILL" in out, out[-3000:]
    assert "rerun the same command to resume" in out
    assert "Traceback" not in stdout.split("rank 1 failed")[-1]  # ftpipe's own message is one paragraph
    assert not list((tmp_path / "cache" / "train").glob("*/manifest.json"))  # nothing committed
    assert ranks_gone(tmp_path)  # the other rank was stopped too

    rc, out = ftpipe(tmp_path, env, *args)
    assert rc == 0, out[-3000:]
    rows = rows_of(tmp_path)
    train = rows["train"]
    assert train["resumed_from_step"] >= 2 and f"resuming from step {train['resumed_from_step']}" in out
    assert train["train_steps"] == 12 and train["train_world_size"] == 2
    assert losses(train) == pytest.approx(losses(one_process), rel=LOSS_TOLERANCE)
    # the global batch decides the key: DDP shares one process's; ZeRO's sharded checkpoints need their own
    assert (train["key"] == one_process["key"]) == (launcher == "torchrun")
    # the data stages ran once, in the killed run, before any rank started; the rerun found them
    assert all(rows[name]["hit"] for name in DATA_STAGES)
    assert len(list((tmp_path / "cache" / "map").glob("*/manifest.json"))) == 1


def test_show_prints_the_global_batch_the_deepspeed_config_and_each_nodes_command(tmp_path, env):
    args = ("launcher=deepspeed_zero2", "launcher.nproc_per_node=4", "launcher.nnodes=2")
    done = subprocess.run(
        [sys.executable, "-m", "ftpipe", "show", *RUN, *args, "launcher.rdzv_endpoint=node0:29500",
         "train.micro_batch_size=2", "train.grad_accum=3", f"cache_dir={tmp_path}"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "global batch = micro_batch_size 2 × grad_accum 3 × world_size 8 = 48 packed rows" in out
    ds = json.loads(out.split("deepspeed config: ")[1].splitlines()[0])
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 48 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 2 and ds["fp16"] == {"enabled": False}
    assert "--nnodes=2" in out and "--rdzv_endpoint=node0:29500" in out and "nodes 1..1:" in out


def test_ranks_do_not_outlive_a_killed_torchrun_agent(tmp_path, env):
    proc = ftpipe(tmp_path, env, "launcher=torchrun", *TWO_RANKS, wait=False)
    deadline = time.time() + 300
    while (
        len(worker_pids(tmp_path)) < 3 and time.time() < deadline and proc.poll() is None
    ):  # the agent + two ranks
        time.sleep(0.1)
    agents = [
        p
        for p in worker_pids(tmp_path)
        if b"torch.distributed.run" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    assert len(agents) == 1, proc.communicate()[1][-3000:]
    os.kill(agents[0], signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "torchrun agent of launcher=torchrun was killed by SIGKILL" in stdout
    assert ranks_gone(tmp_path)
    assert not list((tmp_path / "cache" / "train").glob("*/manifest.json"))


@pytest.mark.slow  # two full fine-tunings and merges, ~80 s: make test-full
def test_full_fine_tuning_under_zero3_merges_to_the_single_process_model(tmp_path, env):
    """ZeRO-3 partitions the weights over the ranks: the 16-bit weights gathered on save must give the merged
    model one process gives at the same global batch."""
    from safetensors.torch import load_file

    merged = {}
    for name, args in {
        "one": ("train.micro_batch_size=2",),
        "zero3": ("launcher=deepspeed_zero3", *TWO_RANKS),
    }.items():
        where = tmp_path / name
        where.mkdir()
        rc, out = ftpipe(where, env, "train.method=full", "stages=[merge]", "merge.dtype=fp32", *args)
        assert rc == 0, out[-3000:]
        folder = Path(rows_of(where)["merge"]["output"]) / "model"
        merged[name] = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert merged["one"].keys() == merged["zero3"].keys()
    worst = max((merged["one"][k] - merged["zero3"][k]).abs().max().item() for k in merged["one"])
    assert worst < 1e-5, worst
