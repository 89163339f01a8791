"""Long sequences (`train.speed.mlp_chunk_tokens`): each decoder layer's MLP runs over chunks of the sequence,
each chunk checkpointed on its own, so the MLP's intermediate activations (gate, up, their product: three
`tokens x intermediate_size` tensors, 6 GiB for one 128k-token sequence of Llama-3.2-1B) exist for one chunk
at a time. The MLP is position-wise, so chunking changes no number. Micro-batches of at most one chunk run the
plain (compiled) MLP."""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .stack import decoder_stack


def chunk_mlps(model: nn.Module, chunk_tokens: int) -> None:
    """Wrap every decoder layer's `mlp.forward` in place."""
    for layer in decoder_stack(model).layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        mlp._ftpipe_chunk_tokens = chunk_tokens
        # A method bound to the MLP, not a functools.partial per layer: dynamo guards a partial by its
        # identity, so every layer compiled a graph of its own (16 on Llama-3.2-1B instead of 2), re-traced at
        # every warm start and looked up through 16 cache entries at every call.
        mlp.forward = types.MethodType(_maybe_chunked, mlp)


def _maybe_chunked(self: nn.Module, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    # A shape test, so torch.compile traces the plain MLP (and guards on the length) for ordinary batches. An
    # MLP called with more than the hidden states is not position-wise for sure: left whole.
    if args or kwargs:
        return type(self).forward(self, hidden, *args, **kwargs)
    if hidden.shape[-2] <= self._ftpipe_chunk_tokens:
        return _plain(self, hidden)
    return _chunked(self, hidden)


def _plain(mlp: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The MLP's forward over one chunk: the fused SwiGLU MLP's (speed/swiglu.py) where it has one. Called, not
    bound: torch 2.11's dynamo cannot trace `function.__get__` and broke every compiled layer's graph there
    (the 1B LoRA peak 9.40 -> 9.90 GiB: the MLP's input kept at the break)."""
    fused = mlp.__dict__.get("_ftpipe_mlp_forward")
    return fused(hidden) if fused is not None else type(mlp).forward(mlp, hidden)


@torch._dynamo.disable  # eager, chunk by chunk: at these lengths the GEMMs are large and launch costs vanish
def _chunked(mlp: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    plain = functools.partial(_plain, mlp)
    parts = hidden.split(mlp._ftpipe_chunk_tokens, dim=-2)
    if torch.is_grad_enabled():
        outs = [checkpoint(plain, part, use_reentrant=False) for part in parts]
    else:  # the forward of an offloaded checkpoint: nothing is kept anyway, chunks bound the transient memory
        outs = [plain(part) for part in parts]
    return torch.cat(outs, dim=-2)
