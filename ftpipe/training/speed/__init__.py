"""The speed levers of the train stage (`train.speed.*`): the policy (`policy.resolve`, once per run) and the
hooks where its choices enter training. Each lever lives in a file of its own: `attention` (per-document
attention), `loss` (fused linear cross-entropy and the answer-only loss), `lora` with `lora_ops` / `nf4_ops`
(fused LoRA linears over bf16 / 4-bit weights) and `swiglu` (the MLP over its fused gate/up group),
`checkpointing` (full, offloaded, selective), `compiled` (torch.compile'd layers), `host_embedding` (a frozen
input embedding in host memory). On CPU every lever resolves to the plain path, and these hooks do what the
stock HF + PEFT setup does.

Call order (ftpipe/training/model.py, ftpipe/training/fit.py):
    levers = resolve(train_cfg, device)
    kwargs = model_load_kwargs(train_cfg, levers)   # -> from_pretrained(..., **kwargs)
    model = prepare_quantized(model, train_cfg, levers)  # a 4-bit / 8-bit base: frozen
    model = patch_model(model, train_cfg, levers)   # after loading
    model = get_peft_model(model, lora, **peft_kwargs(levers))
    model = after_peft(model, train_cfg, levers)    # fused LoRA, compiled / checkpointed decoder layers
    FtTrainer(..., loss_mode=loss_mode(levers))

Each must keep the numbers the plain HF path computes (tests/training/test_speed.py on CPU, the guard of
scripts/bench.py on the GPU).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..devices import compute_dtype
from . import attention, checkpointing, compiled, host_embedding, lora, mlp_chunks, swiglu
from .loss import patch_causal_lm
from .policy import Levers, resolve

__all__ = [
    "Levers",
    "after_peft",
    "callbacks",
    "collator_kwargs",
    "loss_mode",
    "micro_batches",
    "model_load_kwargs",
    "patch_model",
    "peft_kwargs",
    "resolve",
    "training_args_overrides",
]


def model_load_kwargs(train_cfg: dict[str, Any], levers: Levers) -> dict[str, Any]:
    """Attention kernel and the dtype the (frozen or trained) weights are loaded in."""
    cuda = levers.device == "cuda"
    if cuda and levers.compile:
        compiled.set_allocator()
    # Padding-free packed rows need per-document causal attention. sdpa does it from the restarting
    # position_ids with a dense [T, T] mask; ftpipe_docs (CPU default) runs each document alone (sum L_i^2
    # instead of T^2 work: a SmolLM2 colorist step halved); varlen (CUDA default) / flex do it in one fused
    # kernel. All are registered here, before loading.
    attention.register()
    kwargs: dict[str, Any] = {"attn_implementation": attention.attn_implementation(levers)}
    dtype = compute_dtype(train_cfg, levers.device)
    frozen_base = train_cfg["method"] in {"lora", "lora8bit"} or (
        train_cfg["method"] == "qlora" and levers.adapter_dtype == "bf16" and cuda
    )
    if frozen_base and dtype != torch.float32:
        # Frozen base weights are never updated, so storing them in the compute dtype halves memory, and
        # autocast no longer re-casts every fp32 weight on every forward: measured 2x per step on CPU.
        # Trained weights (full fine-tuning) stay fp32 masters under autocast.
        kwargs["dtype"] = dtype
    else:
        kwargs["dtype"] = torch.float32
    return kwargs


def prepare_quantized(model: nn.Module, train_cfg: dict[str, Any], levers: Levers) -> nn.Module:
    """Freeze a quantized base for its adapters. PEFT's `prepare_model_for_kbit_training` also upcasts every
    frozen 16-bit weight (norms, embeddings, an untied head) to fp32. With bf16 adapters (QLoRA on CUDA) they
    stay in the compute dtype: they never train, so it loses nothing, and the upcast copies were the run's
    peak (Qwen2.5-7B: embeddings and head, 2 GiB each in fp32, at load: 8.21 GiB against 7.04 in training)."""
    if train_cfg["method"] == "qlora" and levers.adapter_dtype == "bf16":
        model.requires_grad_(False)
        lora.downcast_frozen(model, compute_dtype(train_cfg, levers.device))  # any fp32 the loader kept
        return model
    from peft import prepare_model_for_kbit_training

    # Checkpointing is patch_model's job; here only the fp32 casts and the freezing.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def patch_model(model: nn.Module, train_cfg: dict[str, Any], levers: Levers) -> nn.Module:
    """After loading, before PEFT: no KV cache in training (with one, packed rows attend across documents),
    per-document attention with its boundary hook, fused linear cross-entropy, checkpointing."""
    model.config.use_cache = False
    attention.install_packed_attention(model, levers)
    if levers.fused_ce != "off":
        patch_causal_lm(model, levers.fused_ce)
    if levers.checkpointing == "full":
        checkpointing.enable_full(model)
    if levers.mlp_chunk_tokens:
        mlp_chunks.chunk_mlps(model, levers.mlp_chunk_tokens)
    return model


def peft_kwargs(levers: Levers) -> dict[str, Any]:
    """Extra arguments for `get_peft_model`: bf16 adapters stay bf16 where the lever says so (PEFT's default,
    fp32 adapters next to a bf16 base, makes every LoRA matmul upcast its input under autocast)."""
    return {"autocast_adapter_dtype": False} if levers.adapter_dtype == "bf16" else {}


def after_peft(model: nn.Module, train_cfg: dict[str, Any], levers: Levers) -> nn.Module:
    """After PEFT: adapters in the compute dtype, fused LoRA linears, compiled and/or checkpointed layers."""
    if train_cfg["method"] == "full":
        return model
    if levers.adapter_dtype == "bf16":
        lora.cast_adapters(model, compute_dtype(train_cfg, levers.device))
    if levers.fused_lora:
        # Offloaded / full checkpointing: a 4-bit weight dequantized in the recompute is kept for its backward.
        lora.fuse_lora(
            model,
            keep_dequant=levers.checkpointing in ("offload", "full"),
            skip_unread_output=levers.skip_unread_output,
        )
        if levers.fused_swiglu:
            swiglu.fuse_swiglu(model)
    if levers.cpu_embeddings:
        host_embedding.host_embeddings(model)
    if levers.compile or levers.checkpointing in ("offload", "selective"):
        checkpointing.wrap_layers(model, levers)
    return model


def collator_kwargs(levers: Levers) -> dict[str, Any]:
    """PackedCollator options: with the CUDA levers it also computes the document boundaries and the trained
    token count on the CPU, so the GPU step reads nothing back."""
    return {
        "boundaries": levers.attention == "varlen" or levers.fused_ce != "off",
        "host_ids": levers.cpu_embeddings,
        "row_index": levers.frozen_prefix,
    }


def training_args_overrides(levers: Levers) -> dict[str, Any]:
    """TrainingArguments for a step with no host syncs (CUDA levers on): Trainer's NaN filter on the logged
    loss reads the loss back after every backward (`torch.isnan(loss)` in an `if`), which drains the GPU
    before the optimizer step is even queued; batches are copied from pinned memory without blocking. A NaN
    loss still shows in the logs, it is just not replaced there by the running mean."""
    if levers.device != "cuda" or levers.fused_ce == "off":
        return {}
    return {
        "logging_nan_inf_filter": False,
        "dataloader_pin_memory": True,
        "accelerator_config": {"non_blocking": True},
    }


def loss_mode(levers: Levers) -> str:
    """FtTrainer's loss path (speed/loss.py): with the fused cross-entropy the model computes the loss itself
    (`model`), on the trained tokens only; without it the answer-only LM head (`answer_only`)."""
    return "model" if levers.fused_ce != "off" else "answer_only"


def micro_batches(train_cfg: dict[str, Any], row_len: int | None) -> tuple[int, int]:
    """(per-device micro-batch rows, grad accumulation) with about `train.speed.tokens_per_micro_batch` tokens
    per micro-batch and the same rows per optimizer step (rounded up to whole micro-batches). Packed rows all
    hold `row_len` tokens."""
    mbs, ga = train_cfg["micro_batch_size"], train_cfg["grad_accum"]
    tokens = (train_cfg.get("speed") or {}).get("tokens_per_micro_batch")
    if not tokens or not row_len:
        return mbs, ga
    rows = mbs * ga
    per_micro_batch = max(1, min(rows, tokens // row_len))
    return per_micro_batch, math.ceil(rows / per_micro_batch)


def callbacks(levers: Levers) -> list[Any]:
    """Trainer callbacks of the levers (CUDA, compiled layers): quiet garbage collection."""
    if levers.device != "cuda" or not levers.compile:
        return []
    return [compiled.QuietGC()]
