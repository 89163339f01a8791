#!/usr/bin/env python3
"""The host's cost of one flash-attn-4 varlen call, without a GPU (issue 18; docs/performance.md, thirteenth
session): its interface's Python (argument checks, tile and scheduler choices, the compile-cache key) with every
kernel counted as compiled and every launch a no-op, on CPU tensors of a packed 1B LoRA row's head layout. What
is timed is what a GPU step pays on the host per call before the launch itself.

    FLASH_ATTENTION_NUM_SMS=132 python -O scripts/fa4_host_cost.py [--tokens 256] [--calls 200]

`-O` drops the interface's asserts that the tensors are on a GPU; FLASH_ATTENTION_NUM_SMS stands for the GPU
it would query (an H200's 132). Needs flash-attn-4 with its DSL (`pip install 'ftpipe[fa4]'`), cuda-bindings and
triton importable.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch


class _AlwaysCompiled(dict):
    """A compile cache that has every kernel, each a launch that does nothing."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: object) -> Callable[..., None]:
        return lambda *args, **kwargs: None

    def get(self, key: object, default: Any = None) -> Callable[..., None]:
        return self[key]


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=256)  # small: the tensors' own CPU work stays out of it
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    import flash_attn.cute.interface as fa4

    fa4._get_device_arch = lambda: 90  # Hopper, as on an H200
    for name in dir(fa4):
        if hasattr(getattr(fa4, name), "compile_cache"):
            getattr(fa4, name).compile_cache = _AlwaysCompiled()
    t, heads, kv_heads, dim = args.tokens, 32, 8, 64  # Llama-3.2-1B's heads
    q = torch.randn(t, heads, dim, dtype=torch.bfloat16)
    k, v = (torch.randn(t, kv_heads, dim, dtype=torch.bfloat16) for _ in range(2))
    cu = torch.arange(0, t + 1, t // 4, dtype=torch.int32)  # four documents
    lengths = {"max_seqlen_q": t // 4, "max_seqlen_k": t // 4, "cu_seqlens_q": cu, "cu_seqlens_k": cu}
    out, lse, *_ = fa4._flash_attn_fwd(q, k, v, softmax_scale=0.125, causal=True, return_lse=True, **lengths)

    def forward() -> object:
        return fa4._flash_attn_fwd(q, k, v, softmax_scale=0.125, causal=True, return_lse=True, **lengths)

    def backward() -> object:
        return fa4._flash_attn_bwd(q, k, v, out, out, lse, softmax_scale=0.125, causal=True, **lengths)

    print(f"forward {per_call_us(forward, args.calls):.0f} µs a call")
    print(f"backward {per_call_us(backward, args.calls):.0f} µs a call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
