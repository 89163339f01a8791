#!/usr/bin/env python3
"""Does importing flash-attn-4 on a thread of its own shorten a warm start? (issue 18; docs/performance.md,
thirteenth session). Each run is a fresh process that imports what the train stage imports, flash_attn.cute
and a model folder's weights, in one of three orders:

    sync   the train stage's order: the imports, then flash_attn.cute, then the model
    load   flash_attn.cute on a thread started just before the model loads, joined after it
    early  flash_attn.cute on a thread started right after torch, while the other imports run

    python scripts/import_overlap.py MODEL_DIR [--runs 4]

Prints each run's seconds (imports, the synchronous flash_attn.cute import, loading, waiting for the thread,
total) and each order's mean total. A thread pays only where the other thread leaves Python's lock free.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

ORDERS = ("sync", "load", "early")

RUN = r"""
import sys, threading, time
order, model_dir = sys.argv[1], sys.argv[2]
start = time.perf_counter()
import torch
thread = None
def on_thread():
    global thread
    thread = threading.Thread(target=lambda: __import__("flash_attn.cute"))
    thread.start()
if order == "early":
    on_thread()
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, Trainer
import peft
imported = time.perf_counter()
if order == "sync":
    import flash_attn.cute
if order == "load":
    on_thread()
fa4 = time.perf_counter()
AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
loaded = time.perf_counter()
if thread is not None:
    thread.join()
end = time.perf_counter()
print(imported - start, fa4 - imported, loaded - fa4, end - loaded, end - start)
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir")
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    totals: dict[str, list[float]] = {order: [] for order in ORDERS}
    for _ in range(args.runs):
        for order in ORDERS:  # interleaved, so a drift of the machine touches each order alike
            out = subprocess.run(
                [sys.executable, "-c", RUN, order, args.model_dir], capture_output=True, text=True, check=True
            )
            seconds = [float(x) for x in out.stdout.split()[-5:]]
            totals[order].append(seconds[-1])
            print(
                f"{order:5s} imports {seconds[0]:.2f} flash_attn.cute {seconds[1]:.2f} model {seconds[2]:.2f} "
                f"thread join {seconds[3]:.2f} total {seconds[4]:.2f} s",
                flush=True,
            )
    for order, values in totals.items():
        print(f"{order:5s} mean total {statistics.mean(values):.2f} s over {len(values)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
