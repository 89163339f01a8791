"""convert: the train stage's final weights → a portable HF artifact.

LoRA/QLoRA → `adapter/` (adapter_config.json + adapter_model.safetensors, loadable with
`PeftModel.from_pretrained`), whose base_model_name_or_path is the hub id for hub models and the downloaded
model folder otherwise. Full fine-tuning → `model/`, an HF model folder with the tokenizer.
Only safetensors and JSON are carried over: Trainer's pickled training_args.bin stays behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..engine import Stage, StageContext, local_path
from ..errors import FtpipeError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def base_model_reference(model_cfg: dict[str, Any], downloaded: Path) -> str:
    """Where a user of the adapter finds its base: the hub id if it came from the hub, else our HF folder."""
    path = model_cfg["path"]
    special = path.startswith(("tiny:", "pypi:")) or path.endswith(".gguf") or local_path(path) is not None
    return str(downloaded) if special else path


def _check_adapter(folder: Path) -> int:
    """The adapter's tensors are LoRA factors of a PEFT causal-LM wrapper; returns how many there are."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
        names = list(fh.keys())
    lora = [n for n in names if ".lora_A." in n or ".lora_B." in n]
    if not lora:
        raise FtpipeError(f"convert: {folder} holds no LoRA tensors ({names[:5]}…)")
    return len(names)


def run(ctx: StageContext) -> dict[str, Any]:
    final = ctx.input("train", "final")
    downloaded = ctx.input("download-model", "model")
    if ctx.cfg["train"]["method"] == "full":
        from transformers import AutoTokenizer

        dest = ctx.out / "model"
        dest.mkdir()
        weights = sorted(final.glob("*.safetensors"))
        if not weights:
            raise FtpipeError(f"convert: no safetensors weights in {final}")
        for item in [*weights, *final.glob("*.json")]:
            shutil.copy2(item, dest / item.name)
        AutoTokenizer.from_pretrained(downloaded).save_pretrained(dest)
        return {"convert_format": "hf-model", "convert_files": len(list(dest.iterdir()))}

    missing = [name for name in ADAPTER_FILES if not (final / name).is_file()]
    if missing:
        raise FtpipeError(f"convert: the train stage's final adapter lacks {missing} in {final}")
    dest = ctx.out / "adapter"
    dest.mkdir()
    shutil.copy2(final / "adapter_model.safetensors", dest / "adapter_model.safetensors")
    config = json.loads((final / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_model_reference(ctx.cfg["model"], downloaded)
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = _check_adapter(dest)
    return {"convert_format": "peft-adapter", "adapter_tensors": tensors}


STAGE = Stage(
    name="convert",
    version="1",
    reads=("train.method", "model.path"),
    path_keys=("model.path",),
    upstream=("download-model", "train"),
    outputs=("adapter", "model"),  # adapter/ for LoRA methods, model/ for full fine-tuning
    optional=("adapter", "model"),
    run=run,
)
