"""Fused LoRA linear for a bf16 (or any plain) base weight: y = x W^T + b + s (x A^T) B^T as one autograd node,
for one projection or a group of projections that read the same input (q/k/v, gate/up: one GEMM for their base
weights, one for their A's).

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


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * m1 @ m2 as one GEMM (alpha): no separate pass over the product to scale it. With beta=0 the
    (uninitialised, 0-dim) input is never read."""
    return torch.addmm(m1.new_empty(()), m1, m2, beta=0, alpha=scale)


def _lora_out(
    x2: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    a: list[torch.Tensor],
    b: list[torch.Tensor],
    scale: list[float],
    unread: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The projections of one group (one or more sharing the input x, e.g. q/k/v: `w`, `bias` their base
    weights concatenated along the outputs): out [T, sum N_i] = x W^T + b, and in each projection's columns
    s_i (x A_i^T) B_i^T added in the GEMM epilogue, in place; h [T, sum r_i] = x [A_1; A_2; ...]^T. `unread`:
    nothing will read `out` (only h and the inputs are saved for backward), so it is left unfilled."""
    h = torch.mm(x2, (a[0] if len(a) == 1 else torch.cat(a)).t())
    if unread:
        return x2.new_empty((x2.shape[0], w.shape[0])), h
    out = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
    if len(b) == 1:
        return out.addmm_(h, b[0].t(), alpha=scale[0]), h
    n = r = 0
    for b_i, s_i in zip(b, scale, strict=True):
        n_i, r_i = b_i.shape
        out[:, n : n + n_i].addmm_(h[:, r : r + r_i], b_i.t(), alpha=s_i)
        n, r = n + n_i, r + r_i
    return out, h


def _lora_grads(
    d: torch.Tensor,
    x2: torch.Tensor,
    w: torch.Tensor | None,
    h: torch.Tensor,
    a: list[torch.Tensor],
    b: list[torch.Tensor],
    scale: list[float],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(dx, [dA_i], [dB_i]) for dy = d [T, sum N_i]: dx = d W + sum_i s_i (d_i B_i) A_i, dA_i = s_i (d_i B_i)^T x,
    dB_i = s_i d_i^T h_i (d_i, h_i: projection i's columns). dx is empty where `w` is None (not needed)."""
    dx = torch.mm(d, w) if w is not None else d.new_empty(0)
    da, db = [], []
    n = r = 0
    for a_i, b_i, s_i in zip(a, b, scale, strict=True):
        n_i, r_i = b_i.shape
        d_i = d if len(b) == 1 else d[:, n : n + n_i]
        h_i = h if len(b) == 1 else h[:, r : r + r_i]
        g = torch.mm(d_i, b_i)  # d_i B_i (unscaled; s_i goes into the GEMMs)
        if w is not None:
            dx.addmm_(g, a_i, alpha=s_i)
        da.append(_scaled_mm(g.t(), x2, s_i))
        db.append(_scaled_mm(d_i.t(), h_i, s_i))
        n, r = n + n_i, r + r_i
    return dx, da, db


def _lora_fwd_impl(x, w, bias, a, b, scale, unread=False):
    out, h = _lora_out(x.reshape(-1, x.shape[-1]), w, bias, a, b, scale, unread)
    return out.view(*x.shape[:-1], w.shape[0]), h


def _lora_unread_impl(x, w, bias, a, b, scale):
    """`lora_linear` for a forward whose output nobody reads: an offloaded checkpoint's recompute of a layer's
    last projection (its output only makes the layer's output, which that backward never reads). Saves what the
    backward needs, as `lora_linear` does, without the base GEMM (speed/policy.py: `skip_unread_output`)."""
    return _lora_fwd_impl(x, w, bias, a, b, scale, unread=True)


def fake_outputs(
    x: torch.Tensor, out_features: int, a: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward operators' output shapes (out [..., N], h [T, sum r_i]) for their fake kernels."""
    rank = sum(t.shape[0] for t in a)
    return x.new_empty(*x.shape[:-1], out_features), x.new_empty(x.numel() // x.shape[-1], rank)


def fake_grads(x: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor], need_dx: bool) -> tuple:
    """The backward operators' output shapes (dx, [dA_i], [dB_i]) for their fake kernels."""
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, [t.new_empty(t.shape) for t in a], [t.new_empty(t.shape) for t in b]


def save_with_adapters(ctx: Any, tensors: tuple, a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """save_for_backward of `tensors` and the group's A's and B's (`saved_with_adapters` splits them again)."""
    ctx.save_for_backward(*tensors, *a, *b)
    ctx.members = len(a)


def saved_with_adapters(ctx: Any) -> tuple[tuple, list[torch.Tensor], list[torch.Tensor]]:
    saved, k = ctx.saved_tensors, ctx.members
    n = len(saved) - 2 * k
    return saved[:n], list(saved[n : n + k]), list(saved[n + k :])


def _lora_fwd_fake(x, w, bias, a, b, scale):
    return fake_outputs(x, w.shape[0], a)


def _lora_bwd_impl(dy, x, w, h, a, b, scale, need_dx):
    """(dx, [dA_i], [dB_i]): `_lora_grads` (dx empty when not needed)."""
    d = dy.reshape(-1, dy.shape[-1])
    dx, da, db = _lora_grads(d, x.reshape(-1, x.shape[-1]), w if need_dx else None, h, a, b, scale)
    return (dx.view(x.shape) if need_dx else dx), da, db


def _lora_bwd_fake(dy, x, w, h, a, b, scale, need_dx):
    return fake_grads(x, a, b, need_dx)


lora_linear_fwd = _op(
    "lora_linear(Tensor x, Tensor w, Tensor? bias, Tensor[] a, Tensor[] b, float[] scale) -> (Tensor, Tensor)",
    _lora_fwd_impl,
    _lora_fwd_fake,
)
lora_linear_unread_fwd = _op(
    "lora_linear_unread(Tensor x, Tensor w, Tensor? bias, Tensor[] a, Tensor[] b, float[] scale) -> (Tensor, Tensor)",
    _lora_unread_impl,
    _lora_fwd_fake,
)
lora_linear_bwd = _op(
    "lora_linear_bwd(Tensor dy, Tensor x, Tensor w, Tensor h, Tensor[] a, Tensor[] b, float[] scale, "
    "bool need_dx) -> (Tensor, Tensor[], Tensor[])",
    _lora_bwd_impl,
    _lora_bwd_fake,
)


def _lora_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, w, _bias, a, b, scale = inputs
    save_with_adapters(ctx, (x, w, output[1]), a, b)
    ctx.scale = scale


def _lora_backward(ctx: Any, dy: torch.Tensor, _dh: Any) -> tuple:
    (x, w, h), a, b = saved_with_adapters(ctx)
    need_dx = ctx.needs_input_grad[0]
    dx, da, db = lora_linear_bwd(dy, x, w, h, a, b, ctx.scale, need_dx)
    return (dx if need_dx else None), None, None, da, db, None


for _name in ("lora_linear", "lora_linear_unread"):
    torch.library.register_autograd(f"ftpipe::{_name}", _lora_backward, setup_context=_lora_setup, lib=_LIB)


def lora_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    a: list[torch.Tensor],
    b: list[torch.Tensor],
    scale: list[float],
    unread: bool = False,
) -> torch.Tensor:
    """y = x W^T + b + s_i (x A_i^T) B_i^T in projection i's columns, as one autograd node, for one projection or
    a group that reads the same x (W, b: the group's base weights concatenated, see `lora.group_siblings`).
    Saves x (shared with the sibling projections that read the same input) and the rank-r x A^T. Replaces
    PEFT's chain of linear, linear, scale, add per projection (and its backward's extra full-size passes).
    `unread`: no one reads y's values (`_lora_unread_impl`); it is returned unfilled, with its backward."""
    return (lora_linear_unread_fwd if unread else lora_linear_fwd)(x, w, bias, a, b, scale)[0]
