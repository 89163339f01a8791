"""Quantization error of QLoRA's base on one model, and a folder with the error baked in (issue 15).

    python scripts/nf4_roundtrip.py MODEL_DIR OUT_DIR [--keep-last N] [--json FILE]

Every linear weight of the decoder layers goes through bitsandbytes' nf4 with double quantisation (QLoRA's
setting) and back; OUT_DIR holds the model with those weights (the last N layers left exact with --keep-last),
so plain LoRA on it trains on exactly the numbers QLoRA's forward uses. Prints and writes the relative error
‖W − deq(q(W))‖ / ‖W‖ per layer and module.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--keep-last", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    n_layers = model.config.num_hidden_layers
    errors: dict[str, float] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or ".layers." not in name:
                continue
            layer = int(name.split(".layers.")[1].split(".")[0])
            w = module.weight.data.to(device)
            q, state = bnbf.quantize_4bit(w.to(torch.bfloat16), quant_type="nf4", compress_statistics=True)
            back = bnbf.dequantize_4bit(q, state, quant_type="nf4").float()
            errors[name] = float((w - back).norm() / w.norm())
            if layer < n_layers - args.keep_last:
                module.weight.data.copy_(back.cpu())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out_dir)
    AutoTokenizer.from_pretrained(args.model_dir).save_pretrained(args.out_dir)
    by_layer: dict[int, list[float]] = {}
    for name, err in errors.items():
        by_layer.setdefault(int(name.split(".layers.")[1].split(".")[0]), []).append(err)
    summary = {
        "mean_relative_error": sum(errors.values()) / len(errors),
        "per_layer_mean": {k: round(sum(v) / len(v), 5) for k, v in sorted(by_layer.items())},
        "per_module": {k: round(v, 5) for k, v in errors.items()},
        "kept_exact_last_layers": args.keep_last,
    }
    print(json.dumps({k: summary[k] for k in ("mean_relative_error", "per_layer_mean")}))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
