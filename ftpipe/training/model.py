"""Build the model to train: full weights, or a quantized/plain base wrapped with LoRA adapters."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import FtpipeError
from . import speed
from .devices import compute_dtype

log = logging.getLogger("ftpipe")

QUANTIZED = {"qlora", "lora8bit"}


def quantization_config(train_cfg: dict[str, Any], device: str):
    """bitsandbytes settings for the quantized methods: nf4 + double quant (QLoRA) or LLM.int8."""
    method = train_cfg["method"]
    if method not in QUANTIZED:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise FtpipeError(
            f"config key `train.method`: {method} needs bitsandbytes (pip install 'ftpipe[qlora]')"
        ) from exc
    if method == "qlora":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(train_cfg, device),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def lora_config(train_cfg: dict[str, Any], model: torch.nn.Module):
    from peft import LoraConfig

    lora = train_cfg["lora"]
    targets, layers, last = lora["target_modules"], None, lora.get("last_layers")
    n_layers = model.config.num_hidden_layers
    if (
        last is not None and last < n_layers
    ):  # as many or more: every layer (a recipe tuned on a deeper model)
        layers = list(range(n_layers - last, n_layers))
        if targets == "all-linear":  # PEFT takes a layer subset only with module names
            targets = _linear_names(model)
    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=targets,
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _linear_names(model: torch.nn.Module) -> list[str]:
    """What PEFT's "all-linear" means: every linear layer's name but the output head's (quantized ones too:
    bitsandbytes' layers subclass nn.Linear)."""
    head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )


def load_for_training(
    model_dir: Path, train_cfg: dict[str, Any], levers: speed.Levers, trust_remote_code: bool = False
) -> torch.nn.Module:
    """The model to train on `levers.device`, with the resolved speed levers applied (speed/__init__.py)."""
    from transformers import AutoModelForCausalLM

    device = levers.device
    kwargs = speed.model_load_kwargs(train_cfg, levers)
    quant = quantization_config(train_cfg, device)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code, **kwargs)
    if quant is None and device == "cuda" and levers.fused_lora:
        # The fused ops concatenate sibling base weights into one buffer and make each layer's weight a view of
        # it (speed/lora.py); a move after that (the Trainer's) would copy buffer and views apart: 1.2 GiB more
        # for Llama-3.2-1B. So the model is on its GPU before PEFT and the levers (a quantized one already is).
        model.to(torch.cuda.current_device())
    # A KV cache during training makes packed rows attend across documents; it is useless there anyway.
    model.config.use_cache = False
    if quant is not None:
        model = speed.prepare_quantized(model, train_cfg, levers)
    model = speed.patch_model(model, train_cfg, levers)
    if train_cfg["method"] == "full":
        return model

    from peft import get_peft_model

    try:
        model = get_peft_model(model, lora_config(train_cfg, model), **speed.peft_kwargs(levers))
    except ValueError as exc:  # PEFT names the modules it could not find
        raise FtpipeError(f"config key `train.lora.target_modules`: {exc}") from None
    model = speed.after_peft(model, train_cfg, levers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    return model
