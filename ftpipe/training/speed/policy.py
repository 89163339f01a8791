"""The speed policy: `train.speed.*` (where `auto` is the default) resolved once per run into concrete choices
for the training device. On the CPU every `auto` resolves to the plain path; docs/performance.md has the
measurements behind the CUDA defaults."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import FtpipeError
from . import fa4

log = logging.getLogger("ftpipe")


@dataclass(frozen=True)
class Levers:
    device: str  # cpu | cuda: the device they were resolved for
    attention: str  # sdpa | docs | varlen | flex
    fused_ce: str  # off | liger | torch
    compile: bool
    fused_lora: bool
    checkpointing: str  # none | full | offload | selective
    adapter_dtype: str  # bf16 | fp32
    activation_budget: float | None = None
    cpu_embeddings: bool = False
    frozen_prefix: bool = False
    mlp_chunk_tokens: int = 0  # 0: the plain MLP
    fused_swiglu: bool = False
    # fa2 | fa4: varlen's kernel (FlashAttention-2 inside torch, or flash-attn-4)
    attention_kernel: str = "fa2"
    # an offloaded checkpoint's recompute skips the down projection's base GEMM (speed/lora.py)
    skip_unread_output: bool = False


# Micro-batches of this many tokens or more checkpoint their layers by default on CUDA (offloaded): without it
# Llama-3.2-1B held 29.6 GiB for one 32k-token sequence and 110.7 GiB for 128k (docs/performance.md).
LONG_MICRO_BATCH = 32768
MLP_CHUNK = 16384


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve(
    train_cfg: dict[str, Any],
    device: torch.device | str,
    zero_stage: int | None = None,
    micro_batch_tokens: int | None = None,
) -> Levers:
    """Concrete lever settings for `train_cfg` (the `train` config section) on `device`, under DeepSpeed
    ZeRO `zero_stage` if any, for micro-batches of `micro_batch_tokens` tokens (None: not known, short)."""
    kind = torch.device(device).type
    cuda = kind == "cuda"
    speed = train_cfg.get("speed") or {}
    method = train_cfg.get("method", "lora")

    def pick(key: str, auto: Any) -> Any:
        value = speed.get(key, "auto")
        return auto if value in ("auto", None) else value

    # The varlen (FlashAttention) kernel is CUDA-only and takes bf16/fp16 only; elsewhere sdpa with the
    # restarting position_ids is the per-document path.
    varlen_ok = cuda and train_cfg.get("precision", "auto") != "fp32"
    attention = pick("attention", "varlen" if varlen_ok else ("sdpa" if cuda else "docs"))
    if attention == "varlen" and not varlen_ok:
        attention = "sdpa"
    # flash-attn-4 where it runs: its varlen kernel is 1.7x FlashAttention-2's on packed rows at head dim 64
    # (1.8x at 128), and the 1B LoRA and QLoRA steps 14% faster through the command, for ~4 s more at a warm
    # start (importing its DSL, loading its kernels); docs/performance.md, c32-c33.
    fa4_ok = attention == "varlen" and fa4.usable(device)
    attention_kernel = pick("attention_kernel", "fa4" if fa4_ok else "fa2")
    if attention_kernel == "fa4" and not fa4_ok:
        raise FtpipeError(
            "train.speed.attention_kernel=fa4 needs train.speed.attention=varlen, a GPU of compute capability 9.0 "
            f"or newer and the flash-attn-4 package (pip install 'ftpipe[fa4]'); here: attention={attention}, "
            f"device={device}, flash-attn-4: {fa4.missing() or 'imports'}"
        )
    fused_ce = pick("fused_ce", ("liger" if liger_available() else "torch") if cuda else "off")
    if fused_ce == "liger" and not (cuda and liger_available()):
        fused_ce = "torch"
    if train_cfg.get("objective", "sft") != "sft" and fused_ce != "off":
        # A fused cross-entropy returns one summed loss; preference objectives need each answer's log-prob.
        # They keep the answer-only LM head instead (training/objectives.py).
        log.info(
            "[train] objective %s: the fused cross-entropy is off (it needs per-answer log-probs)",
            train_cfg["objective"],
        )
        fused_ce = "off"
    # Compiled decoder layers: measured for LoRA and QLoRA; full fine-tuning and 8-bit keep eager layers.
    compile_on = pick("compile", "on" if cuda and method in ("lora", "qlora") else "off") == "on"
    adapter_dtype = pick("adapter_dtype", "bf16" if cuda else "fp32")
    fused_lora = pick("fused_lora", "on" if cuda and method in ("lora", "qlora") else "off") == "on"
    # Off unless asked: on an H200 its operator form took ~1.4 ms of kernel time off a 1B LoRA step of ~118 ms
    # and kept one more hidden-size tensor a layer (peak 9.40 -> 9.90 GiB; docs/performance.md, c28).
    fused_swiglu = fused_lora and pick("fused_swiglu", "off") == "on"
    # Checkpointing trades speed for memory: only where asked. Offloading parks inputs in pinned host memory
    # for a GPU; on the CPU it is plain (full) checkpointing.
    long_batches = cuda and (micro_batch_tokens or 0) >= LONG_MICRO_BATCH
    ckpt = pick("checkpointing", "offload" if long_batches else "none")
    if ckpt == "offload" and not cuda:
        ckpt = "full"
    if zero_stage == 3 and (
        fused_lora or compile_on or fused_ce != "off" or ckpt in ("offload", "selective")
    ):
        # ZeRO-3 partitions every weight and gathers it in module hooks: the fused LoRA/nf4 ops and the fused
        # loss read whole weights outside those hooks, compiled or re-wrapped layers bypass them.
        log.info(
            "[train] ZeRO-3: fused LoRA ops, compiled layers, the fused loss and offloaded checkpointing are off "
            "(they need whole weights; ZeRO-3 partitions them)"
        )
        fused_lora, fused_swiglu, compile_on, fused_ce = False, False, False, "off"
        ckpt = "full" if ckpt in ("offload", "selective") else ckpt
    # Exact (the skipped output is never read: the gradients are bit for bit the same, tests/training/), so on
    # wherever it applies: the fused LoRA ops under offloaded checkpointing, whose forwards with grad are all
    # recomputes. Expected from the FLOPs, not yet measured on a GPU: Qwen2.5-7B QLoRA's recompute GEMMs ~84 ms
    # of a 364 ms step (c21), 29% of them down's.
    skip_unread = pick("skip_unread_output", "on") == "on" and fused_lora and ckpt == "offload"
    return Levers(
        device=kind,
        attention=attention,
        attention_kernel=attention_kernel,
        skip_unread_output=skip_unread,
        fused_ce=fused_ce,
        compile=compile_on,
        fused_lora=fused_lora,
        fused_swiglu=fused_swiglu,
        checkpointing=ckpt,
        adapter_dtype=adapter_dtype,
        # Compiled layers keep 80% of their activations (the partitioner recomputes the cheapest elementwise
        # ones in backward): Llama-3.2-1B 12.3 -> 9.4 GiB without checkpointing, 3.50 -> 3.47 GiB with the
        # offloaded one, at about the same speed (docs/performance.md).
        activation_budget=speed.get("activation_budget") or (0.8 if compile_on else None),
        # QLoRA is the memory-first method: its frozen input embeddings (untied) stay in host memory.
        cpu_embeddings=pick("cpu_embeddings", "on" if cuda and method == "qlora" else "off") == "on",
        # Frozen bottom layers run once per row (speed/frozen_prefix.py; a no-op unless `train.lora.last_layers`
        # freezes some): on the CPU, where their forward is most of a step. Sampling during training generates
        # with the whole model, and the preference losses read token ids, so neither combines with it.
        frozen_prefix=pick("frozen_prefix", "off" if cuda else "on") == "on"
        and not train_cfg.get("sample_every")
        and train_cfg.get("objective", "sft") == "sft",
        # Long micro-batches' MLP in checkpointed chunks (a no-op for shorter ones); not under ZeRO-3, where no
        # run measured it.
        mlp_chunk_tokens=int(
            MLP_CHUNK
            if speed.get("mlp_chunk_tokens") is None and cuda and zero_stage != 3
            else speed.get("mlp_chunk_tokens") or 0
        ),
    )
