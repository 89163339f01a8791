"""The stage chain, in order. Each module holds one stage and exposes it as STAGE."""

from typing import Any

from .. import engine
from ..cache import Cache
from . import convert, download_data, download_model, evaluate_chat, export, map, merge, pack, train

CHAIN = [
    download_model.STAGE,
    download_data.STAGE,
    map.STAGE,
    pack.STAGE,
    train.STAGE,
    convert.STAGE,
    merge.STAGE,
    evaluate_chat.STAGE,
    export.STAGE,
]

# Words a user may put in `stages=[...]` for several stages at once.
ALIASES = {"download": (download_model.STAGE.name, download_data.STAGE.name)}


def requested(cfg: dict[str, Any]) -> list[str]:
    """The stages asked for. export runs only when asked: named in `stages`, or given types (`export.gguf`) by
    a run of the whole chain (through evaluate-chat); `stages=[merge]` and the like stop where they say."""
    asked = list(cfg.get("stages") or [s.name for s in CHAIN if s is not export.STAGE])
    names = {name.replace("_", "-") for name in asked}
    whole = evaluate_chat.STAGE.name in names
    if (cfg.get("export") or {}).get("gguf") and whole and export.STAGE.name not in names:
        asked.append(export.STAGE.name)
    return asked


def plan(cfg: dict[str, Any], cache: Cache) -> list[engine.PlannedStage]:
    """The engine's plan for ftpipe's chain: the stages `requested` (aliases allowed) and what they need."""
    return engine.plan({**cfg, "stages": requested(cfg)}, CHAIN, cache, ALIASES)
