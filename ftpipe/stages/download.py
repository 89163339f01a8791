"""download: materialise the model as an HF folder (`model/`) and the dataset's raw rows (`data/`)."""

from __future__ import annotations

from ..data.sources import materialize_dataset
from ..engine import Stage, StageContext
from ..models.sources import materialize_model


def run(ctx: StageContext) -> dict:
    model_metrics = materialize_model(ctx.cfg["model"], ctx.out / "model", ctx.cache.root / "downloads")
    data_metrics = materialize_dataset(ctx.cfg["dataset"], ctx.out / "data")
    return {**model_metrics, **data_metrics}


STAGE = Stage(
    name="download",
    version="1",
    reads=("model", "dataset.path", "dataset.split", "dataset.eval_size", "dataset.name"),
    path_keys=("model.path", "dataset.path"),
    run=run,
)
