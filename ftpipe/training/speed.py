"""Per-device performance choices, kept in three small functions so GPU levers can be added in one place.

`model_load_kwargs` feeds `from_pretrained`, `patch_model` runs on the loaded model before PEFT wraps it,
`peft_kwargs` feeds `get_peft_model`. Each must keep the numbers the plain HF path computes (tests compare).
"""

from __future__ import annotations

from typing import Any

import torch

from . import attention
from .devices import compute_dtype


def model_load_kwargs(train_cfg: dict[str, Any], device: str) -> dict[str, Any]:
    """Attention kernel and the dtype the (frozen or trained) weights are loaded in."""
    # Padding-free packed rows need per-document causal attention. sdpa does it from the restarting position_ids
    # with a dense [T, T] mask; on CPU ftpipe_docs runs each document alone (Σ Lᵢ² instead of T² work), which
    # halved a SmolLM2 step on colorist rows. On CUDA the fused kernels are the speed levers' business.
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa" if device == "cuda" else attention.register()}
    dtype = compute_dtype(train_cfg, device)
    if train_cfg["method"] in {"lora", "lora8bit"} and dtype != torch.float32:
        # Frozen base weights are never updated, so storing them in the compute dtype halves memory, and
        # autocast no longer re-casts every fp32 weight on every forward: measured 2x per step on CPU.
        # Trained weights (full fine-tuning) stay fp32 masters under autocast.
        kwargs["dtype"] = dtype
    else:
        kwargs["dtype"] = torch.float32
    return kwargs


def patch_model(model: torch.nn.Module, train_cfg: dict[str, Any], device: str) -> torch.nn.Module:
    """Swap in faster modules/kernels after loading; on CPU the stock model is already the fastest we have."""
    if train_cfg["gradient_checkpointing"]:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def peft_kwargs(train_cfg: dict[str, Any], device: str) -> dict[str, Any]:
    """Extra arguments for `get_peft_model`; fp32 adapters (PEFT's default) are the safe baseline."""
    return {}
