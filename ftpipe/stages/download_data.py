"""download-data: the dataset's raw rows as they came (`data/raw/`) and the seeded held-out choice
(`data/split.json`). Reads no model: a new model never refetches the data."""

from __future__ import annotations

from ..data.sources import materialize_dataset
from ..engine import Stage, StageContext


def run(ctx: StageContext) -> dict:
    return materialize_dataset(ctx.cfg["dataset"], ctx.out / "data")


STAGE = Stage(
    name="download-data",
    version="1",
    reads=("dataset.path", "dataset.split", "dataset.eval_size", "dataset.name"),
    path_keys=("dataset.path",),
    outputs=("data",),
    run=run,
)
