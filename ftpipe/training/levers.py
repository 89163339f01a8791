"""Speed levers for the train stage, each a small function switched by `train.speed.*`.

`resolve()` turns the config (where `auto` is the default) into concrete choices for a device; the hooks in
`speed.py` apply them at three points: loading the model, after loading (before PEFT), after PEFT. On the CPU
every `auto` resolves to the plain path. docs/performance.md has the measurements behind the CUDA defaults.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import attention as attn


@dataclass(frozen=True)
class Levers:
    attention: str  # sdpa | varlen | flex
    padding_free: bool
    fused_ce: str  # off | liger | torch
    compile: bool
    fused_lora: bool
    checkpointing: str  # none | full | offload | selective
    adapter_dtype: str  # bf16 | fp32
    tokens_per_micro_batch: int | None


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

    attention = pick("attention", "varlen" if cuda else "sdpa")
    if attention in ("varlen",) and not cuda:
        attention = "sdpa"  # the varlen kernel is CUDA-only; sdpa with position_ids is the per-document path
    padding_free = pick("padding_free", "on" if cuda else "off") == "on"
    fused_ce = pick("fused_ce", ("liger" if liger_available() else "torch") if cuda else "off")
    if fused_ce == "liger" and not (cuda and liger_available()):
        fused_ce = "torch"
    compile_on = pick("compile", "on" if cuda else "off") == "on"
    adapter_dtype = pick("adapter_dtype", "bf16" if cuda else "fp32")
    fused_lora = pick("fused_lora", "on" if cuda and method != "full" else "off") == "on"
    ckpt = pick("checkpointing", ("offload" if cuda else "full") if ckpt_asked else "none")
    if ckpt == "offload" and not cuda:
        ckpt = "full"
    return Levers(
        attention=attention,
        padding_free=padding_free,
        fused_ce=fused_ce,
        compile=compile_on,
        fused_lora=fused_lora,
        checkpointing=ckpt,
        adapter_dtype=adapter_dtype,
        tokens_per_micro_batch=_get(speed, "tokens_per_micro_batch"),
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
    return {"varlen": attn.VARLEN, "flex": attn.FLEX}.get(levers.attention, "sdpa")


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


def _dequantize(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(torch.bfloat16)


class LoraLinearFn(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T as one autograd node.

    Saves x (shared with the sibling projections that read the same input) and the rank-r product x A^T;
    backward is three matmuls plus one fused add (dx = dy W + s (dy B) A). A 4-bit W is dequantized in forward
    and again in backward (never kept). Replaces PEFT's chain of linear, linear, scale, add, whose backward
    adds three more full-size elementwise passes per projection."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        quantized: bool,
    ) -> torch.Tensor:
        w = _dequantize(weight) if quantized else weight
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ a.t()
        out = F.linear(x2, w, bias)
        out.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x2, h, a, b, weight)
        ctx.scale, ctx.quantized, ctx.x_shape = scale, quantized, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        x2, h, a, b, weight = ctx.saved_tensors
        d = dy.reshape(-1, dy.shape[-1])
        dh = (d @ b).mul_(ctx.scale)
        dx = None
        if ctx.needs_input_grad[0]:
            w = _dequantize(weight) if ctx.quantized else weight
            dx = (d @ w).addmm_(dh, a).view(ctx.x_shape)
        da = dh.t() @ x2 if ctx.needs_input_grad[3] else None
        db = (d.t() @ h).mul_(ctx.scale) if ctx.needs_input_grad[4] else None
        return dx, None, None, da, db, None, None


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
    quantized = type(base).__name__ == "Linear4bit"
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    return LoraLinearFn.apply(x, base.weight, base.bias, a, b, float(self.scaling[name]), quantized)


def fuse_lora(model: nn.Module) -> int:
    """Route every PEFT LoRA linear (bf16 or 4-bit base) through `LoraLinearFn`; returns how many."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "get_base_layer") and _lora_can_fuse(module):
            fwd = _fused_lora_forward
            if type(module.get_base_layer()).__name__ == "Linear4bit":
                # bitsandbytes' ops are opaque to torch.compile: let a compiled layer break around them.
                fwd = torch.compiler.disable(_fused_lora_forward)
            module.forward = types.MethodType(fwd, module)
            n += 1
    return n


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
    mode = levers.checkpointing
    offloader = ActivationOffloader() if mode == "offload" else None
    if offloader is not None:
        stack.register_forward_pre_hook(lambda *_: offloader.reset())
    if levers.compile:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    # A tensor that needs grad, so the checkpoint node is part of the graph even where the layer's input
    # (the frozen embeddings' output) does not need grad.
    anchor = torch.zeros((), requires_grad=True)
    for layer in stack.layers:
        inner = type(layer).forward.__get__(layer)
        if mode == "selective":
            inner = _selective(inner)
        run = torch.compile(inner, dynamic=False) if levers.compile else inner
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


def cast_adapters(model: nn.Module, dtype: torch.dtype) -> None:
    """LoRA A/B in `dtype` (PEFT's default upcasts them to fp32 next to a bf16 base)."""
    for name, p in model.named_parameters():
        if "lora_" in name and p.dtype != dtype:
            p.data = p.data.to(dtype)
