"""Per-device performance choices: where the levers of `levers.py` (switched by `train.speed.*`) enter the train
stage. On CPU every lever resolves to the plain path, and these hooks do what the stock HF + PEFT setup does.

Call order (ftpipe/training/model.py, ftpipe/stages/train.py):
    kwargs = model_load_kwargs(train_cfg, device)   # -> from_pretrained(..., **kwargs)
    model = patch_model(model, train_cfg, device)   # after loading (and prepare_model_for_kbit_training)
    model = get_peft_model(model, lora, **peft_kwargs(train_cfg, device))
    model = after_peft(model, train_cfg, device)    # fused LoRA, compiled / checkpointed decoder layers
    FtTrainer(..., loss_mode=loss_mode(train_cfg, device))

Each must keep the numbers the plain HF path computes (tests/test_speed_levers.py on CPU, the guard of
scripts/bench.py on the GPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from . import attention
from . import levers as lv
from .devices import compute_dtype
from .loss import patch_causal_lm


def _kind(device: torch.device | str) -> str:
    return torch.device(device).type


def model_load_kwargs(train_cfg: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Attention kernel and the dtype the (frozen or trained) weights are loaded in."""
    kind = _kind(device)
    levers = lv.resolve(train_cfg, kind)
    if kind == "cuda" and levers.compile:
        # Grow allocator segments in place instead of cudaMalloc/cudaFree churn: the offloaded checkpoint's
        # side-stream copies (record_stream) and 4-bit dequantized weights free blocks out of order.
        try:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        except (AttributeError, RuntimeError):  # a torch without the setting: the default allocator
            pass
    # Padding-free packed rows need per-document causal attention. sdpa does it from the restarting
    # position_ids with a dense [T, T] mask; ftpipe_docs (CPU default) runs each document alone (sum L_i^2
    # instead of T^2 work: a SmolLM2 colorist step halved); varlen (CUDA default) / flex do it in one fused
    # kernel. All are registered here, before loading.
    attention.register()
    kwargs: dict[str, Any] = {"attn_implementation": lv.attn_implementation(levers)}
    dtype = compute_dtype(train_cfg, kind)
    frozen_base = train_cfg["method"] in {"lora", "lora8bit"} or (
        train_cfg["method"] == "qlora" and levers.adapter_dtype == "bf16" and kind == "cuda"
    )
    if frozen_base and dtype != torch.float32:
        # Frozen base weights are never updated, so storing them in the compute dtype halves memory, and
        # autocast no longer re-casts every fp32 weight on every forward: measured 2x per step on CPU.
        # Trained weights (full fine-tuning) stay fp32 masters under autocast.
        kwargs["dtype"] = dtype
    else:
        kwargs["dtype"] = torch.float32
    return kwargs


