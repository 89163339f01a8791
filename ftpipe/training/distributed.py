"""Facts about a launched run that the train stage, `ftpipe show` and the ranks must agree on: how many ranks,
how many rows an optimizer step sees, and the DeepSpeed config as it will be used."""

from __future__ import annotations

from typing import Any


def world_size(launcher: dict[str, Any]) -> int:
    """Ranks over all nodes (`launcher=local` is one)."""
    if launcher["name"] == "local":
        return 1
    return int(launcher["nproc_per_node"]) * int(launcher["nnodes"])


def rows_per_step(train: dict[str, Any], launcher: dict[str, Any]) -> int:
    """The global batch: micro_batch_size × grad_accum × world_size packed rows per optimizer step."""
    return train["micro_batch_size"] * train["grad_accum"] * world_size(launcher)


def zero_stage(launcher: dict[str, Any]) -> int | None:
    return ((launcher.get("deepspeed") or {}).get("zero_optimization") or {}).get("stage")


def deepspeed_config(
    launcher: dict[str, Any], micro_batch: int, grad_accum: int, precision: str, max_grad_norm: float
) -> dict[str, Any] | None:
    """The launcher's DeepSpeed section completed from the train config (one source of truth: Trainer checks
    these against its own arguments), or None without DeepSpeed."""
    if not launcher.get("deepspeed"):
        return None
    filled = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size(launcher),
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    return {**filled, **launcher["deepspeed"]}
