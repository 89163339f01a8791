"""The train stage's speed hooks: where the levers of `levers.py` enter model loading and PEFT setup.

Call order in the train stage:
    kwargs = model_load_kwargs(train_cfg, device)      # -> AutoModelForCausalLM.from_pretrained(..., **kwargs)
    model = patch_model(model, train_cfg, device)      # after loading, before PEFT
    model = get_peft_model(model, lora_cfg, **peft_kwargs(train_cfg, device))
    model = after_peft(model, train_cfg, device)       # fused LoRA, compiled / checkpointed layers
    collate = collator(train_cfg, device, base)        # padding-free concatenation when on
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import levers as lv
from .loss import patch_causal_lm


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def model_load_kwargs(train_cfg: Any, device: torch.device | str) -> dict[str, Any]:
    """Keyword arguments for `from_pretrained` / `from_config`: dtype and attention implementation."""
    device = torch.device(device)
    levers = lv.resolve(train_cfg, device)
    if levers.attention in ("varlen", "flex"):
        from . import attention

        attention.register()
    return {"dtype": _dtype(device), "attn_implementation": lv.attn_implementation(levers)}


def patch_model(model: nn.Module, train_cfg: Any, device: torch.device | str) -> nn.Module:
    """After loading, before PEFT: no KV cache in training (with one, packed rows attend across documents),
    per-document attention with its boundary hook, fused linear cross-entropy."""
    device = torch.device(device)
    levers = lv.resolve(train_cfg, device)
    model.config.use_cache = False
    lv.install_packed_attention(model, levers)
    if levers.fused_ce != "off":
        patch_causal_lm(model, levers.fused_ce)
    return model


def peft_kwargs(train_cfg: Any, device: torch.device | str) -> dict[str, Any]:
    """Extra `get_peft_model` arguments: bf16 adapters stay bf16 (PEFT upcasts them to fp32 by default)."""
    levers = lv.resolve(train_cfg, torch.device(device))
    return {"autocast_adapter_dtype": levers.adapter_dtype != "bf16"}


def after_peft(model: nn.Module, train_cfg: Any, device: torch.device | str) -> nn.Module:
    """After PEFT: adapters in their dtype, fused LoRA linears, compiled and/or checkpointed decoder layers."""
    device = torch.device(device)
    levers = lv.resolve(train_cfg, device)
    if levers.adapter_dtype == "bf16" and _dtype(device) == torch.bfloat16:
        lv.cast_adapters(model, torch.bfloat16)
    if levers.fused_lora:
        lv.fuse_lora(model)
    if levers.compile or levers.checkpointing != "none":
        lv.wrap_layers(model, levers)
    return model


def training_args_overrides(train_cfg: Any, device: torch.device | str) -> dict[str, Any]:
    """TrainingArguments the levers own: checkpointing is done by `after_peft`, not by the Trainer."""
    levers = lv.resolve(train_cfg, torch.device(device))
    return {"gradient_checkpointing": False} if levers.checkpointing != "none" else {}


def collator(train_cfg: Any, device: torch.device | str) -> Any:
    """Padding-free collator when the lever is on (one row per micro-batch), else None (the stage's own)."""
    levers = lv.resolve(train_cfg, torch.device(device))
    return concat_rows if levers.padding_free else None


def concat_rows(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Concatenate packed rows into one row of B*T tokens: no padding, position_ids restart per document (the
    attention reads the boundaries from them), no attention_mask."""
    out: dict[str, torch.Tensor] = {}
    for key in ("input_ids", "labels", "position_ids"):
        if key in features[0]:
            out[key] = torch.cat([torch.as_tensor(f[key]).reshape(-1) for f in features])[None]
    if "position_ids" not in out:
        out["position_ids"] = torch.cat(
            [torch.arange(len(torch.as_tensor(f["input_ids"]).reshape(-1))) for f in features]
        )[None]
    return out