def patch_model(model: nn.Module, train_cfg: dict[str, Any], device: torch.device | str) -> nn.Module:
    """After loading, before PEFT: no KV cache in training (with one, packed rows attend across documents),
    per-document attention with its boundary hook, fused linear cross-entropy, checkpointing."""
    kind = _kind(device)
    levers = lv.resolve(train_cfg, kind)
    model.config.use_cache = False
    lv.install_packed_attention(model, levers)
    if levers.fused_ce != "off":
        patch_causal_lm(model, levers.fused_ce)
    if train_cfg["method"] == "qlora" and levers.adapter_dtype == "bf16":
        # prepare_model_for_kbit_training upcast the frozen norms and embeddings to fp32 (1 GiB for
        # Llama-3.2-1B's embeddings alone); they never train, so the compute dtype loses nothing.
        lv.downcast_frozen(model, compute_dtype(train_cfg, kind))
    if levers.checkpointing == "full":
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def peft_kwargs(train_cfg: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Extra arguments for `get_peft_model`: bf16 adapters stay bf16 where the lever says so (PEFT's default,
    fp32 adapters next to a bf16 base, makes every LoRA matmul upcast its input under autocast)."""
    levers = lv.resolve(train_cfg, _kind(device))
    return {"autocast_adapter_dtype": False} if levers.adapter_dtype == "bf16" else {}


def after_peft(model: nn.Module, train_cfg: dict[str, Any], device: torch.device | str) -> nn.Module:
    """After PEFT: adapters in the compute dtype, fused LoRA linears, compiled and/or checkpointed layers."""
    kind = _kind(device)
    levers = lv.resolve(train_cfg, kind)
    if train_cfg["method"] == "full":
        return model
    if levers.adapter_dtype == "bf16":
        lv.cast_adapters(model, compute_dtype(train_cfg, kind))
    if levers.fused_lora:
        # Offloaded / full checkpointing: a 4-bit weight dequantized in the recompute is kept for its backward.
        lv.fuse_lora(model, keep_dequant=levers.checkpointing in ("offload", "full"))
    if levers.cpu_embeddings:
        lv.host_embeddings(model)
    if levers.compile or levers.checkpointing in ("offload", "selective"):
        lv.wrap_layers(model, levers)
    return model


def collator_kwargs(train_cfg: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """PackedCollator options: with the CUDA levers it also computes the document boundaries and the trained
    token count on the CPU, so the GPU step reads nothing back."""
    levers = lv.resolve(train_cfg, _kind(device))
    return {
        "boundaries": levers.attention == "varlen" or levers.fused_ce != "off",
        "host_ids": levers.cpu_embeddings,
    }


def training_args_overrides(train_cfg: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """TrainingArguments for a step with no host syncs (CUDA levers on): Trainer's NaN filter on the logged
    loss reads the loss back after every backward (`torch.isnan(loss)` in an `if`), which drains the GPU
    before the optimizer step is even queued; batches are copied from pinned memory without blocking. A NaN
    loss still shows in the logs, it is just not replaced there by the running mean."""
    if _kind(device) != "cuda" or lv.resolve(train_cfg, "cuda").fused_ce == "off":
        return {}
    return {
        "logging_nan_inf_filter": False,
        "dataloader_pin_memory": True,
        "accelerator_config": {"non_blocking": True},
    }


def loss_mode(train_cfg: dict[str, Any], device: torch.device | str) -> str:
    """FtTrainer's loss path: with the fused cross-entropy the model computes the loss itself (`full`), on the
    trained tokens only (the answer-only saving is kept: see loss.causal_lm_forward)."""
    levers = lv.resolve(train_cfg, _kind(device))
    return "full" if levers.fused_ce != "off" else train_cfg["loss"]


def micro_batches(train_cfg: dict[str, Any], row_len: int | None) -> tuple[int, int]:
    """(per-device micro-batch rows, grad accumulation) honouring `train.speed.tokens_per_micro_batch`."""
    tokens = (train_cfg.get("speed") or {}).get("tokens_per_micro_batch")
    mbs, ga = train_cfg["micro_batch_size"], train_cfg["grad_accum"]
    return lv.micro_batches(mbs, ga, row_len, tokens) if tokens and row_len else (mbs, ga)


class QuietGC(TrainerCallback):
    """Trainer callback: no full Python garbage collections in the middle of steps. A generation-2 collection
    walks every live object (transformers, dynamo caches: millions) and stalls the host for tens of ms, while
    the GPU, fed just-in-time by the compiled layers, runs dry: the slow outlier steps of the bench. Objects
    alive at the start are frozen out of collection; young generations are collected every `every` steps."""

    def __init__(self, every: int = 50) -> None:
        self.every = every

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import gc

        gc.collect()
        gc.freeze()
        gc.disable()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every == 0:
            import gc

            gc.collect(1)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import gc

        gc.enable()
        gc.unfreeze()


def callbacks(train_cfg: dict[str, Any], device: torch.device | str) -> list[Any]:
    """Trainer callbacks of the levers (CUDA, compiled layers): quiet garbage collection."""
    if _kind(device) != "cuda" or not lv.resolve(train_cfg, "cuda").compile:
        return []
    return [QuietGC()]
