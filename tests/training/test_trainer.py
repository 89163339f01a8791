"""The train stage's logging around compilation: a graph break in compiled code is said, ftpipe's own eager parts
are not."""

from __future__ import annotations

import functools

import torch
from torch._dynamo.utils import counters

from ftpipe.training.trainer import graph_break_warning


@torch.compiler.disable
def _eager(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def _with_deliberate_eager_part(x: torch.Tensor) -> torch.Tensor:
    return _eager(x + 1).sin()


def _with_a_break(x: torch.Tensor) -> torch.Tensor:
    y = x + 1
    torch._dynamo.graph_break()
    return y.sin()


def test_graph_breaks_are_warned_of_except_deliberate_eager_parts() -> None:
    compile_eager = functools.partial(torch.compile, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    compile_eager(_with_deliberate_eager_part)(torch.randn(3))
    assert counters["graph_break"] and graph_break_warning() is None
    compile_eager(_with_a_break)(torch.randn(3))
    line = graph_break_warning()
    assert line is not None and "1 time(s)" in line and "graph_break()" in line
    counters.clear()
