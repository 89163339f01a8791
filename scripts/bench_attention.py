#!/usr/bin/env python3
"""Causal attention over one long document on the GPU: the kernels torch offers, forward and forward+backward,
in TFLOP/s (causal FLOPs: 2 * L^2 * heads * head_dim forward, 2.5x that for the backward).

    python scripts/bench_attention.py [--lengths 32768,131072] [--shapes 32x8x64,32x8x128] [--json OUT]
    python scripts/bench_attention.py --packed 4x2048 [--shapes 32x8x64,28x4x128] [--json OUT]

Shapes are query heads x KV heads x head dim (Llama-3.2-1B: 32x8x64; Llama-3.1-8B: 32x8x128; Qwen2.5-7B:
28x4x128). `--packed ROWSxLEN`: packed rows of documents of 700-7,000 tokens (bench_command.py's corpus) cut at
row ends, as varlen FlashAttention-2 (what ftpipe runs) against cuDNN's ragged (THD) attention over the same
boundaries, with cuDNN's output and gradients checked against FA2's. Where `flash_attn.cute` (flash-attn-4's
CuTe DSL kernels) imports, its kernels run too (`fa4_*`), with the time of their first call (the JIT compile).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn: Callable[[], torch.Tensor], backward: bool, repeats: int = 3) -> float:
    for _ in range(2 if backward else 1):  # warm-up (cuDNN builds its plan on first use)
        out = fn()
        if backward:
            out.sum().backward()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    return (time.perf_counter() - began) / repeats


def _fa4() -> object | None:
    try:
        import flash_attn.cute as fa4
    except Exception as exc:  # not installed, or its CUDA libraries do not load here
        print(json.dumps({"fa4": f"unavailable: {type(exc).__name__}: {exc}"[:300]}), flush=True)
        return None
    return fa4


def _first(result: torch.Tensor | tuple) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def first_call_seconds(fn: Callable[[], torch.Tensor], *inputs: torch.Tensor) -> float:
    """The first forward + backward: for a JIT-compiled kernel, its compile (or its load from a cache). The
    inputs' gradients are cleared after it."""
    began = time.perf_counter()
    out = fn()
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    for t in inputs:
        t.grad = None
    return round(seconds, 2)


def kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """q [L, H, D], k/v [L, Hkv, D] -> each kernel's call."""
    length, heads, _ = q.shape
    rep = heads // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    cu = torch.tensor([0, length], dtype=torch.int32, device=q.device)
    out: dict[str, Callable[[], torch.Tensor]] = {}
    from torch.nn.attention.varlen import varlen_attn

    out["varlen_fa2"] = lambda: varlen_attn(q, kr, vr, cu, cu, length, length, window_size=(-1, 0))
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, kr, vr))
    kg, vg = (t.transpose(0, 1)[None] for t in (k, v))
    for name, backend in (
        ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):

        def call(backend=backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)

        out[name] = call

    def cudnn_gqa() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q4, kg, vg, is_causal=True, enable_gqa=True)

    out["sdpa_cudnn_gqa"] = cudnn_gqa
    # what the train stage runs for a row that is one document (attention._one_long_document, [1, H, T, D] in)
    from ftpipe.training.speed.attention import _one_long_document

    out["ftpipe_long_cudnn"] = lambda: _one_long_document(q4, kg, vg, None, "fa2")
    fa4 = _fa4()
    if fa4 is not None:
        out["fa4_dense_gqa"] = lambda: _first(fa4.flash_attn_func(q[None], k[None], v[None], causal=True))
        out["ftpipe_long_fa4"] = lambda: _one_long_document(q4, kg, vg, None, "fa4")
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def check(length: int = 32768) -> dict:
    """ftpipe's one-long-document path (cuDNN) against varlen FlashAttention-2: output and input gradients."""
    from ftpipe.training.speed.attention import _one_long_document

    torch.manual_seed(1)
    q = torch.randn(1, 32, length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(1, length, 32, 64, device="cuda", dtype=torch.bfloat16)
    outs, grads = [], []
    for path in ("cudnn", "fa2"):
        if path == "cudnn":
            out = _one_long_document(q, k, v, 64**-0.5, "fa2")
        else:
            from torch.nn.attention.varlen import varlen_attn

            cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
            flat = [t[0].transpose(0, 1) for t in (q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))]
            out = varlen_attn(*flat, cu, cu, length, length, scale=64**-0.5, window_size=(-1, 0))[None]
        out.backward(grad_out)
        outs.append(out.float())
        grads.append([t.grad.float().clone() for t in (q, k, v)])
        q.grad = k.grad = v.grad = None
    return {
        "check": f"cudnn vs varlen FA2, {length} tokens, 32x8x64",
        "out_rel": relative_error(outs[0], outs[1]),
        "grad_rel": [relative_error(a, b) for a, b in zip(grads[0], grads[1], strict=True)],
    }


def packed_boundaries(rows: int, row_len: int, seed: int = 0) -> list[int]:
    """cu_seqlens of `rows` packed rows: documents of 700-7,000 tokens laid end to end, cut at each row's end."""
    import random

    rng = random.Random(seed)
    cu, left = [0], 0
    for row in range(rows):
        pos, end = row * row_len, (row + 1) * row_len
        while pos < end:
            if left == 0:
                left = rng.randint(700, 7000)
            take = min(left, end - pos)
            pos, left = pos + take, left - take
            cu.append(pos)
    return cu


