#!/usr/bin/env python3
"""Read a gzipped chrome trace written by `scripts/bench.py --profile --trace-dir DIR` (torch.profiler, the two
steps after the timed window) and print what docs/performance.md quotes from it:

- GPU kernel time by kind (GEMMs, Triton, copies, ...) and per CUDA stream;
- host time on each CPU thread by top-level op (the main thread and the autograd engine's thread);
- in time buckets: how busy the GPU was and how far ahead of it the host was launching (median of kernel
  start minus its launch call): a lead near 0 means the host was the bottleneck there.

    python3 docs/bench/traces.py docs/bench/call13/trace_llama1b_lora_ftpipe_default.json.gz [bucket_ms]

The profiler's own CPU overhead inflates host times (profiled steps run slower than timed ones): compare
phases with each other, not with the timed step.
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ftpipe.training.profiling import kernel_kind  # noqa: E402  (the one classification of GPU kernels)


def main(path: str, bucket_ms: float = 10.0) -> None:
    events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"]
    )
    launch = {
        e["args"].get("correlation"): e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "args" in e
    }
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    streams: dict[object, float] = defaultdict(float)
    for k in gpu:
        kind = kernel_kind(k["name"])
        kinds[kind][0] += k["dur"] / 1e3
        kinds[kind][1] += 1
        streams[k.get("args", {}).get("stream")] += k["dur"] / 1e3
    print(f"GPU kernels: {sum(v[0] for v in kinds.values()):.1f} ms in {len(gpu)} launches")
    for kind, (ms, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        print(f"  {ms:8.1f} ms {n:6d}x  {kind}")
    print("  per stream:", {s: round(v, 1) for s, v in streams.items()})

    cpu = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation")]
    by_tid: dict[object, list] = defaultdict(list)
    for e in cpu:
        by_tid[e["tid"]].append(e)
    for tid, evs in by_tid.items():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        top, end = [], -1.0
        for e in evs:
            if e["ts"] >= end:
                top.append(e)
                end = e["ts"] + e["dur"]
        agg: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for e in top:
            agg[e["name"][:70]][0] += e["dur"] / 1e3
            agg[e["name"][:70]][1] += 1
        print(f"host thread {tid}: {sum(v[0] for v in agg.values()):.1f} ms in top-level ops")
        for name, (ms, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:6]:
            print(f"  {ms:8.1f} ms {n:6d}x  {name}")

    print("bucket (+ms)  GPU busy  host lead (median ms)")
    t0, t_end, width = gpu[0]["ts"], gpu[-1]["ts"], bucket_ms * 1e3
    start = t0
    while start < t_end:
        ks = [k for k in gpu if start <= k["ts"] < start + width]
        busy = sum(min(k["ts"] + k["dur"], start + width) - k["ts"] for k in ks)
        leads = [
            k["ts"] - launch[c]["ts"] for k in ks if (c := k.get("args", {}).get("correlation")) in launch
        ]
        lead = statistics.median(leads) / 1e3 if leads else float("nan")
        print(f"  {(start - t0) / 1e3:8.0f}   {100 * busy / width:5.0f}%   {lead:7.2f}")
        start += width


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 10.0)
