"""Decoder layers recomputed in backward (`train.speed.checkpointing`) and/or compiled (`train.speed.compile`):
`wrap_layers` wraps each layer in place. `full` is transformers' own non-reentrant checkpointing
(`enable_full`); `offload` keeps each layer's input in pinned host memory; `selective` keeps matmul and attention
outputs and recomputes the cheap elementwise ops."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import compiled
from .policy import Levers
from .stack import decoder_stack


def enable_full(model: nn.Module) -> None:
    """transformers' checkpointing; non-reentrant, it works with frozen inputs (LoRA) without
    enable_input_require_grads."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class ActivationOffloader:
    """Keeps each checkpointed layer's input in pinned host memory instead of on the GPU.

    Copies run on a side stream so they overlap the layers' compute; in backward the input of the layer before
    is fetched while this one recomputes. One pinned buffer per layer slot, reused every step."""

    def __init__(self) -> None:
        self.stream = torch.cuda.Stream()
        self.host: list[torch.Tensor] = []
        self.events: list[torch.cuda.Event] = []
        self.prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.count = 0

    def reset(self) -> None:
        self.count = 0
        self.prefetched.clear()

    def save(self, t: torch.Tensor) -> int:
        slot = self.count
        self.count += 1
        if slot == len(self.host):
            self.host.append(torch.empty(t.shape, dtype=t.dtype, pin_memory=True))
            self.events.append(torch.cuda.Event())
        elif self.host[slot].shape != t.shape or self.host[slot].dtype != t.dtype:
            self.host[slot] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.host[slot].copy_(t, non_blocking=True)
            self.events[slot].record()
        t.record_stream(self.stream)  # the GPU copy's memory is not reused before the transfer ends
        return slot

    def _fetch(self, slot: int, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.events[slot])
            gpu = self.host[slot].to(device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        return gpu, ev

    def load(self, slot: int, device: torch.device) -> torch.Tensor:
        gpu, ev = self.prefetched.pop(slot, None) or self._fetch(slot, device)
        if slot > 0 and slot - 1 not in self.prefetched:
            self.prefetched[slot - 1] = self._fetch(slot - 1, device)
        torch.cuda.current_stream().wait_event(ev)
        gpu.record_stream(torch.cuda.current_stream())
        return gpu


class OffloadedCheckpoint(torch.autograd.Function):
    """Checkpoint a layer: forward without saving activations, its input parked on the host; backward brings
    the input back, recomputes the layer with grad and back-propagates through it (reentrant style)."""

    @staticmethod
    def forward(ctx: Any, run: Callable, offloader: ActivationOffloader | None, hidden: torch.Tensor, *rest):
        ctx.run, ctx.offloader = run, offloader
        kind = hidden.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        if offloader is not None:
            ctx.slot = offloader.save(hidden)
        else:
            ctx.save_for_backward(hidden)
        ctx.device = hidden.device
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if ctx.offloader is not None:
            hidden = ctx.offloader.load(ctx.slot, ctx.device)
        else:
            (hidden,) = ctx.saved_tensors
        hidden = hidden.detach().requires_grad_(ctx.needs_input_grad[2])
        kind, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
            out = ctx.run(hidden)
        torch.autograd.backward(out, grad)
        return (None, None, hidden.grad if ctx.needs_input_grad[2] else None, None)


def wrap_layers(model: nn.Module, levers: Levers) -> None:
    """Compile each decoder layer and/or checkpoint it (offloaded or selective), in place."""
    stack = decoder_stack(model)
    # "full" is transformers' own (non-reentrant) checkpointing, switched on before PEFT (`enable_full`).
    mode = levers.checkpointing if levers.checkpointing in ("offload", "selective") else "none"
    offloader = ActivationOffloader() if mode == "offload" else None
    if offloader is not None:
        stack.register_forward_pre_hook(lambda *_: offloader.reset())
    if levers.compile:
        compiled.configure(levers)
    # A tensor that needs grad, so the checkpoint node is part of the graph even where the layer's input
    # (the frozen embeddings' output) does not need grad.
    anchor = torch.zeros((), requires_grad=True)
    for layer in stack.layers:
        inner = type(layer).forward.__get__(layer)
        if mode == "selective":
            inner = _selective(inner)
        run = compiled.dynamic_in_length(torch.compile(inner)) if levers.compile else inner
        if mode in ("none", "selective"):
            layer.forward = run
            continue
        layer.forward = functools.partial(_checkpointed_forward, run, offloader, anchor)


def _checkpointed_forward(
    run: Callable, offloader: ActivationOffloader | None, anchor: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    hidden, args = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
    if not torch.is_grad_enabled():
        return run(hidden, *args, **kwargs)
    shape: list[bool] = []  # whether the layer returns a tuple (older transformers) or a tensor

    def body(h: torch.Tensor) -> torch.Tensor:
        out = run(h, *args, **kwargs)
        shape[:] = [isinstance(out, tuple)]
        return out[0] if isinstance(out, tuple) else out

    out = OffloadedCheckpoint.apply(body, offloader, hidden, anchor)
    return (out,) if shape and shape[0] else out


def _selective(inner: Callable) -> Callable:
    """Selective activation checkpointing: keep matmul and attention outputs, recompute the cheap elementwise
    ops (norms, rotary, SwiGLU, residual adds) in backward. Traced inside torch.compile when compiling."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    save = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    save |= {
        op
        for name in (
            "_flash_attention_forward",
            "_efficient_attention_forward",
            "_scaled_dot_product_flash_attention",
        )
        if (op := getattr(getattr(torch.ops.aten, name, None), "default", None)) is not None
    }

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    def run(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(
            inner,
            hidden,
            *args,
            use_reentrant=False,
            context_fn=functools.partial(create_selective_checkpoint_contexts, policy),
            **kwargs,
        )

    return run