def packed(rows: int, row_len: int, shape: str, skip_cudnn: bool = False) -> list[dict]:
    """varlen FA2 (K/V repeated, as ftpipe on torch 2.11) against cuDNN ragged attention (GQA native and repeated)
    on the same packed boundaries: forward + backward time, and cuDNN's error against FA2."""
    from torch.nn.attention.varlen import varlen_attn

    heads, kv, dim = (int(x) for x in shape.split("x"))
    cu_list = packed_boundaries(rows, row_len)
    total = cu_list[-1]
    cu = torch.tensor(cu_list, dtype=torch.int32, device="cuda")
    docs = [b - a for a, b in zip(cu_list, cu_list[1:], strict=False)]
    max_len = max(docs)
    torch.manual_seed(0)
    q = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, kv, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, kv, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    scale = dim**-0.5
    rep = heads // kv

    def fa2() -> torch.Tensor:
        kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return varlen_attn(q, kr, vr, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0))

    def cudnn(repeat: bool) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            kk, vv = (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)) if repeat else (k, v)
            r = torch.ops.aten._cudnn_attention_forward(
                q, kk, vv, None, cu, cu, max_len, max_len, True, 0.0, True, False, scale=scale
            )
            return r[0]

        return call

    flops = sum(2 * n * n * heads * dim for n in docs)  # causal forward, per document
    results, ref = [], None
    grad_out = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16)
    candidates: list[tuple[str, Callable[[], torch.Tensor]]] = [("varlen_fa2", fa2)]
    fa4 = _fa4()
    if fa4 is not None:
        from ftpipe.training.speed.fa4 import varlen_attention  # what ftpipe runs: its operator

        def fa4_varlen() -> torch.Tensor:
            return varlen_attention(q, k, v, cu, max_len, scale)

        candidates.append(("fa4_varlen_gqa", fa4_varlen))
    if not skip_cudnn:
        candidates += [("cudnn_ragged_gqa", cudnn(False)), ("cudnn_ragged_repeat", cudnn(True))]
    for name, fn in candidates:
        row: dict = {"shape": shape, "rows": rows, "row_len": row_len, "documents": len(docs), "kernel": name}
        try:
            if name.startswith("fa4"):
                row["first_call_s"] = first_call_seconds(fn, q, k, v)
            fwd = timed(lambda fn=fn: fn().detach(), backward=False, repeats=20)
            both = timed(fn, backward=True, repeats=20)
            row.update(
                fwd_ms=round(fwd * 1e3, 3),
                fwd_bwd_ms=round(both * 1e3, 3),
                fwd_tflops=round(flops / fwd / 1e12, 1),
                fwd_bwd_tflops=round(3.5 * flops / both / 1e12, 1),
            )
            q.grad = k.grad = v.grad = None
            out = fn()
            out.backward(grad_out)
            got = [out.detach().float(), *(t.grad.float().clone() for t in (q, k, v))]
            if ref is None:
                ref = got
            else:
                row["rel_err_vs_fa2"] = [
                    round(relative_error(a, b), 5) for a, b in zip(got, ref, strict=True)
                ]
        except Exception as exc:  # a kernel this build or shape does not support
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        q.grad = k.grad = v.grad = None
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--shapes", default="32x8x64,32x8x128")
    p.add_argument("--packed", default=None, help="ROWSxLEN: packed rows instead of one long document")
    p.add_argument(
        "--only",
        help="kernel name prefixes to run (one long document), e.g. varlen_fa2,sdpa_cudnn,fa4,ftpipe_long",
    )
    p.add_argument(
        "--no-cudnn-ragged", action="store_true", help="packed rows: skip cuDNN's ragged path (c16)"
    )
    p.add_argument("--json")
    ns = p.parse_args()
    results = []
    if ns.packed:
        rows, row_len = (int(x) for x in ns.packed.split("x"))
        for shape in ns.shapes.split(","):
            results += packed(rows, row_len, shape, skip_cudnn=ns.no_cudnn_ragged)
        if ns.json:
            Path(ns.json).write_text(json.dumps(results, indent=1))
        return 0
    for shape in ns.shapes.split(","):
        heads, kv, dim = (int(x) for x in shape.split("x"))
        for length in (int(x) for x in ns.lengths.split(",")):
            torch.manual_seed(0)
            q = torch.randn(length, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(length, kv, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(length, kv, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            flops = 2 * length * length * heads * dim  # causal forward
            for name, fn in kernels(q, k, v).items():
                row = {"shape": shape, "length": length, "kernel": name}
                if ns.only and not any(name.startswith(o) for o in ns.only.split(",")):
                    continue
                try:
                    if "fa4" in name:
                        row["first_call_s"] = first_call_seconds(fn, q, k, v)
                    fwd = timed(lambda fn=fn: fn().detach(), backward=False)
                    both = timed(fn, backward=True)
                    row.update(
                        fwd_ms=round(fwd * 1e3, 2),
                        fwd_bwd_ms=round(both * 1e3, 2),
                        fwd_tflops=round(flops / fwd / 1e12, 1),
                        fwd_bwd_tflops=round(3.5 * flops / both / 1e12, 1),
                    )
                except Exception as exc:  # a kernel this build or shape does not support
                    row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                q.grad = k.grad = v.grad = None
                print(json.dumps(row), flush=True)
                results.append(row)
            del q, k, v
            torch.cuda.empty_cache()
    results.append(check())
    print(json.dumps(results[-1]), flush=True)
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
