"""One rank of a launched train stage: `python -m ftpipe.training.worker LAUNCH_JSON` (started by torchrun)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from ..cache import Cache
from ..engine import StageContext
from .fit import fit
from .launch import METRICS


def main(spec_path: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    ctx = StageContext(
        cfg=spec["cfg"],
        out=Path(spec["out"]),
        inputs={name: Path(path) for name, path in spec["inputs"].items()},
        cache=Cache(spec["cache"]),
    )
    metrics = fit(ctx)
    if metrics is not None:
        partial = ctx.out / (METRICS + ".part")
        partial.write_text(json.dumps(metrics))
        os.replace(partial, ctx.out / METRICS)


if __name__ == "__main__":
    main(sys.argv[1])
