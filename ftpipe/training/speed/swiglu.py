"""The SwiGLU MLP over its grouped gate/up projection (`train.speed.fused_swiglu`, with `fused_lora`): the MLP
takes its group's one output (gate and up side by side, `lora.group_output`) and runs silu(gate) * up as one
autograd node whose backward is one operator, on CUDA a Triton kernel that reads gate, up and the product's
gradient once and writes both gradients into the group's gradient. Compiled without it, inductor fuses that
backward from a slice_scatter of each half into one kernel over the whole [T, 2I] gradient at about half the
GPU's memory bandwidth (4.7 ms a step for Llama-3.2-1B at 8k tokens; this kernel 2.5 ms, docs/performance.md).
The forward stays plain torch ops, so the compiled layer's partitioner can still recompute the product in
backward instead of keeping it.
"""

from __future__ import annotations

import importlib.util
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .lora import group_head, group_output
from .lora_ops import _op

_BLOCK = 1024
# torch's, and transformers' own (ACT2FN["silu"] since transformers 5.2x)
_SILU = ("SiLU", "SiLUActivation")


class GroupedSwiGLU(torch.autograd.Function):
    """silu(gate) * up for gate_up = [gate | up] along the last dimension; saves gate_up only."""

    @staticmethod
    def forward(ctx: Any, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward(gate_up, grad)


def _swiglu_bwd_impl(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d(silu(gate) * up) / d[gate | up] for the product's gradient `grad`, computed in fp32."""
    if gate_up.is_cuda and _kernel is not None:
        return _triton_backward(gate_up, grad)
    gate, up = gate_up.float().chunk(2, dim=-1)
    g = grad.float()
    sig = torch.sigmoid(gate)
    d_gate = g * up * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, g * gate * sig], dim=-1).to(gate_up.dtype)


def _swiglu_bwd_fake(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return gate_up.new_empty(gate_up.shape)


# An operator of its own, as the LoRA linears are (lora_ops.py): compiled, the backward graph holds one opaque
# call, the same on every device. A Triton kernel traced into the graph instead changed what the partitioner
# kept: on the GPU it recomputed the gate/up GEMM in backward rather than keep its output (+16 ms a step for
# Llama-3.2-1B, 3.3 GiB less), which the CPU's graph, without the kernel, never showed.
swiglu_backward = _op("swiglu_bwd(Tensor gate_up, Tensor grad) -> Tensor", _swiglu_bwd_impl, _swiglu_bwd_fake)


def _triton_backward(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    width = grad.shape[-1]
    gate_up2, grad2 = gate_up.reshape(-1, 2 * width), grad.reshape(-1, width)
    rows = gate_up2.shape[0]
    out = torch.empty((rows, 2 * width), dtype=gate_up.dtype, device=gate_up.device)
    grid = (rows, (width + _BLOCK - 1) // _BLOCK)
    _kernel[grid](gate_up2, grad2, out, width, gate_up2.stride(0), grad2.stride(0), BLOCK=_BLOCK, num_warps=4)
    return out.view(*gate_up.shape)


def _make_kernel() -> Any:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def swiglu_backward_kernel(gate_up, grad, out, width, gate_up_stride, grad_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        src = gate_up + row * gate_up_stride
        gate = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(src + width + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad + row * grad_stride + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
        d_up = g * gate * sig
        dst = out + row * 2 * width
        tl.store(dst + cols, d_gate.to(out.dtype.element_ty), mask=mask)
        tl.store(dst + width + cols, d_up.to(out.dtype.element_ty), mask=mask)

    return swiglu_backward_kernel


_kernel = _make_kernel()


def fuse_swiglu(model: nn.Module) -> int:
    """Route every SwiGLU MLP (gate_proj, up_proj, down_proj, a SiLU act_fn) whose gate/up projections are one
    fused group through `GroupedSwiGLU`; returns how many. An MLP already split into chunks (mlp_chunks) runs
    each chunk through it."""
    n = 0
    for module in model.modules():
        gate = getattr(module, "gate_proj", None)
        if (
            gate is None
            or not hasattr(module, "down_proj")
            or type(getattr(module, "act_fn", None)).__name__ not in _SILU
            or group_head(gate) is None
            or list(gate._ftpipe_members) != [gate, getattr(module, "up_proj", None)]
        ):
            continue
        module._ftpipe_mlp_forward = types.MethodType(_swiglu_mlp_forward, module)
        if "forward" not in module.__dict__:  # not wrapped by mlp_chunks, which calls the above itself
            module.forward = module._ftpipe_mlp_forward
        n += 1
    return n


def _swiglu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate_up = group_output(self.gate_proj, x)
    if gate_up is None:  # adapters off or merged: PEFT's own path for each projection
        return type(self).forward(self, x)
    return self.down_proj(GroupedSwiGLU.apply(gate_up))
