"""Fused LoRA linear for a bf16 (or any plain) base weight: y = x W^T + b + s (x A^T) B^T as one autograd node.

No `from __future__ import annotations` here: torch.library reads the operators' annotations.
"""

from collections.abc import Callable
from typing import Any

import torch

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
