"""The LoRA levers on PEFT's layers: fused LoRA linears (`fuse_lora`: one autograd node per projection, over a
bf16 or a 4-bit base; one per group of projections that read the same input) and the adapter dtype
(`cast_adapters`, `downcast_frozen`)."""

from __future__ import annotations

import collections
import logging
import types
from typing import Any

import torch
from torch import nn

from .lora_ops import lora_linear
from .nf4_ops import NF4_BUFFERS, attach_nf4, nf4_call

log = logging.getLogger("ftpipe")

# Sibling projections that read the same input in transformers' decoder layers (Llama, Qwen2, Mistral, Gemma,
# ...): attention's q/k/v read the normed hidden states, the MLP's gate/up its normed input. Grouped, each is one
# GEMM over their concatenated base weights and one over their A's, in one operator call: for Llama-3.2-1B 4
# operator calls a layer instead of 7 and 46 kernels instead of 70 over forward and backward, and k/v's narrow
# GEMMs (512 outputs) become part of q's.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Groups whose members' outputs are all saved for backward by their one consumer (the SwiGLU product keeps gate
# and up): a member's output is a view of the group's, since the whole group stays alive anyway, and a copy of
# each would only cost a pass over it (compiled, the MLP's forward kernel wrote both copies: 256 MiB of writes
# a layer for Llama-3.2-1B at 8k tokens, to save what the group's output already held).
VIEW_GROUPS = (("gate_proj", "up_proj"),)
# the group's base weight (bf16, or packed 4-bit data), its fp32 block scales (4-bit), its bias
_WEIGHT, _ABSMAX, _BIAS = "_ftpipe_group_weight", "_ftpipe_group_absmax", "_ftpipe_group_bias"
# Decoder layers whose output is `residual + mlp.down_proj(...)`: nothing inside the layer reads down's output
# but that sum (no norm after the MLP, as Gemma 2/3 and OLMo 2 have), and the backward of a sum reads neither
# input. So where only the layer's backward follows (an offloaded checkpoint's recompute), down's output need
# not be computed (`skip_unread_output`).
OUTPUT_IS_RESIDUAL_PLUS_DOWN = (
    "LlamaDecoderLayer",
    "MistralDecoderLayer",
    "Qwen2DecoderLayer",
    "Qwen3DecoderLayer",
)


def _lora_can_fuse(layer: nn.Module) -> bool:
    return _not_fused_because(layer) is None


def _not_fused_because(layer: nn.Module) -> str | None:
    """Why `layer` keeps PEFT's own forward rather than a fused operator, or None where it can fuse."""
    try:
        (name,) = layer.active_adapters
    except (ValueError, AttributeError):
        return "not one active adapter"
    base = layer.get_base_layer()
    if layer.disable_adapters or layer.merged:
        return "adapters disabled or merged"
    if getattr(layer, "use_dora", {}).get(name):
        return "DoRA"
    if getattr(layer, "lora_bias", {}).get(name):
        return "a LoRA bias"
    a_dtype = layer.lora_A[name].weight.dtype
    if type(base) is nn.Linear:
        if (drop := _dropout(layer)) is not None:
            # PEFT's forward inside compiled layers was as fast as the fused one (docs/performance.md, call 12)
            return f"LoRA dropout {drop.p} over a 16-bit base"
        # fp32 adapters on a bf16 base keep PEFT's (autocast) path
        return None if base.weight.dtype == a_dtype else "adapters and base weight in different dtypes"
    if type(base).__name__ == "Linear4bit":
        return None if a_dtype == torch.bfloat16 else "4-bit base with adapters not in bf16"
    return f"a {type(base).__name__} base layer"


def _dropout(layer: nn.Module) -> nn.Module | None:
    """The active adapter's dropout where it drops anything, else None."""
    (name,) = layer.active_adapters
    drop = layer.lora_dropout[name]
    return None if isinstance(drop, nn.Identity) or getattr(drop, "p", 1.0) == 0.0 else drop


def _adapter(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    (name,) = layer.active_adapters
    return layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])


