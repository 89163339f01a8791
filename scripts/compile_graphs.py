#!/usr/bin/env python3
"""How many graphs the compiled decoder layers build, and why each one after the first was built: dynamo's
guard failures, as the train stage runs them (ftpipe's load_for_training and collator, a few training steps).
A layer that recompiles costs compile time at every cold start, tracing time at every warm start (dynamo
re-traces each graph even when inductor's cache has it) and a cache lookup over more entries at every call.

    python scripts/compile_graphs.py [--shape llama-3.2-1b] [--method lora] [--steps 3] [--dynamo KEY=VALUE ...]

`--dynamo` sets torch._dynamo.config keys first (to try what changes the count). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--method", default="lora")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dynamo", action="append", default=[], help="torch._dynamo.config KEY=VALUE")
    ns = p.parse_args()

    import torch
    import torch._dynamo as dynamo
    from bench import ftpipe_cfg, make_rows
    from scaleout import model_folder
    from torch._dynamo.utils import counters, guard_failures

    from ftpipe.training import speed
    from ftpipe.training.collator import PackedCollator
    from ftpipe.training.model import load_for_training
    from ftpipe.training.speed.loss import training_loss

    for item in ns.dynamo:
        key, value = item.split("=", 1)
        setattr(dynamo.config, key, json.loads(value))
    path = model_folder(ns.shape, Path(tempfile.gettempdir()))
    case = {"shape": ns.shape, "method": ns.method, "batch": ns.rows, "ckpt": False}
    train = ftpipe_cfg(case, {})["train"]
    levers = speed.resolve(train, "cuda")
    model = load_for_training(Path(path), train, levers).cuda()
    collate = PackedCollator(**speed.collator_kwargs(levers))
    rows = make_rows(ns.rows * ns.steps, model.config.vocab_size, seed=0)
    seconds = []
    for step in range(ns.steps):
        batch = collate(
            [
                {k: r[k].numpy() for k in ("input_ids", "labels", "position_ids")}
                for r in rows[step * ns.rows : (step + 1) * ns.rows]
            ]
        )
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        began = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = training_loss(model, batch, None, speed.loss_mode(levers))[0]
        loss.backward()
        torch.cuda.synchronize()
        seconds.append(round(time.perf_counter() - began, 2))
    failures = {
        f"{code.co_name} {code.co_filename.split('site-packages/')[-1]}:{code.co_firstlineno}": [
            str(reason)[:600] for reason in reasons[:6]
        ]
        for code, reasons in guard_failures.items()
    }
    print(
        json.dumps(
            {
                "dynamo_config": ns.dynamo,
                "layers": model.config.num_hidden_layers,
                "unique_graphs": counters["stats"].get("unique_graphs", 0),
                "step_seconds": seconds,
                "guard_failures": failures,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
