"""The stage chain, in order. Each module holds one stage and exposes it as STAGE."""

from . import download, train

CHAIN = [download.STAGE, train.STAGE]