def _fused_lora_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs or not _lora_can_fuse(self):
        return type(self).forward(self, x, *args, **kwargs)
    head = self.__dict__.get("_ftpipe_head")
    if head is not None:
        return _grouped(self, head, x)
    a, b, scale = _adapter(self)
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    base = self.get_base_layer()
    # Under checkpointing a forward with grad on is the recompute, its backward right after it.
    unread = self._ftpipe_output_unread and torch.is_grad_enabled()
    if self._ftpipe_nf4 is not None:
        keep = self._ftpipe_keep_dequant and torch.is_grad_enabled()
        data, absmax = (getattr(self, n) for n in NF4_BUFFERS)
        drop = self._ftpipe_dropout
        if drop is None:
            return nf4_call(x, data, absmax, base.bias, [a], [b], [scale], self._ftpipe_nf4, keep, unread)
        # LoRA dropout: the operator runs the 4-bit base alone (a rank-0 adapter: its GEMMs are empty), PEFT's
        # adapter path takes the dropped input. The base keeps what the fused operator gives a QLoRA weight
        # (block scales dequantized once, the recompute's weight kept for its backward).
        no_a, no_b = a.new_empty((0, a.shape[1])), b.new_empty((b.shape[0], 0))
        out = nf4_call(x, data, absmax, base.bias, [no_a], [no_b], [0.0], self._ftpipe_nf4, keep, unread)
        return out + (drop(x) @ a.t() @ b.t()) * scale
    return lora_linear(x, base.weight, base.bias, [a], [b], [scale], unread)


