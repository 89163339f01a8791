"""The LoRA levers on PEFT's layers: fused LoRA linears (`fuse_lora`: one autograd node per projection, over a
bf16 or a 4-bit base) and the adapter dtype (`cast_adapters`, `downcast_frozen`)."""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from .lora_ops import lora_linear
from .nf4_ops import NF4_BUFFERS, attach_nf4, nf4_call


def _lora_can_fuse(layer: nn.Module) -> bool:
    try:
        (name,) = layer.active_adapters
    except (ValueError, AttributeError):
        return False
    base = layer.get_base_layer()
    if layer.disable_adapters or layer.merged or getattr(layer, "use_dora", {}).get(name):
        return False
    if getattr(layer, "lora_bias", {}).get(name):
        return False
    drop = layer.lora_dropout[name]
    if not (isinstance(drop, nn.Identity) or getattr(drop, "p", 1.0) == 0.0):
        return False
    a_dtype = layer.lora_A[name].weight.dtype
    if type(base) is nn.Linear:
        return base.weight.dtype == a_dtype  # fp32 adapters on a bf16 base keep PEFT's (autocast) path
    return type(base).__name__ == "Linear4bit" and a_dtype == torch.bfloat16


def _fused_lora_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs or not _lora_can_fuse(self):
        return type(self).forward(self, x, *args, **kwargs)
    (name,) = self.active_adapters
    base = self.get_base_layer()
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    scale = float(self.scaling[name])
    if self._ftpipe_nf4 is not None:
        # Under checkpointing a forward with grad on is the recompute, its backward right after it.
        keep = self._ftpipe_keep_dequant and torch.is_grad_enabled()
        data, absmax = (getattr(self, n) for n in NF4_BUFFERS)
        return nf4_call(x, data, absmax, base.bias, a, b, scale, self._ftpipe_nf4, keep)
    return lora_linear(x, base.weight, base.bias, a, b, scale)


def fuse_lora(model: nn.Module, keep_dequant: bool = False) -> int:
    """Route every PEFT LoRA linear (bf16 or 4-bit base) through one autograd node; returns how many.
    `keep_dequant` (only where every forward with grad is a checkpoint's recompute): a 4-bit weight dequantized
    in that forward is kept for its backward."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "get_base_layer") and _lora_can_fuse(module):
            base = module.get_base_layer()
            module._ftpipe_nf4 = None
            module._ftpipe_keep_dequant = keep_dequant
            if type(base).__name__ == "Linear4bit":
                attach_nf4(module, base)
            module.forward = types.MethodType(_fused_lora_forward, module)
            n += 1
    return n


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
