#!/usr/bin/env python3
"""Sum up py-spy's collapsed stacks of an `ftpipe` run (scripts/device/host_profile.sh) for its steady training
steps: where the host spends its time while the GPU waits on it.

    python scripts/host_profile.py pyspy_lora.raw.gz [--top 40] [--match ftpipe/training]

Only the ftpipe process's samples inside the Trainer's loop count, and of those none that compile (dynamo's
frame conversion, inductor, AOTAutograd's first trace): the first step's compilation is another question
(scripts/device/warm_start.sh). Per thread (the main one runs the forward and the optimizer, autograd's device
thread the CUDA backward): samples, then the frames with the most samples under them (inclusive) and the innermost
frames (self).
"""

from __future__ import annotations

import argparse
import gzip
import re
from collections import Counter, defaultdict
from pathlib import Path

COMPILING = (
    "convert_frame.py",
    "compile_fx.py",
    "/_inductor/codecache.py",
    "aot_autograd.py:",
    "_lazy_graph_module",
)
LOOP = "_inner_training_loop"
MAIN_THREAD = "_run_module_as_main"


def frame_name(frame: str) -> str:
    """`fn (path/to/file.py:12)` -> `fn (file.py:12)` with the package path kept short."""
    m = re.match(r"(.*) \((.*):(\d+)\)$", frame)
    if not m:
        return frame
    fn, path, line = m.groups()
    short = re.sub(r".*/site-packages/", "", path)
    short = re.sub(r".*/(ftpipe|scripts)/", r"\1/", short)
    return f"{fn} ({short}:{line})"


def read(path: Path) -> list[tuple[list[str], int]]:
    opener = gzip.open if path.suffix == ".gz" else open
    text = opener(path, "rt", errors="replace").read()
    stacks = []
    # a sample line: `process PID:"cmd";[process PID:"child cmd";]thread (0x..);frame;... N` (a command line may
    # span lines): the innermost process is the one sampled
    for m in re.finditer(r'^((?:process \d+:"(?:[^"\\]|\\.)*?";)+)(.*?) (\d+)$', text, flags=re.M | re.S):
        procs, rest, n = m.groups()
        cmd = re.findall(r'process \d+:"((?:[^"\\]|\\.)*?)";', procs, flags=re.S)[-1]
        if "ftpipe" not in cmd or "bench_command" in cmd:
            continue
        stacks.append((rest.split(";"), int(n)))
    return stacks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw", type=Path)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--min-samples", type=int, default=50, help="leave out threads with fewer samples")
    p.add_argument(
        "--match", default="", help="also list inclusive counts of frames whose file contains this"
    )
    ns = p.parse_args()
    threads: dict[str, Counter] = defaultdict(Counter)
    inclusive: dict[str, Counter] = defaultdict(Counter)
    own: dict[str, Counter] = defaultdict(Counter)
    compiling = other = 0
    for frames, n in read(ns.raw):
        thread = frames[0] if frames[0].startswith("thread") else "?"
        body = [f for f in frames if not f.startswith(("thread", "process"))]
        if any(c in f for f in body for c in COMPILING):
            compiling += n
            continue
        if any(LOOP in f for f in body):
            key = "main thread: the training loop"
        elif body and not body[0].startswith(MAIN_THREAD):  # autograd's device thread runs the CUDA backward
            key = f"another thread, from {frame_name(body[0])}"
        else:
            other += n
            continue
        threads[key][thread] += n
        for name in dict.fromkeys(frame_name(f) for f in body):
            inclusive[key][name] += n
        if body:
            own[key][frame_name(body[-1])] += n
    print(f"{ns.raw}: samples compiling {compiling}, outside the loop {other}")
    for key in sorted(threads, key=lambda k: -sum(threads[k].values())):
        total = sum(threads[key].values())
        if total < ns.min_samples:
            continue  # a few truncated stacks (py-spy's sampling errors)
        print(f"\n== {key}: {total} samples")
        print("-- inclusive")
        below = [(name, n) for name, n in inclusive[key].most_common() if n < total]  # not the common root
        for name, n in below[: ns.top]:
            print(f"{n:7d} {100 * n / total:5.1f}%  {name}")
        print("-- self")
        for name, n in own[key].most_common(ns.top):
            print(f"{n:7d} {100 * n / total:5.1f}%  {name}")
        if ns.match:
            print(f"-- frames of {ns.match}")
            for name, n in inclusive[key].most_common():
                if ns.match in name:
                    print(f"{n:7d} {100 * n / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
