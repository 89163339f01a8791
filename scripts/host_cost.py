#!/usr/bin/env python3
"""The host's cost of a piece of a GPU training step, measured without a GPU (issue 18; docs/performance.md,
thirteenth session). The tensors are small, so what is timed is the Python and dispatch around the kernels,
which a GPU step pays on the host whatever the tensors' size.

    python scripts/host_cost.py step-boundary [--tensors 224]
        clipping and fused AdamW over 1B LoRA's 224 adapter tensors, against one flat tensor of the same size
    FLASH_ATTENTION_NUM_SMS=132 python -O scripts/host_cost.py fa4 [--tokens 256]
        one flash-attn-4 varlen forward and backward: its interface's Python (argument checks, tile and
        scheduler choices, the compile-cache key) with every kernel counted as compiled and every launch a
        no-op, on CPU tensors of Llama-3.2-1B's heads. `-O` drops the asserts that the tensors are on a GPU;
        FLASH_ATTENTION_NUM_SMS stands for the GPU it would query (an H200's 132). Needs flash-attn-4 with its
        DSL (`pip install 'ftpipe[fa4]'`), cuda-bindings and triton importable.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def step_boundary(tensors: int, calls: int) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    shape = (64, 8)
    layouts = {
        f"{tensors} tensors": [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(tensors)],
        "one flat tensor": [torch.zeros(tensors * shape[0] * shape[1], dtype=torch.bfloat16)],
    }
    for name, parts in layouts.items():
        params = [torch.nn.Parameter(t) for t in parts]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        clip = per_call_us(lambda params=params: accelerator.clip_grad_norm_(params, 1.0), calls) / 1e3
        step = per_call_us(optimizer.step, calls) / 1e3
        print(f"{name}: clip_grad_norm_ {clip:.2f} ms, fused AdamW step {step:.2f} ms")


class _AlwaysCompiled(dict):
    """A compile cache that has every kernel, each a launch that does nothing."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: object) -> Callable[..., None]:
        return lambda *args, **kwargs: None

    def get(self, key: object, default: Any = None) -> Callable[..., None]:
        return self[key]


def flash_attn_4(tokens: int, calls: int) -> None:
    import flash_attn.cute.interface as fa4

    fa4._get_device_arch = lambda: 90  # Hopper, as on an H200
    for name in dir(fa4):
        if hasattr(getattr(fa4, name), "compile_cache"):
            getattr(fa4, name).compile_cache = _AlwaysCompiled()
    heads, kv_heads, dim = 32, 8, 64  # Llama-3.2-1B's
    q = torch.randn(tokens, heads, dim, dtype=torch.bfloat16)
    k, v = (torch.randn(tokens, kv_heads, dim, dtype=torch.bfloat16) for _ in range(2))
    cu = torch.arange(0, tokens + 1, tokens // 4, dtype=torch.int32)  # four documents
    lengths = {
        "max_seqlen_q": tokens // 4,
        "max_seqlen_k": tokens // 4,
        "cu_seqlens_q": cu,
        "cu_seqlens_k": cu,
    }
    out, lse, *_ = fa4._flash_attn_fwd(q, k, v, softmax_scale=0.125, causal=True, return_lse=True, **lengths)

    def forward() -> object:
        return fa4._flash_attn_fwd(q, k, v, softmax_scale=0.125, causal=True, return_lse=True, **lengths)

    def backward() -> object:
        return fa4._flash_attn_bwd(q, k, v, out, out, lse, softmax_scale=0.125, causal=True, **lengths)

    print(f"forward {per_call_us(forward, calls):.0f} µs a call")
    print(f"backward {per_call_us(backward, calls):.0f} µs a call")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["step-boundary", "fa4"])
    parser.add_argument("--tensors", type=int, default=224)  # 16 layers x 7 projections x (A, B)
    parser.add_argument("--tokens", type=int, default=256)  # small: the tensors' own CPU work stays out of it
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    if args.what == "step-boundary":
        step_boundary(args.tensors, args.calls)
    else:
        flash_attn_4(args.tokens, args.calls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
