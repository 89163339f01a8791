"""Which device trains and in which precision (`train.precision: auto` picks per device)."""

from __future__ import annotations

import functools
import resource
import sys
from typing import Any

import torch

from ..errors import FtpipeError


def train_device() -> str:
    from ..models.loading import best_device

    return best_device()


@functools.cache
def cpu_has_bf16() -> bool:
    """AVX512-BF16 / AMX make bf16 autocast fast on CPU; without them it is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def precision(train_cfg: dict[str, Any], device: str) -> str:
    """Resolve `train.precision` to bf16 / fp16 / fp32 for this device."""
    wanted = train_cfg["precision"]
    if wanted == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if wanted == "fp16" and device != "cuda":
        raise FtpipeError("config key `train.precision`: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if wanted == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise FtpipeError("config key `train.precision`: this GPU has no bf16; use fp16 or fp32")
    return wanted


def compute_dtype(train_cfg: dict[str, Any], device: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        precision(train_cfg, device)
    ]


def reset_peak_memory(device: str) -> None:
    """Start a new peak-memory window on CUDA (a host-side counter: no sync). The CPU's peak RSS cannot be
    reset: there every window's figure is the process's peak so far."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float:
    """Peak accelerator memory on CUDA (since the last `reset_peak_memory`), peak resident set size of this
    process on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def autocast_dtype(resolved_precision: str) -> torch.dtype | None:
    """The autocast dtype for a resolved precision (None for fp32: no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved_precision)
