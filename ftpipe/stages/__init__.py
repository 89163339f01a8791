"""The stage chain, in order. Each module holds one stage and exposes it as STAGE."""

from . import download, map, pack, train

CHAIN = [download.STAGE, map.STAGE, pack.STAGE, train.STAGE]
