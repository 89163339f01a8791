"""The stage chain, in order. Each module holds one stage and exposes it as STAGE."""

from typing import Any

from .. import engine
from ..cache import Cache
from . import convert, download_data, download_model, evaluate_chat, map, merge, pack, train

CHAIN = [
    download_model.STAGE,
    download_data.STAGE,
    map.STAGE,
    pack.STAGE,
    train.STAGE,
    convert.STAGE,
    merge.STAGE,
    evaluate_chat.STAGE,
]

# Words a user may put in `stages=[...]` for several stages at once.
ALIASES = {"download": (download_model.STAGE.name, download_data.STAGE.name)}


def plan(cfg: dict[str, Any], cache: Cache) -> list[engine.PlannedStage]:
    """The engine's plan for ftpipe's chain: `cfg["stages"]` (aliases allowed) and what they need."""
    return engine.plan(cfg, CHAIN, cache, ALIASES)
