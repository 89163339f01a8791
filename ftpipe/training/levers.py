"""Speed levers for the train stage, each a small function switched by `train.speed.*`.

`resolve()` turns the config (where `auto` is the default) into concrete choices for a device; the hooks in
`speed.py` apply them at three points: loading the model, after loading (before PEFT), after PEFT. On the CPU
every `auto` resolves to the plain path. docs/performance.md has the measurements behind the CUDA defaults.

No `from __future__ import annotations` here: torch.library.custom_op reads the fused-LoRA ops' annotations.
"""

import functools
import importlib.util
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import attention as attn


@dataclass(frozen=True)
class Levers:
    attention: str  # sdpa | varlen | flex
    fused_ce: str  # off | liger | torch
    compile: bool
    fused_lora: bool
    checkpointing: str  # none | full | offload | selective
    adapter_dtype: str  # bf16 | fp32
    tokens_per_micro_batch: int | None
    activation_budget: float | None = None
    cpu_embeddings: bool = False


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve(train_cfg: Any, device: torch.device | str) -> Levers:
    """Concrete lever settings for `train_cfg` (the `train` config section: dict or dataclass) on `device`."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    speed = _get(train_cfg, "speed") or {}
    method = _get(train_cfg, "method", "lora")
    ckpt_asked = bool(_get(train_cfg, "gradient_checkpointing", False))

    def pick(key: str, auto: Any) -> Any:
        value = _get(speed, key, "auto")
        return auto if value in ("auto", None) else value

    # The varlen (FlashAttention) kernel is CUDA-only and takes bf16/fp16 only; elsewhere sdpa with the
    # restarting position_ids is the per-document path.
    varlen_ok = cuda and _get(train_cfg, "precision", "auto") != "fp32"
    attention = pick("attention", "varlen" if varlen_ok else ("sdpa" if cuda else "docs"))
    if attention == "varlen" and not varlen_ok:
        attention = "sdpa"
    fused_ce = pick("fused_ce", ("liger" if liger_available() else "torch") if cuda else "off")
    if fused_ce == "liger" and not (cuda and liger_available()):
        fused_ce = "torch"
    # Compiled decoder layers: measured for LoRA and QLoRA; full fine-tuning and 8-bit keep eager layers.
    compile_on = pick("compile", "on" if cuda and method in ("lora", "qlora") else "off") == "on"
    adapter_dtype = pick("adapter_dtype", "bf16" if cuda else "fp32")
    fused_lora = pick("fused_lora", "on" if cuda and method in ("lora", "qlora") else "off") == "on"
    ckpt = pick("checkpointing", ("offload" if cuda else "full") if ckpt_asked else "none")
    if ckpt == "offload" and not cuda:
        ckpt = "full"
    return Levers(
        attention=attention,
        fused_ce=fused_ce,
        compile=compile_on,
        fused_lora=fused_lora,
        checkpointing=ckpt,
        adapter_dtype=adapter_dtype,
        tokens_per_micro_batch=_get(speed, "tokens_per_micro_batch"),
        # Compiled layers keep 80% of their activations (the partitioner recomputes the cheapest elementwise
        # ones in backward): Llama-3.2-1B 12.3 -> 9.4 GiB without checkpointing, 3.50 -> 3.47 GiB with the
        # offloaded one, at about the same speed (docs/performance.md).
        activation_budget=_get(speed, "activation_budget") or (0.8 if compile_on else None),
        # QLoRA is the memory-first method: its frozen input embeddings (untied) stay in host memory.
        cpu_embeddings=pick("cpu_embeddings", "on" if cuda and method == "qlora" else "off") == "on",
    )


def micro_batches(
    micro_batch_size: int, grad_accum: int, row_len: int, tokens: int | None
) -> tuple[int, int]:
    """(micro_batch_size, grad_accum) with about `tokens` tokens per micro-batch and the same rows per
    optimizer step (rounded up to whole micro-batches). Packed rows all hold `row_len` tokens."""
    if not tokens:
        return micro_batch_size, grad_accum
    rows = micro_batch_size * grad_accum
    mbs = max(1, min(rows, tokens // row_len))
    return mbs, math.ceil(rows / mbs)


# ---------------------------------------------------------------------------------------------------- attention


def attn_implementation(levers: Levers) -> str:
    return {"varlen": attn.VARLEN, "flex": attn.FLEX, "docs": attn.DOCS}.get(levers.attention, "sdpa")


def decoder_stack(model: nn.Module) -> nn.Module:
    """The `*Model` holding `.layers` under a CausalLM / PEFT wrapper."""
    m = model
    for _ in range(6):
        if hasattr(m, "layers") and isinstance(m.layers, nn.ModuleList):
            return m
        m = m.get_base_model() if hasattr(m, "get_base_model") else getattr(m, "model", None)
        if m is None:
            break
    raise ValueError("no decoder stack with `.layers` found in the model")


def install_packed_attention(model: nn.Module, levers: Levers) -> None:
    """Register the attention functions, switch the model to one and add the per-forward boundary hook."""
    if levers.attention not in ("varlen", "flex"):
        return
    attn.register()
    name = attn_implementation(levers)
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError):  # older transformers: the config field is what the layers read
        model.config._attn_implementation = name
    stack = decoder_stack(model)
    if not getattr(stack, "_ftpipe_boundaries", False):
        stack.register_forward_pre_hook(attn.PackedBoundaries(name), with_kwargs=True)
        stack._ftpipe_boundaries = True


# ---------------------------------------------------------------------------------------------------- fused LoRA


# Fused LoRA linears as operators of their own (namespace `ftpipe`): torch.compile keeps them opaque (one extern
# call each), so the in-place beta=1 accumulation below survives; traced as plain aten ops, functionalization
# turns `addmm_` into an out-of-place addmm, which ATen runs as a copy of C plus the GEMM (one more full pass
# over the output). They are registered with `torch.library.Library` directly rather than through
# `torch.library.custom_op`, whose kernel wrapper (output-aliasing check, dynamo-disable wrapper) costs tens of
# microseconds of Python per call: 7 projections x layers x (forward, recompute, backward) calls per step, on a
# host that is already the bottleneck of the compiled step. Numbers: docs/performance.md.

_LIB = torch.library.Library("ftpipe", "FRAGMENT")


def _op(schema: str, impl: Callable, fake: Callable) -> Any:
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"ftpipe::{name}", fake, lib=_LIB)
    return getattr(torch.ops.ftpipe, name).default


def _lora_out(
    x2: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.mm(x2, a.t())
    out = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
    return out.addmm_(h, b.t(), alpha=scale), h  # s (x A^T) B^T added in the GEMM epilogue, in place


def _lora_grads(
    d: torch.Tensor,
    x2: torch.Tensor,
    w: torch.Tensor | None,
    h: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.mm(d, b)  # dy B (unscaled; s goes into the GEMMs / the small rank-r products)
    dx = torch.mm(d, w).addmm_(g, a, alpha=scale) if w is not None else d.new_empty(0)
    return dx, torch.mm(g.t(), x2).mul_(scale), torch.mm(d.t(), h).mul_(scale)


def _lora_fwd_impl(x, w, bias, a, b, scale):
    out, h = _lora_out(x.reshape(-1, x.shape[-1]), w, bias, a, b, scale)
    return out.view(*x.shape[:-1], w.shape[0]), h


def _lora_fwd_fake(x, w, bias, a, b, scale):
    return x.new_empty(*x.shape[:-1], w.shape[0]), x.new_empty(x.numel() // x.shape[-1], a.shape[0])


def _lora_bwd_impl(dy, x, w, h, a, b, scale, need_dx):
    """(dx, dA, dB): dx = dy W + s (dy B) A (empty when not needed), dA = s (dy B)^T x, dB = s dy^T (x A^T)."""
    d = dy.reshape(-1, dy.shape[-1])
    dx, da, db = _lora_grads(d, x.reshape(-1, x.shape[-1]), w if need_dx else None, h, a, b, scale)
    return (dx.view(x.shape) if need_dx else dx), da, db


def _lora_bwd_fake(dy, x, w, h, a, b, scale, need_dx):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0)), a.new_empty(a.shape), b.new_empty(b.shape)


lora_linear_fwd = _op(
    "lora_linear(Tensor x, Tensor w, Tensor? bias, Tensor a, Tensor b, float scale) -> (Tensor, Tensor)",
    _lora_fwd_impl,
    _lora_fwd_fake,
)
lora_linear_bwd = _op(
    "lora_linear_bwd(Tensor dy, Tensor x, Tensor w, Tensor h, Tensor a, Tensor b, float scale, bool need_dx)"
    " -> (Tensor, Tensor, Tensor)",
    _lora_bwd_impl,
    _lora_bwd_fake,
)


def _lora_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, w, _bias, a, b, scale = inputs
    ctx.save_for_backward(x, w, output[1], a, b)
    ctx.scale = scale


def _lora_backward(ctx: Any, dy: torch.Tensor, _dh: Any) -> tuple:
    x, w, h, a, b = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, da, db = lora_linear_bwd(dy, x, w, h, a, b, ctx.scale, need_dx)
    return (dx if need_dx else None), None, None, da, db, None


torch.library.register_autograd("ftpipe::lora_linear", _lora_backward, setup_context=_lora_setup, lib=_LIB)


def lora_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """y = x W^T + b + s (x A^T) B^T as one autograd node. Saves x (shared with the sibling projections that
    read the same input) and the rank-r x A^T; backward is three GEMMs plus one accumulating in place.
    Replaces PEFT's chain of linear, linear, scale, add (and its backward's extra full-size passes)."""
    return lora_linear_fwd(x, w, bias, a, b, scale)[0]


def nf4_absmax(
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize2: int,
) -> torch.Tensor:
    """The fp32 block scales of a 4-bit weight; with double quantization they are themselves 8-bit."""
    if absmax2 is None:
        return absmax
    scales = torch.ops.bitsandbytes.dequantize_blockwise.default(
        absmax, absmax2, code2, blocksize2, torch.float32
    )
    return scales + offset


def _dequant(data, absmax, blocksize, quant_type, shape, dtype):
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        data, absmax, blocksize, quant_type, list(shape), dtype
    )


def _nf4_fwd_impl(x, data, absmax, bias, a, b, scale, blocksize, quant_type, shape, dtype):
    """`lora_linear` over a bitsandbytes nf4 weight (fp32 block scales), dequantized here and again in backward,
    never kept."""
    return _lora_fwd_impl(x, _dequant(data, absmax, blocksize, quant_type, shape, dtype), bias, a, b, scale)


def _nf4_fwd_fake(x, data, absmax, bias, a, b, scale, blocksize, quant_type, shape, dtype):
    return x.new_empty(*x.shape[:-1], shape[0]), x.new_empty(x.numel() // x.shape[-1], a.shape[0])


def _nf4_keep_impl(x, data, absmax, bias, a, b, scale, blocksize, quant_type, shape, dtype):
    """`lora_linear_nf4` that also returns the dequantized weight, which its backward reuses instead of
    dequantizing again. Used only where the forward is a checkpoint's recompute, whose backward follows at once:
    one layer's weights are held at a time (Qwen2.5-7B: 0.45 GiB), and one of the three dequantizations per
    weight and step is saved."""
    w = _dequant(data, absmax, blocksize, quant_type, shape, dtype)
    out, h = _lora_fwd_impl(x, w, bias, a, b, scale)
    return out, h, w


def _nf4_keep_fake(x, data, absmax, bias, a, b, scale, blocksize, quant_type, shape, dtype):
    out, h = _nf4_fwd_fake(x, data, absmax, bias, a, b, scale, blocksize, quant_type, shape, dtype)
    return out, h, x.new_empty(shape, dtype=dtype)


def _nf4_bwd_impl(dy, x, data, absmax, h, a, b, scale, blocksize, quant_type, shape, dtype, need_dx):
    w = _dequant(data, absmax, blocksize, quant_type, shape, dtype) if need_dx else None
    d = dy.reshape(-1, dy.shape[-1])
    dx, da, db = _lora_grads(d, x.reshape(-1, x.shape[-1]), w, h, a, b, scale)
    return (dx.view(x.shape) if need_dx else dx), da, db


def _nf4_bwd_fake(dy, x, data, absmax, h, a, b, scale, blocksize, quant_type, shape, dtype, need_dx):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0)), a.new_empty(a.shape), b.new_empty(b.shape)


_NF4_ARGS = (
    "Tensor x, Tensor data, Tensor absmax, Tensor? bias, Tensor a, Tensor b, float scale, int blocksize, "
)
_NF4_ARGS += "str quant_type, int[] shape, ScalarType dtype"
lora_nf4_fwd = _op(f"lora_linear_nf4({_NF4_ARGS}) -> (Tensor, Tensor)", _nf4_fwd_impl, _nf4_fwd_fake)
lora_nf4_keep_fwd = _op(
    f"lora_linear_nf4_keep({_NF4_ARGS}) -> (Tensor, Tensor, Tensor)", _nf4_keep_impl, _nf4_keep_fake
)
lora_nf4_bwd = _op(
    "lora_linear_nf4_bwd(Tensor dy, Tensor x, Tensor data, Tensor absmax, Tensor h, Tensor a, Tensor b, "
    "float scale, int blocksize, str quant_type, int[] shape, ScalarType dtype, bool need_dx)"
    " -> (Tensor, Tensor, Tensor)",
    _nf4_bwd_impl,
    _nf4_bwd_fake,
)


def _nf4_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, data, absmax, _bias, a, b, scale, *meta = inputs
    ctx.save_for_backward(x, data, absmax, output[1], a, b)
    ctx.scale, ctx.meta = scale, meta


def _nf4_backward(ctx: Any, dy: torch.Tensor, _dh: Any) -> tuple:
    x, data, absmax, h, a, b = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, da, db = lora_nf4_bwd(dy, x, data, absmax, h, a, b, ctx.scale, *ctx.meta, need_dx)
    return (dx if need_dx else None), None, None, None, da, db, None, None, None, None, None


def _nf4_keep_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, _data, _absmax, _bias, a, b, scale = inputs[:7]
    ctx.save_for_backward(x, output[2], output[1], a, b)
    ctx.scale = scale


def _nf4_keep_backward(ctx: Any, dy: torch.Tensor, _dh: Any, _dw: Any) -> tuple:
    x, w, h, a, b = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, da, db = lora_linear_bwd(dy, x, w, h, a, b, ctx.scale, need_dx)
    return (dx if need_dx else None), None, None, None, da, db, None, None, None, None, None


torch.library.register_autograd("ftpipe::lora_linear_nf4", _nf4_backward, setup_context=_nf4_setup, lib=_LIB)
torch.library.register_autograd(
    "ftpipe::lora_linear_nf4_keep", _nf4_keep_backward, setup_context=_nf4_keep_setup, lib=_LIB
)


def lora_linear_nf4(
    x: torch.Tensor,
    quant: list,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    meta: tuple,
    keep: bool = False,
) -> torch.Tensor:
    """`lora_linear` over a bitsandbytes 4-bit weight: `quant` = (data, absmax, absmax2, code2, offset), the
    last three None without double quantization; `meta` = (blocksize, blocksize2, quant_type, shape, dtype)."""
    data, absmax, absmax2, code2, offset = quant
    blocksize, blocksize2, quant_type, shape, dtype = meta
    absmax = nf4_absmax(absmax, absmax2, code2, offset, blocksize2)
    return _nf4_call(x, data, absmax, bias, a, b, scale, (blocksize, quant_type, list(shape), dtype), keep)


def _nf4_call(x, data, absmax, bias, a, b, scale, meta, keep):
    op = lora_nf4_keep_fwd if keep else lora_nf4_fwd
    return op(x, data, absmax, bias, a, b, scale, *meta)[0]


_NF4_BUFFERS = ("_ftpipe_w4", "_ftpipe_absmax")


def _attach_nf4(module: nn.Module, base: nn.Module) -> None:
    """Register a bitsandbytes Linear4bit weight's plain tensors as (non-persistent) buffers of the LoRA layer
    and its constants as a tuple: what torch.compile traces as graph inputs, with no guards on Python objects
    (a QuantState, the Params4bit subclass) that would recompile the layer for every projection. Doubly
    quantized block scales are dequantized once here (fp32, 1/16 byte per weight: +0.3 GiB for Qwen2.5-7B)
    instead of at every dequantization of the weight (two more kernels and their host work, 3x per step)."""
    w = base.weight
    qs = w.quant_state
    nested = qs.state2 is not None
    with torch.no_grad():
        absmax = nf4_absmax(
            qs.absmax,
            qs.state2.absmax if nested else None,
            qs.state2.code if nested else None,
            torch.as_tensor(qs.offset, dtype=torch.float32, device=qs.absmax.device) if nested else None,
            qs.state2.blocksize if nested else 0,
        )
    for name, t in zip(_NF4_BUFFERS, (w.data.as_subclass(torch.Tensor), absmax.float()), strict=True):
        module.register_buffer(name, t, persistent=False)
    dtype = qs.dtype if qs.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    module._ftpipe_nf4 = (qs.blocksize, qs.quant_type, list(qs.shape), dtype)


def _lora_can_fuse(layer: nn.Module) -> bool:
    try:
        (name,) = layer.active_adapters
    except (ValueError, AttributeError):
        return False
    base = layer.get_base_layer()
    if layer.disable_adapters or layer.merged or getattr(layer, "use_dora", {}).get(name):
        return False
    if getattr(layer, "lora_bias", {}).get(name):
        return False
    drop = layer.lora_dropout[name]
    if not (isinstance(drop, nn.Identity) or getattr(drop, "p", 1.0) == 0.0):
        return False
    a_dtype = layer.lora_A[name].weight.dtype
    if type(base) is nn.Linear:
        return base.weight.dtype == a_dtype  # fp32 adapters on a bf16 base keep PEFT's (autocast) path
    return type(base).__name__ == "Linear4bit" and a_dtype == torch.bfloat16


def _fused_lora_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs or not _lora_can_fuse(self):
        return type(self).forward(self, x, *args, **kwargs)
    (name,) = self.active_adapters
    base = self.get_base_layer()
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    scale = float(self.scaling[name])
    if self._ftpipe_nf4 is not None:
        # Under checkpointing a forward with grad on is the recompute, its backward right after it.
        keep = self._ftpipe_keep_dequant and torch.is_grad_enabled()
        data, absmax = (getattr(self, n) for n in _NF4_BUFFERS)
        return _nf4_call(x, data, absmax, base.bias, a, b, scale, self._ftpipe_nf4, keep)
    return lora_linear(x, base.weight, base.bias, a, b, scale)


def fuse_lora(model: nn.Module, keep_dequant: bool = False) -> int:
    """Route every PEFT LoRA linear (bf16 or 4-bit base) through one autograd node; returns how many.
    `keep_dequant` (only where every forward with grad is a checkpoint's recompute): a 4-bit weight dequantized
    in that forward is kept for its backward."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "get_base_layer") and _lora_can_fuse(module):
            base = module.get_base_layer()
            module._ftpipe_nf4 = None
            module._ftpipe_keep_dequant = keep_dequant
            if type(base).__name__ == "Linear4bit":
                _attach_nf4(module, base)
            module.forward = types.MethodType(_fused_lora_forward, module)
            n += 1
    return n


def downcast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen fp32 floating-point parameters (norms, embeddings that prepare_model_for_kbit_training upcast)
    back to `dtype`; quantized weights and trained parameters are left alone."""
    for p in model.parameters():
        if not p.requires_grad and p.dtype == torch.float32 and type(p).__name__ != "Params4bit":
            p.data = p.data.to(dtype)


# ------------------------------------------------------------------------------------------- checkpoint / offload


class ActivationOffloader:
    """Keeps each checkpointed layer's input in pinned host memory instead of on the GPU.

    Copies run on a side stream so they overlap the layers' compute; in backward the input of the layer before
    is fetched while this one recomputes. One pinned buffer per layer slot, reused every step."""

    def __init__(self) -> None:
        self.stream = torch.cuda.Stream()
        self.host: list[torch.Tensor] = []
        self.events: list[torch.cuda.Event] = []
        self.prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.count = 0

    def reset(self) -> None:
        self.count = 0
        self.prefetched.clear()

    def save(self, t: torch.Tensor) -> int:
        slot = self.count
        self.count += 1
        if slot == len(self.host):
            self.host.append(torch.empty(t.shape, dtype=t.dtype, pin_memory=True))
            self.events.append(torch.cuda.Event())
        elif self.host[slot].shape != t.shape or self.host[slot].dtype != t.dtype:
            self.host[slot] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.host[slot].copy_(t, non_blocking=True)
            self.events[slot].record()
        t.record_stream(self.stream)  # the GPU copy's memory is not reused before the transfer ends
        return slot

    def _fetch(self, slot: int, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.events[slot])
            gpu = self.host[slot].to(device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        return gpu, ev

    def load(self, slot: int, device: torch.device) -> torch.Tensor:
        gpu, ev = self.prefetched.pop(slot, None) or self._fetch(slot, device)
        if slot > 0 and slot - 1 not in self.prefetched:
            self.prefetched[slot - 1] = self._fetch(slot - 1, device)
        torch.cuda.current_stream().wait_event(ev)
        gpu.record_stream(torch.cuda.current_stream())
        return gpu


class OffloadedCheckpoint(torch.autograd.Function):
    """Checkpoint a layer: forward without saving activations, its input parked on the host; backward brings
    the input back, recomputes the layer with grad and back-propagates through it (reentrant style)."""

    @staticmethod
    def forward(ctx: Any, run: Callable, offloader: ActivationOffloader | None, hidden: torch.Tensor, *rest):
        ctx.run, ctx.offloader = run, offloader
        kind = hidden.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        if offloader is not None:
            ctx.slot = offloader.save(hidden)
        else:
            ctx.save_for_backward(hidden)
        ctx.device = hidden.device
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if ctx.offloader is not None:
            hidden = ctx.offloader.load(ctx.slot, ctx.device)
        else:
            (hidden,) = ctx.saved_tensors
        hidden = hidden.detach().requires_grad_(ctx.needs_input_grad[2])
        kind, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
            out = ctx.run(hidden)
        torch.autograd.backward(out, grad)
        return (None, None, hidden.grad if ctx.needs_input_grad[2] else None, None)


def wrap_layers(model: nn.Module, levers: Levers) -> None:
    """Compile each decoder layer and/or checkpoint it (full, offloaded or selective), in place."""
    stack = decoder_stack(model)
    # "full" is transformers' own (non-reentrant) checkpointing, switched on in patch_model.
    mode = levers.checkpointing if levers.checkpointing in ("offload", "selective") else "none"
    offloader = ActivationOffloader() if mode == "offload" else None
    if offloader is not None:
        stack.register_forward_pre_hook(lambda *_: offloader.reset())
    if levers.compile:
        import torch._dynamo as dynamo
        import torch._functorch.config as functorch_config

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        # Read when the layers compile (at the first step): below 1.0 the partitioner recomputes the cheapest
        # activations (elementwise ops first) in backward instead of keeping them.
        functorch_config.activation_memory_budget = levers.activation_budget or 1.0
    # A tensor that needs grad, so the checkpoint node is part of the graph even where the layer's input
    # (the frozen embeddings' output) does not need grad.
    anchor = torch.zeros((), requires_grad=True)
    for layer in stack.layers:
        inner = type(layer).forward.__get__(layer)
        if mode == "selective":
            inner = _selective(inner)
        run = torch.compile(inner) if levers.compile else inner
        if mode in ("none", "selective"):
            layer.forward = run
            continue
        layer.forward = functools.partial(_checkpointed_forward, run, offloader, anchor)


def _checkpointed_forward(
    run: Callable, offloader: ActivationOffloader | None, anchor: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    hidden, args = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
    if not torch.is_grad_enabled():
        return run(hidden, *args, **kwargs)
    shape: list[bool] = []  # whether the layer returns a tuple (older transformers) or a tensor

    def body(h: torch.Tensor) -> torch.Tensor:
        out = run(h, *args, **kwargs)
        shape[:] = [isinstance(out, tuple)]
        return out[0] if isinstance(out, tuple) else out

    out = OffloadedCheckpoint.apply(body, offloader, hidden, anchor)
    return (out,) if shape and shape[0] else out


def _selective(inner: Callable) -> Callable:
    """Selective activation checkpointing: keep matmul and attention outputs, recompute the cheap elementwise
    ops (norms, rotary, SwiGLU, residual adds) in backward. Traced inside torch.compile when compiling."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    save = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    save |= {
        op
        for name in (
            "_flash_attention_forward",
            "_efficient_attention_forward",
            "_scaled_dot_product_flash_attention",
        )
        if (op := getattr(getattr(torch.ops.aten, name, None), "default", None)) is not None
    }

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    def run(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(
            inner,
            hidden,
            *args,
            use_reentrant=False,
            context_fn=functools.partial(create_selective_checkpoint_contexts, policy),
            **kwargs,
        )

    return run


# ---------------------------------------------------------------------------------------------------- the hooks


class HostEmbedding(nn.Module):
    """A frozen input embedding kept in (pinned) host memory: the rows of a micro-batch are gathered on the CPU
    and copied over, instead of holding the whole table on the GPU (1 GiB for Qwen2.5-7B's 152k x 3584)."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.weight_host = emb.weight.detach().to("cpu")  # a plain attribute: model.to(device) leaves it
        self.padding_idx = emb.padding_idx
        self.embedding_dim = emb.embedding_dim
        self.num_embeddings = emb.num_embeddings
        self.device = emb.weight.device
        self.pending: torch.Tensor | None = None  # host copy of the next call's ids (see stash_host_ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        host, self.pending = self.pending, None
        # ids from the collator's host copy; else read back from the GPU (a sync)
        flat = (
            host.reshape(-1)
            if host is not None and host.numel() == ids.numel()
            else ids.reshape(-1).to("cpu")
        )
        pin = torch.cuda.is_available()  # pinned: the copy below runs asynchronously
        buf = torch.empty((flat.numel(), self.embedding_dim), dtype=self.weight_host.dtype, pin_memory=pin)
        torch.index_select(self.weight_host, 0, flat, out=buf)
        return buf.to(self.device, non_blocking=True).view(*ids.shape, self.embedding_dim)


def host_embeddings(model: nn.Module) -> bool:
    """Move a frozen, untied input embedding to host memory (`HostEmbedding`); False where it is tied to the
    output head (Llama-3.2-1B: the same matrix is the LM head's) or trains."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if type(emb) is not nn.Embedding or emb.weight.requires_grad or emb.weight.device.type != "cuda":
        return False
    if head is not None and getattr(head, "weight", None) is emb.weight:
        return False
    host = HostEmbedding(emb)
    base.set_input_embeddings(host)

    def stash_host_ids(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        held = kwargs.pop("host_input_ids", None)
        if held is not None:
            host.pending = getattr(held, "tensor", held)
        return args, kwargs

    decoder_stack(model).register_forward_pre_hook(stash_host_ids, with_kwargs=True)
    return True


def cast_adapters(model: nn.Module, dtype: torch.dtype) -> None:
    """LoRA A/B in `dtype` (PEFT's default upcasts them to fp32 next to a bf16 base)."""
    for name, p in model.named_parameters():
        if "lora_" in name and p.dtype != dtype:
            p.data = p.data.to(dtype)
