"""The stage chain, in order. Each module holds one stage and exposes it as STAGE."""

from . import convert, download, merge, train

CHAIN = [download.STAGE, train.STAGE, convert.STAGE, merge.STAGE]
