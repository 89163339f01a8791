#!/usr/bin/env python3
"""Why the GPU sat idle in a profiled run (`train.profile`, best with `train.profile.host_ops=false`): each idle
gap on the compute stream, per step and per phase (forward up to the fused loss, then backward and optimizer),
is either *host-bound* (the kernel after it was launched only after the gap began: the GPU waited for the host
to get there) or *waiting* (it was launched in time and waited on something else: an event on another stream,
a copy).

    python scripts/trace_gaps.py CACHE/.../profile/trace.json.gz [--step-kernel gather_kernel] [--loss-kernel liger]

A step starts at the first kernel whose name holds --step-kernel (the embedding's gather) and its forward ends
at the first kernel holding --loss-kernel. Prints one line per step and a JSON total on the last line.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memset", "gpu_memcpy")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return json.load(fh)["traceEvents"]


def step_gaps(events: list[dict], step_kernel: str, loss_kernel: str) -> list[dict]:
    """Per step: its span and the idle ms on the compute stream by phase and cause."""
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    if not gpu:
        return []
    # the compute stream is the one that runs the most kernels; copies on a side stream overlap it
    stream = Counter(e["tid"] for e in gpu if e["cat"] == "kernel").most_common(1)[0][0]
    gpu = sorted((e for e in gpu if e["tid"] == stream), key=lambda e: e["ts"])
    launched = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})
    }
    starts = [i for i, e in enumerate(gpu) if step_kernel in e["name"]] + [len(gpu)]
    steps = []
    for a, b in zip(starts, starts[1:], strict=False):
        seg = gpu[a:b]
        loss = next((i for i, e in enumerate(seg) if loss_kernel in e["name"]), len(seg))
        idle = {
            f"{phase}_{cause}": 0.0
            for phase in ("forward", "backward")
            for cause in ("host_bound", "waiting")
        }
        for i in range(1, len(seg)):
            end = seg[i - 1]["ts"] + seg[i - 1]["dur"]
            gap = seg[i]["ts"] - end
            if gap <= 0:
                continue
            phase = "forward" if i <= loss else "backward"
            cause = "host_bound" if launched.get(seg[i]["args"].get("correlation"), end) > end else "waiting"
            idle[f"{phase}_{cause}"] += gap / 1e3
        span = (seg[-1]["ts"] + seg[-1]["dur"] - seg[0]["ts"]) / 1e3
        busy = sum(e["dur"] for e in seg) / 1e3
        steps.append(
            {
                "span_ms": round(span, 2),
                "kernels_ms": round(busy, 2),
                **{k: round(v, 2) for k, v in idle.items()},
            }
        )
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path)
    p.add_argument("--step-kernel", default="gather_kernel")
    p.add_argument("--loss-kernel", default="liger")
    ns = p.parse_args()
    steps = step_gaps(load(ns.trace), ns.step_kernel, ns.loss_kernel)
    if not steps:
        raise SystemExit(f"{ns.trace}: no kernel holding {ns.step_kernel!r} starts a step")
    for i, s in enumerate(steps):
        print(f"step {i}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
    total = {k: round(sum(s[k] for s in steps) / len(steps), 2) for k in steps[0]}
    print(json.dumps({"steps": len(steps), "mean": total}))


if __name__ == "__main__":
    main()
