"""The decoder stack of a causal LM: where the levers hook in once per forward and wrap each layer."""

from __future__ import annotations

from torch import nn


def decoder_stack(model: nn.Module) -> nn.Module:
    """The `*Model` holding `.layers` under a CausalLM / PEFT wrapper."""
    m = model
    for _ in range(6):
        if hasattr(m, "layers") and isinstance(m.layers, nn.ModuleList):
            return m
        m = m.get_base_model() if hasattr(m, "get_base_model") else getattr(m, "model", None)
        if m is None:
            break
    raise ValueError("no decoder stack with `.layers` found in the model")
