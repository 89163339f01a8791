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


@pytest.mark.parametrize("adapters", ["bf16", "fp32"])
def test_a_quantized_base_for_bf16_adapters_is_frozen_without_fp32_copies_of_its_weights(adapters):
    """PEFT's prepare_model_for_kbit_training upcasts every frozen 16-bit weight to fp32 (on Qwen2.5-7B the
    embeddings and head alone: 4 GiB, the run's peak); for bf16 adapters the base is frozen in bf16 instead."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ftpipe.training import speed

    class Fp32Copies(TorchDispatchMode):
        elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if torch.is_tensor(out) and out.dtype == torch.float32:
                Fp32Copies.elements += out.numel()
            return out

    model = _tiny(2).to(torch.bfloat16)
    train_cfg = validate(
        compose(["train=qlora", "train.precision=bf16", f"train.speed.adapter_dtype={adapters}"])
    )["train"]
    with Fp32Copies():
        model = speed.prepare_quantized(model, train_cfg, speed.resolve(train_cfg, "cpu"))
    assert not any(p.requires_grad for p in model.parameters())
    weights = sum(p.numel() for p in model.parameters())
    if adapters == "bf16":
        assert Fp32Copies.elements == 0 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    else:  # PEFT's own preparation, as before
        assert Fp32Copies.elements >= weights and all(p.dtype == torch.float32 for p in model.parameters())