def _grouped(self: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """This projection's columns of its group's output. The first member called with an input computes the
    whole group and keeps the output on the group's head until every member has taken its columns. A member
    called with another input computes the group again, and one whose sibling cannot fuse (adapters disabled)
    takes PEFT's own path: any call order gives the plain numbers."""
    pending = head._ftpipe_pending
    if pending is not None and pending[0] is x and self._ftpipe_member in pending[2]:
        out, left = pending[1], pending[2]
    else:
        out = group_output(head, x)
        if out is None:
            return type(self).forward(self, x)
        left = tuple(range(len(head._ftpipe_members)))
    left = tuple(i for i in left if i != self._ftpipe_member)
    head._ftpipe_pending = (x, out, left) if left else None
    start, stop = self._ftpipe_columns
    if head._ftpipe_views:
        return out[..., start:stop]
    # A tensor of its own, not a view: a consumer that saves it for backward (attention keeps v) would keep the
    # whole group's output alive (for q/k/v 6x v's memory). Compiled, the copy fuses into the consumer's kernel
    # (the rotary embedding) or is one small copy (v).
    return out[..., start:stop].contiguous()


def group_output(head: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The whole output of the group `head` leads for input x (its members' columns side by side), or None
    where a member cannot fuse (adapters disabled, merged, ...): then each takes PEFT's own path."""
    members = head._ftpipe_members
    if not all(_lora_can_fuse(m) for m in members):
        return None
    adapters = [_adapter(m) for m in members]
    a, b, scale = ([t[i] for t in adapters] for i in range(3))
    xc = x.to(a[0].dtype) if x.dtype != a[0].dtype else x
    weight, bias = getattr(head, _WEIGHT), getattr(head, _BIAS)
    if head._ftpipe_nf4 is not None:
        keep = head._ftpipe_keep_dequant and torch.is_grad_enabled()  # as for one projection
        absmax = getattr(head, _ABSMAX)
        return nf4_call(xc, weight, absmax, bias, a, b, scale, head._ftpipe_group_nf4, keep)
    return lora_linear(xc, weight, bias, a, b, scale)


def group_head(layer: nn.Module) -> nn.Module | None:
    """The head of the group `layer` leads (its first member), or None."""
    return layer if layer.__dict__.get("_ftpipe_head") is layer else None


def group_siblings(model: nn.Module) -> int:
    """Group the fused LoRA projections that read the same input (`SIBLINGS`) under one operator call; returns
    how many groups. Their base weights (and biases) are concatenated once, and each base layer's weight
    becomes a view of its rows: no second copy, as long as the model is not moved afterwards (a move copies
    views and buffer apart: group where the model trains). A 4-bit weight is quantized in blocks of the
    row-major weight, so the rows of several concatenate as their packed data and block scales do."""
    groups = 0
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if not all(m is not None and hasattr(m, "_ftpipe_nf4") for m in members):
                continue  # not fused
            if any(m._ftpipe_dropout is not None for m in members):
                continue  # each member drops its own input for its adapter
            bases = [m.get_base_layer() for m in members]
            first = members[0]
            if any(
                b.in_features != bases[0].in_features
                or (b.bias is None) != (bases[0].bias is None)
                or (m._ftpipe_nf4 is None) != (first._ftpipe_nf4 is None)
                or (m._ftpipe_nf4 is not None and m._ftpipe_nf4[:2] != first._ftpipe_nf4[:2])
                or tuple(m.active_adapters) != tuple(first.active_adapters)
                for m, b in zip(members, bases, strict=True)
            ):
                continue
            _group(members, bases, member_views=names in VIEW_GROUPS)
            groups += 1
    return groups


def _concatenated(parts: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(parts concatenated along dim 0, each part as a view of its rows)"""
    whole = torch.cat(parts)
    return whole, list(whole.split([p.shape[0] for p in parts]))


def _group(members: list[nn.Module], bases: list[nn.Module], member_views: bool) -> None:
    head = members[0]
    four_bit = head._ftpipe_nf4 is not None
    with torch.no_grad():
        if four_bit:
            weight, views = _concatenated([getattr(m, NF4_BUFFERS[0]) for m in members])
            absmax, scale_views = _concatenated([getattr(m, NF4_BUFFERS[1]) for m in members])
            for m, base, data, scales in zip(members, bases, views, scale_views, strict=True):
                base.weight.data = data  # Params4bit keeps its quant_state, its data now the group's rows
                m.register_buffer(NF4_BUFFERS[0], data, persistent=False)
                m.register_buffer(NF4_BUFFERS[1], scales, persistent=False)
            blocksize, quant_type, _shape, dtype = head._ftpipe_nf4
            rows = sum(b.out_features for b in bases)
            head._ftpipe_group_nf4 = (blocksize, quant_type, [rows, bases[0].in_features], dtype)
            head.register_buffer(_ABSMAX, absmax, persistent=False)
        else:
            weight, views = _concatenated([b.weight for b in bases])
            for base, view in zip(bases, views, strict=True):
                base.weight.data = view
        bias = None
        if bases[0].bias is not None:
            bias, bias_views = _concatenated([b.bias for b in bases])
            for base, view in zip(bases, bias_views, strict=True):
                base.bias.data = view
    start = 0
    for i, (member, base) in enumerate(zip(members, bases, strict=True)):
        member._ftpipe_member, member._ftpipe_columns = i, (start, start + base.out_features)
        # a plain attribute, not a submodule: the head must not appear twice in the module tree
        member.__dict__["_ftpipe_head"] = head
        start += base.out_features
    head.__dict__["_ftpipe_members"] = members
    head._ftpipe_pending = None
    head._ftpipe_views = member_views
    head.register_buffer(_WEIGHT, weight, persistent=False)
    head.register_buffer(_BIAS, bias, persistent=False)


def fuse_lora(model: nn.Module, keep_dequant: bool = False, skip_unread_output: bool = False) -> int:
    """Route every PEFT LoRA linear (bf16 or 4-bit base) through one autograd node, sibling projections
    through one per group (`group_siblings`); returns how many projections. `keep_dequant` (only where every
    forward with grad is a checkpoint's recompute): a 4-bit weight dequantized in that forward is kept for its
    backward. `skip_unread_output` (only where every forward with grad is an offloaded checkpoint's recompute of
    a whole decoder layer): that forward skips what its backward never reads (`mark_unread_outputs`)."""
    from peft.tuners.lora import LoraLayer

    n = 0
    unfused: collections.Counter[str] = collections.Counter()
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "get_base_layer"):
            reason = _not_fused_because(module)
            if reason is not None:
                unfused[reason] += 1
                continue
            base = module.get_base_layer()
            module._ftpipe_nf4 = None
            module._ftpipe_keep_dequant = keep_dequant
            module._ftpipe_output_unread = False
            module._ftpipe_dropout = _dropout(module)
            if type(base).__name__ == "Linear4bit":
                attach_nf4(module, base)
            module.forward = types.MethodType(_fused_lora_forward, module)
            n += 1
    group_siblings(model)
    if skip_unread_output:
        mark_unread_outputs(model)
    for reason, count in unfused.items():
        log.info("[train] %d LoRA projections keep PEFT's own forward, not the fused one: %s", count, reason)
    return n


def mark_unread_outputs(model: nn.Module) -> int:
    """Mark the fused down projection of each decoder layer in `OUTPUT_IS_RESIDUAL_PLUS_DOWN`: in a forward
    with grad its operator saves what its backward needs (its input, x A^T; a 4-bit weight's dequantized copy)
    and leaves its output unfilled. For Llama-3.2-1B that is 28% of a layer's base GEMM FLOPs (Qwen2.5-7B: 29%)
    taken out of every recompute. Returns how many projections."""
    from .stack import decoder_stack

    marked = 0
    for layer in decoder_stack(model).layers:
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if type(layer).__name__ in OUTPUT_IS_RESIDUAL_PLUS_DOWN and hasattr(down, "_ftpipe_output_unread"):
            down._ftpipe_output_unread = True
            marked += 1
    return marked


def downcast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen fp32 floating-point parameters (norms or embeddings a loader kept in fp32) back to `dtype`;
    quantized weights and trained parameters are left alone."""
    for p in model.parameters():
        if not p.requires_grad and p.dtype == torch.float32 and type(p).__name__ != "Params4bit":
            p.data = p.data.to(dtype)


def cast_adapters(model: nn.Module, dtype: torch.dtype) -> None:
    """LoRA A/B in `dtype` (PEFT's default upcasts them to fp32 next to a bf16 base)."""
    for name, p in model.named_parameters():
        if "lora_" in name and p.dtype != dtype:
            p.data = p.data.to(dtype)
