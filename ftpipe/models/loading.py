"""Where a model runs and in which dtype, for inference (evaluate-chat, chat); training has its own precision
rule (training/devices.py) but the same device rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(model: str | Path, adapter: str | Path | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) on the best device: bf16 on CUDA, fp32 on CPU; a PEFT adapter applied if given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = best_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    lm: Any = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code)
    lm = lm.to(device)
    if adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter)
    return lm, tokenizer
