"""The model to train: which layers carry adapters, and what the backward pass then touches."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ftpipe.config import compose, validate
from ftpipe.errors import FtpipeError
from ftpipe.training.model import lora_config


def _tiny(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4
    )
    return LlamaForCausalLM(config)


def _train_cfg(last_layers: int | None) -> dict:
    return {
        "lora": {
            "r": 4,
            "alpha": 8,
            "dropout": 0.0,
            "target_modules": "all-linear",
            "last_layers": last_layers,
        }
    }


def test_last_layers_puts_adapters_only_on_the_top_layers_and_the_backward_stops_below_them():
    base = _tiny(4)
    model = get_peft_model(base, lora_config(_train_cfg(1), base))
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == {3}
    names = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    needs_grad = {}
    for i, layer in enumerate(model.base_model.model.model.layers):
        layer.register_forward_hook(lambda _m, _in, out, i=i: needs_grad.__setitem__(i, out[0].requires_grad))
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    # layers 0-2 build no autograd graph at all: nothing below the adapted layer is differentiated
    assert needs_grad == {0: False, 1: False, 2: False, 3: True}
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("last_layers", [None, 2, 8])  # 8 of 2: a recipe tuned on a deeper model
def test_last_layers_none_or_at_least_the_depth_adapts_every_layer(last_layers):
    base = _tiny(2)
    model = get_peft_model(base, lora_config(_train_cfg(last_layers), base))
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == {0, 1}


def test_a_last_layers_below_one_is_refused_before_any_stage_naming_the_key():
    with pytest.raises(FtpipeError, match=r"train\.lora\.last_layers"):
        validate(compose(["train.lora.last_layers=0"]))
