"""Where a model runs and in which dtype, for inference (evaluate-chat, chat); training has its own precision
rule (training/devices.py) but the same device rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(model: str | Path, adapter: str | Path | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) on the best device: bf16 on CUDA, fp32 on CPU; a PEFT adapter applied if given.
    `model` may be a folder, a hub id or a `.gguf` file (ftpipe's export, or any GGUF transformers reads)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = best_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    where: dict[str, Any] = {"pretrained_model_name_or_path": model}
    if str(model).endswith(".gguf"):  # an exported file: transformers dequantises it, tokenizer included
        path = Path(model).expanduser()
        if not path.is_file():
            from ..errors import FtpipeError

            raise FtpipeError(f"{model}: no such GGUF file")
        where = {"pretrained_model_name_or_path": path.parent, "gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(**where, trust_remote_code=trust_remote_code)
    lm: Any = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype, trust_remote_code=trust_remote_code)
    lm = lm.to(device)
    if adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter)
    return lm, tokenizer
