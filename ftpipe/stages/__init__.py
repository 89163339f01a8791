"""The stage chain, in order. Each module holds one stage and exposes it as STAGE."""

from . import convert, download, evaluate_chat, map, merge, pack, train

CHAIN = [download.STAGE, map.STAGE, pack.STAGE, train.STAGE, convert.STAGE, merge.STAGE, evaluate_chat.STAGE]
