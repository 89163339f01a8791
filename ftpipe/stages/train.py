"""train: fine-tune the downloaded model on the packed dataset (full, LoRA, QLoRA, 8-bit LoRA) with HF Trainer.

Writes `checkpoints/` (every train.save_steps, last train.save_total_limit kept), `tb/` (TensorBoard scalars),
`final/` (the adapter or the full model), `log_history.json`, with train.sample_every `samples.jsonl`, and
with train.profile.steps `profile/` (a torch.profiler trace of those steps and its summary).
Resumable: the engine keeps `<key>.tmp` after a kill, and a rerun with the same key continues from the newest
complete checkpoint. `launcher=local` trains in this process; other launchers run it under torchrun.
"""

from __future__ import annotations

from typing import Any

from ..data.arrow import DATASET_DIR
from ..data.info import DATA_INFO
from ..engine import Stage, StageContext
from ..training.distributed import rows_per_step, world_size
from ..training.fit import TrainJob


def run(ctx: StageContext) -> dict[str, Any]:
    job = TrainJob(
        cfg=ctx.cfg,
        model_dir=ctx.input("download-model", "model"),
        dataset_dir=ctx.input("pack", DATASET_DIR),
        data_info=ctx.input("map", DATA_INFO),
        out=ctx.out,
        build_dir=ctx.shared / "build",
    )
    if ctx.cfg["launcher"]["name"] == "local":
        from ..training.fit import fit

        metrics = fit(job)
        assert metrics is not None  # one process is the main process
        return metrics
    from ..training.launch import launch

    return launch(job)


def key_view(cfg: dict[str, Any]) -> dict[str, Any]:
    """What the result depends on: the global batch, not how it is split into micro-batches, accumulation
    steps and ranks (per-document attention and a token-weighted loss make the split exact); DeepSpeed's
    ZeRO config and rank count stay, since its sharded checkpoints resume only on the same layout."""
    train = {k: v for k, v in cfg["train"].items() if k not in ("micro_batch_size", "grad_accum")}
    # Only the chosen objective's settings shape the result (orpo.beta never changes a DPO run), and SFT keys
    # stay what they were before preference objectives existed.
    objective = train.get("objective", "sft")
    for key in ("dpo", "orpo"):
        if key != objective:
            train.pop(key, None)
    if objective == "sft":
        train.pop("objective", None)
    if not (train.get("profile") or {}).get("steps"):  # keys from before train.profile existed stay
        train.pop("profile", None)
    train["rows_per_step"] = rows_per_step(cfg["train"], cfg["launcher"])
    launcher = cfg["launcher"]
    zero = (
        {"deepspeed": launcher["deepspeed"], "world_size": world_size(launcher)}
        if launcher.get("deepspeed")
        else {}
    )
    return {**cfg, "train": train, "launcher": zero}


STAGE = Stage(
    name="train",
    version="2",
    # the template shapes the optional sample replies only; pack's key already follows the data
    reads=("train", "optimizer", "seed", "model.trust_remote_code", "template", "launcher"),
    upstream=("download-model", "map", "pack"),
    outputs=("final", "checkpoints", "log_history.json", "tb", "samples.jsonl", "profile"),
    optional=("samples.jsonl", "tb", "profile"),
    run=run,
    key_view=key_view,
    resumable=True,
)
