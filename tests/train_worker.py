"""Run download-model → map → pack → train → convert → merge through the real engine, as a process tests can kill.

`python train_worker.py CACHE CFG_JSON [--kill-after-checkpoint N]`: download-model, map and pack are stand-ins
that write the tiny model, a data.json and a synthetic packed dataset in the real stages' output shape;
the rest are the real stages. With --kill-after-checkpoint the process SIGKILLs itself right after Trainer saved
checkpoint-N, which is what a power cut or OOM kill after a save looks like. Prints run.json rows as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import train_helpers as h  # noqa: E402

from ftpipe import engine  # noqa: E402
from ftpipe.cache import Cache  # noqa: E402
from ftpipe.data.info import DATA_INFO, DataInfo  # noqa: E402
from ftpipe.stages import convert, merge, train  # noqa: E402


def _download_model(ctx: engine.StageContext) -> dict:
    shutil.copytree(h.tiny_model_dir(ctx.shared / "fixtures"), ctx.out / "model")
    return {}


def _map(ctx: engine.StageContext) -> dict:
    """The real map's data.json (system prompt, held-out rows) for the configured dataset."""
    from ftpipe.data.formats import load_conversations
    from ftpipe.data.sources import materialize_dataset

    materialize_dataset(ctx.cfg["dataset"], ctx.out / "rows")
    train, held_out, report = load_conversations(ctx.out / "rows", ctx.cfg["dataset"])
    DataInfo.of(report["format"], train, held_out).write(ctx.out)
    return {}


def _pack(ctx: engine.StageContext) -> dict:
    fixtures = ctx.shared / "fixtures"
    src = h.packed_dataset_dir(fixtures, h.tiny_model_dir(fixtures), n_docs=ctx.cfg["dataset"]["n_docs"])
    shutil.copytree(src / "dataset", ctx.out / "dataset")
    return {}


CHAIN = [
    engine.Stage("download-model", "1", reads=("model",), outputs=("model",), run=_download_model),
    engine.Stage("map", "1", reads=("dataset",), outputs=(DATA_INFO,), run=_map),
    engine.Stage("pack", "1", reads=("dataset",), upstream=("map",), outputs=("dataset",), run=_pack),
    train.STAGE,
    convert.STAGE,
    merge.STAGE,
]


def _kill_after(step: int) -> None:
    from transformers import Trainer

    original = Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer._save_checkpoint = save_then_die


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = Cache(sys.argv[1])
    cfg = json.loads(sys.argv[2])
    if "--kill-after-checkpoint" in sys.argv:
        _kill_after(int(sys.argv[sys.argv.index("--kill-after-checkpoint") + 1]))
    print(json.dumps(engine.run(engine.plan(cfg, CHAIN, cache), cache)))
