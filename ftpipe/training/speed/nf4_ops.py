"""Fused LoRA linear over a bitsandbytes nf4 (4-bit) base weight: the QLoRA counterpart of `lora_ops`, the
weight dequantized inside the operator (forward and backward) instead of kept.

No `from __future__ import annotations` here: torch.library reads the operators' annotations.
"""

from typing import Any

import torch
from torch import nn

from .lora_ops import (
    _LIB,
    _lora_fwd_impl,
    _lora_grads,
    _op,
    fake_grads,
    fake_outputs,
    lora_linear_bwd,
    save_with_adapters,
    saved_with_adapters,
)


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
    return fake_outputs(x, shape[0], a)


def _nf4_keep_impl(x, data, absmax, bias, a, b, scale, blocksize, quant_type, shape, dtype, unread=False):
    """`lora_linear_nf4` (the op) that also returns the dequantized weight, which its backward reuses instead of
    dequantizing again. Used only where the forward is a checkpoint's recompute, whose backward follows at once:
    one layer's weights are held at a time (Qwen2.5-7B: 0.45 GiB), and one of the three dequantizations per
    weight and step is saved."""
    w = _dequant(data, absmax, blocksize, quant_type, shape, dtype)
    out, h = _lora_fwd_impl(x, w, bias, a, b, scale, unread)
    return out, h, w


def _nf4_keep_fake(x, data, absmax, bias, a, b, scale, blocksize, quant_type, shape, dtype):
    out, h = _nf4_fwd_fake(x, data, absmax, bias, a, b, scale, blocksize, quant_type, shape, dtype)
    return out, h, x.new_empty(shape, dtype=dtype)


def _nf4_keep_unread_impl(x, data, absmax, bias, a, b, scale, blocksize, quant_type, shape, dtype):
    """`lora_linear_nf4_keep` for a recompute whose output nobody reads (`lora_ops._lora_unread_impl`): the
    weight is dequantized for the backward that follows, the base GEMM is skipped."""
    return _nf4_keep_impl(
        x, data, absmax, bias, a, b, scale, blocksize, quant_type, shape, dtype, unread=True
    )


def _nf4_bwd_impl(dy, x, data, absmax, h, a, b, scale, blocksize, quant_type, shape, dtype, need_dx):
    w = _dequant(data, absmax, blocksize, quant_type, shape, dtype) if need_dx else None
    d = dy.reshape(-1, dy.shape[-1])
    dx, da, db = _lora_grads(d, x.reshape(-1, x.shape[-1]), w, h, a, b, scale)
    return (dx.view(x.shape) if need_dx else dx), da, db


def _nf4_bwd_fake(dy, x, data, absmax, h, a, b, scale, blocksize, quant_type, shape, dtype, need_dx):
    return fake_grads(x, a, b, need_dx)


_NF4_ARGS = "Tensor x, Tensor data, Tensor absmax, Tensor? bias, Tensor[] a, Tensor[] b, float[] scale, int blocksize, "
_NF4_ARGS += "str quant_type, int[] shape, ScalarType dtype"
lora_nf4_fwd = _op(f"lora_linear_nf4({_NF4_ARGS}) -> (Tensor, Tensor)", _nf4_fwd_impl, _nf4_fwd_fake)
lora_nf4_keep_fwd = _op(
    f"lora_linear_nf4_keep({_NF4_ARGS}) -> (Tensor, Tensor, Tensor)", _nf4_keep_impl, _nf4_keep_fake
)
lora_nf4_keep_unread_fwd = _op(
    f"lora_linear_nf4_keep_unread({_NF4_ARGS}) -> (Tensor, Tensor, Tensor)",
    _nf4_keep_unread_impl,
    _nf4_keep_fake,
)
lora_nf4_bwd = _op(
    "lora_linear_nf4_bwd(Tensor dy, Tensor x, Tensor data, Tensor absmax, Tensor h, Tensor[] a, Tensor[] b, "
    "float[] scale, int blocksize, str quant_type, int[] shape, ScalarType dtype, bool need_dx)"
    " -> (Tensor, Tensor[], Tensor[])",
    _nf4_bwd_impl,
    _nf4_bwd_fake,
)


def _nf4_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, data, absmax, _bias, a, b, scale, *meta = inputs
    save_with_adapters(ctx, (x, data, absmax, output[1]), a, b)
    ctx.scale, ctx.meta = scale, meta


def _nf4_backward(ctx: Any, dy: torch.Tensor, _dh: Any) -> tuple:
    (x, data, absmax, h), a, b = saved_with_adapters(ctx)
    need_dx = ctx.needs_input_grad[0]
    dx, da, db = lora_nf4_bwd(dy, x, data, absmax, h, a, b, ctx.scale, *ctx.meta, need_dx)
    return (dx if need_dx else None), None, None, None, da, db, None, None, None, None, None


def _nf4_keep_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, _data, _absmax, _bias, a, b, scale = inputs[:7]
    save_with_adapters(ctx, (x, output[2], output[1]), a, b)
    ctx.scale = scale


def _nf4_keep_backward(ctx: Any, dy: torch.Tensor, _dh: Any, _dw: Any) -> tuple:
    (x, w, h), a, b = saved_with_adapters(ctx)
    need_dx = ctx.needs_input_grad[0]
    dx, da, db = lora_linear_bwd(dy, x, w, h, a, b, ctx.scale, need_dx)
    return (dx if need_dx else None), None, None, None, da, db, None, None, None, None, None


torch.library.register_autograd("ftpipe::lora_linear_nf4", _nf4_backward, setup_context=_nf4_setup, lib=_LIB)
for _name in ("lora_linear_nf4_keep", "lora_linear_nf4_keep_unread"):
    torch.library.register_autograd(
        f"ftpipe::{_name}", _nf4_keep_backward, setup_context=_nf4_keep_setup, lib=_LIB
    )


def nf4_call(x, data, absmax, bias, a, b, scale, meta, keep, unread=False):
    """`lora_linear` over an nf4 weight's plain tensors (`attach_nf4`); `keep`: the dequantized weight is kept
    for backward (a checkpoint's recompute, whose backward follows at once); `unread` (with `keep`): the
    recompute's output is not read, so not computed (`lora_ops.lora_linear`)."""
    op = (lora_nf4_keep_unread_fwd if unread else lora_nf4_keep_fwd) if keep else lora_nf4_fwd
    return op(x, data, absmax, bias, a, b, scale, *meta)[0]


NF4_BUFFERS = ("_ftpipe_w4", "_ftpipe_absmax")


def attach_nf4(module: nn.Module, base: nn.Module) -> None:
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
    for name, t in zip(NF4_BUFFERS, (w.data.as_subclass(torch.Tensor), absmax.float()), strict=True):
        module.register_buffer(name, t, persistent=False)
    dtype = qs.dtype if qs.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    module._ftpipe_nf4 = (qs.blocksize, qs.quant_type, list(qs.shape), dtype)
