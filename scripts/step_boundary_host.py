#!/usr/bin/env python3
"""The host's cost of the step boundary's clipping and fused AdamW over 1B LoRA's 224 adapter tensors against
one flat tensor of the same size (issue 18; docs/performance.md, thirteenth session). The tensors are small, so
what is timed is the Python and dispatch around the kernels, which a GPU step pays on the host whatever the
tensors' size.

    python scripts/step_boundary_host.py [--tensors 224] [--iterations 300]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator


def per_call_ms(fn: Callable[[], object], iterations: int) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tensors", type=int, default=224)  # 16 layers x 7 projections x (A, B)
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    shape = (64, 8)
    layouts = {
        f"{args.tensors} tensors": [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(args.tensors)],
        "one flat tensor": [torch.zeros(args.tensors * shape[0] * shape[1], dtype=torch.bfloat16)],
    }
    for name, tensors in layouts.items():
        params = [torch.nn.Parameter(t) for t in tensors]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        clip = per_call_ms(lambda params=params: accelerator.clip_grad_norm_(params, 1.0), args.iterations)
        step = per_call_ms(optimizer.step, args.iterations)
        print(f"{name}: clip_grad_norm_ {clip:.2f} ms, fused AdamW step {step:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
