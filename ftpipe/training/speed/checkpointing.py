"""Decoder layers recomputed in backward (`train.speed.checkpointing`) and/or compiled (`train.speed.compile`):
`wrap_layers` wraps each layer in place. `full` is transformers' own non-reentrant checkpointing
(`enable_full`); `offload` keeps each layer's input in pinned host memory; `selective` keeps matmul and attention
outputs and recomputes the cheap elementwise ops. Under `offload` the attention over one long document keeps its
output from the first forward for the recompute (`AttentionKeeper`)."""

from __future__ import annotations

import functools
import os
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


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class AttentionKeeper:
    """Keeps the attention output (and log-sum-exp) of each checkpointed layer's no-grad forward, so the layer's
    recompute in backward hands them to attention's backward instead of running attention's forward again.
    Over one long document attention is most of a layer's work (a 131k-token row of a 1B model: ~2 s of a 14 s
    step is that second forward). The outputs go to pinned host memory like the layers' inputs (`offloader`;
    None keeps them where they are, as on the CPU); a layer whose output would take the pinned total over half
    the machine's memory recomputes its attention instead.

    The attention function reaches the keeper through `keeping()` / `replayed_attention()`, set only while a
    checkpoint runs its layer (`OffloadedCheckpoint`)."""

    def __init__(self, offloader: ActivationOffloader | None, layers: int, budget: int | None = None) -> None:
        self.offloader, self.layers = offloader, layers
        self.budget = host_memory_bytes() // 2 if budget is None else budget
        self.kept = 0  # outputs kept this step

    def reset(self) -> None:
        self.kept = 0
        if self.offloader is not None:
            self.offloader.reset()

    def keep(self, records: list, out: torch.Tensor, lse: torch.Tensor, aux: tuple) -> None:
        # the layers' inputs are as large as an attention output and all of them are parked too
        if (self.layers + self.kept + 1) * out.nbytes > self.budget:
            records.append(None)
            return
        self.kept += 1
        # [B, T, H, D] is the output's memory order (it follows the query's); the copy wants it contiguous
        stored = out.transpose(1, 2)
        if self.offloader is not None:
            stored = self.offloader.save(stored)
        records.append((stored, lse, aux))

    def replay(self, records: list, device: torch.device) -> tuple | None:
        record = records.pop(0) if records else None
        if record is None:
            return None
        stored, lse, aux = record
        if self.offloader is not None:
            stored = self.offloader.load(stored, device)
        return stored.transpose(1, 2), lse, aux


# (keeper, records of the running layer, "keep" | "replay") while a checkpoint runs a layer
_ATTENTION: tuple[AttentionKeeper, list, str] | None = None


def keeping() -> bool:
    """True inside a checkpoint's no-grad forward whose attention outputs are kept for the recompute."""
    return _ATTENTION is not None and _ATTENTION[2] == "keep"


def keep_attention(out: torch.Tensor, lse: torch.Tensor, aux: tuple) -> None:
    if keeping():
        keeper, records, _ = _ATTENTION
        keeper.keep(records, out, lse, aux)


def replayed_attention(device: torch.device) -> tuple | None:
    """(output, log-sum-exp, the kernel's other outputs) kept for this layer's recompute, or None."""
    if _ATTENTION is None or _ATTENTION[2] != "replay":
        return None
    keeper, records, _ = _ATTENTION
    return keeper.replay(records, device)


class _Attending:
    def __init__(self, keeper: AttentionKeeper | None, records: list, mode: str) -> None:
        self.state = (keeper, records, mode) if keeper is not None else None

    def __enter__(self) -> None:
        global _ATTENTION
        self.before, _ATTENTION = _ATTENTION, self.state

    def __exit__(self, *exc: Any) -> None:
        global _ATTENTION
        _ATTENTION = self.before


def draws_random(layer: nn.Module) -> bool:
    """Whether a forward of `layer` in training draws random numbers: a dropout (LoRA's, an MLP's) or an
    attention dropout above 0."""

    def draws(m: nn.Module) -> bool:
        # attention modules keep the probability as a float (a dropout module is one of modules() anyway)
        attention_p = getattr(m, "attention_dropout", 0.0)
        return (isinstance(m, nn.Dropout) and m.p > 0) or (isinstance(attention_p, float) and attention_p > 0)

    return any(draws(m) for m in layer.modules())


