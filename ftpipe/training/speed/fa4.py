"""FlashAttention-4's kernels (the optional `flash-attn-4` package: CuTe DSL, Hopper and newer) for packed rows.

With `train.speed.attention_kernel=fa4` (the CUDA default where the package imports) the varlen attention of
`attention.py` runs through them instead of the FlashAttention-2 kernel inside PyTorch. They are JIT-compiled
at their first call; `fit.build_env` keeps the compiled kernels under the ftpipe cache, so a second run loads
them instead (the warm start, issue 18).

The forward and the backward are opaque operators (`ftpipe::fa4_varlen_fwd` / `_bwd`) so that compiled decoder
layers call them as they call torch's own varlen operator, without tracing into the DSL's Python.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MISSING: str | None = None  # "" once flash_attn.cute imported here


def missing() -> str | None:
    """Why flash-attn-4 cannot be imported here (not installed, or its DSL's libraries do not load), or None."""
    global _MISSING
    if _MISSING is None:
        try:
            import flash_attn.cute  # noqa: F401
        except Exception as exc:  # ImportError, or a native library that does not load
            _MISSING = f"{type(exc).__name__}: {exc}"
        else:
            _MISSING = ""
    return _MISSING or None


def usable(device: torch.device | str) -> bool:
    """flash-attn-4 imports and `device` is a GPU it has kernels for (compute capability 9.0 or newer)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda" and torch.cuda.is_available()
    return cuda and torch.cuda.get_device_capability(dev)[0] >= 9 and missing() is None


@torch.library.custom_op("ftpipe::fa4_varlen_fwd", mutates_args=())
def varlen_forward(
    q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Causal attention within each document of cu_seqlens `cu`: q [T, H, D], k/v [T, Hkv, D] -> (out [T, H, D],
    log-sum-exp [H, T] fp32). Grouped K/V heads are read as they are (no repeat)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(
        q,
        k,
        v,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=max_len,
        max_seqlen_k=max_len,
        softmax_scale=scale,
        causal=True,
        return_lse=True,
    )
    return out, lse


@varlen_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, *_: object) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("ftpipe::fa4_varlen_bwd", mutates_args=())
def varlen_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu: Tensor,
    max_len: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(
        q,
        k,
        v,
        out,
        grad.contiguous(),
        lse,
        softmax_scale=scale,
        causal=True,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=max_len,
        max_seqlen_k=max_len,
    )[:3]
    return dq, dk, dv


@varlen_backward.register_fake
def _(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, *_: object) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library's signature)
    q, k, v, cu, max_len, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu)
    ctx.max_len, ctx.scale = max_len, scale


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None) -> tuple:  # noqa: ANN001
    q, k, v, out, lse, cu = ctx.saved_tensors
    dq, dk, dv = varlen_backward(grad_out, q, k, v, out, lse, cu, ctx.max_len, ctx.scale)
    return dq, dk, dv, None, None, None


varlen_forward.register_autograd(_backward, setup_context=_setup_context)


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float | None
) -> Tensor:
    """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]: causal within each document."""
    return varlen_forward(q, k, v, cu, max_len, scale if scale is not None else q.shape[-1] ** -0.5)[0]