def _rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class OffloadedCheckpoint(torch.autograd.Function):
    """Checkpoint a layer: forward without saving activations, its input parked on the host; backward brings
    the input back, recomputes the layer with grad and back-propagates through it (reentrant style). With
    `random` (the layer draws random numbers: `draws_random`) the recompute starts from the random state its
    forward started from, so its dropout masks are the forward's, and leaves the state as it found it (as
    torch.utils.checkpoint's `preserve_rng_state`; compiled layers take their masks' seeds from that state
    too). Without, nothing is stashed: the usual layer (no dropout) needs nothing."""

    @staticmethod
    def forward(
        ctx: Any,
        run: Callable,
        offloader: ActivationOffloader | None,
        keeper: AttentionKeeper | None,
        random: bool,
        hidden: torch.Tensor,
        *rest,
    ):
        ctx.run, ctx.offloader, ctx.keeper, ctx.kept = run, offloader, keeper, []
        kind = hidden.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.rng = _rng_states(hidden.device) if random else None
        if offloader is not None:
            ctx.slot = offloader.save(hidden)
        else:
            ctx.save_for_backward(hidden)
        ctx.device = hidden.device
        with torch.no_grad(), _Attending(keeper, ctx.kept, "keep"):
            return run(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if ctx.offloader is not None:
            hidden = ctx.offloader.load(ctx.slot, ctx.device)
        else:
            (hidden,) = ctx.saved_tensors
        hidden = hidden.detach().requires_grad_(ctx.needs_input_grad[4])
        kind, enabled, dtype = ctx.autocast
        cuda = [ctx.device] if ctx.device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=cuda, enabled=ctx.rng is not None, device_type="cuda"),
            torch.enable_grad(),
            torch.autocast(kind, dtype=dtype, enabled=enabled),
            _Attending(ctx.keeper, ctx.kept, "replay"),
        ):
            if ctx.rng is not None:
                torch.set_rng_state(ctx.rng[0])
                if ctx.rng[1] is not None:
                    torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
            out = ctx.run(hidden)
        torch.autograd.backward(out, grad)
        return (None, None, None, None, hidden.grad if ctx.needs_input_grad[4] else None, None)


def wrap_layers(model: nn.Module, levers: Levers) -> None:
    """Compile each decoder layer and/or checkpoint it (offloaded or selective), in place."""
    stack = decoder_stack(model)
    # "full" is transformers' own (non-reentrant) checkpointing, switched on before PEFT (`enable_full`).
    mode = levers.checkpointing if levers.checkpointing in ("offload", "selective") else "none"
    offloader = keeper = None
    if mode == "offload":
        offloader = ActivationOffloader()
        keeper = AttentionKeeper(ActivationOffloader(), len(stack.layers))

        def new_step(*_: Any) -> None:  # (a pre-hook's return value would replace the stack's arguments)
            offloader.reset()
            keeper.reset()

        stack.register_forward_pre_hook(new_step)
    if levers.compile:
        compiled.configure(levers, len(stack.layers))
    # A tensor that needs grad, so the checkpoint node is part of the graph even where the layer's input
    # (the frozen embeddings' output) does not need grad.
    anchor = torch.zeros((), requires_grad=True)
    for layer in stack.layers:
        inner = type(layer).forward.__get__(layer)
        if mode == "selective":
            inner = _selective(inner)
        run = compiled.compiled_layer(inner) if levers.compile else inner
        if mode in ("none", "selective"):
            layer.forward = run
            continue
        random = draws_random(layer)
        layer.forward = functools.partial(_checkpointed_forward, run, offloader, keeper, anchor, random)


def _checkpointed_forward(
    run: Callable,
    offloader: ActivationOffloader | None,
    keeper: AttentionKeeper | None,
    anchor: torch.Tensor,
    random: bool,
    *args: Any,
    **kwargs: Any,
) -> Any:
    hidden, args = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
    if not torch.is_grad_enabled():
        return run(hidden, *args, **kwargs)
    shape: list[bool] = []  # whether the layer returns a tuple (older transformers) or a tensor

    def body(h: torch.Tensor) -> torch.Tensor:
        out = run(h, *args, **kwargs)
        shape[:] = [isinstance(out, tuple)]
        return out[0] if isinstance(out, tuple) else out

    out = OffloadedCheckpoint.apply(body, offloader, keeper, random, hidden, anchor)
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
