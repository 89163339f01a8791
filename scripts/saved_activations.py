#!/usr/bin/env python3
"""What the compiled decoder layers keep for backward, on the CPU, for a real model shape: the partitioner's
choice (torch.compile's min-cut with the activation budget, `aot_eager_decomp_partition`: no kernels generated)
for a LoRA model of that shape with ftpipe's levers, as bytes a token and the largest storages kept. A change
to the fused ops or to what a layer hands on can move what the partitioner keeps (a view that keeps a whole
group's output alive, a GEMM recomputed instead of kept): this shows it before any GPU time is spent.

    python scripts/saved_activations.py [--shape llama-3.2-1b] [--layers 2] [--tokens 256] [--speed KEY=VALUE ...]

The layers' attention is `sdpa` here (varlen is CUDA-only); everything else follows `train.speed`'s keys.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]


def saved_storages(shape: str, layers: int, tokens: int, speed_cfg: dict) -> dict[int, tuple[int, list]]:
    """{storage pointer: (bytes, [shapes of the saved tensors in it])} for one forward of `tokens` tokens."""
    from bench import model_config  # scripts/bench.py: the real shapes
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftpipe.training import speed

    torch.compile = functools.partial(torch.compile, backend="aot_eager_decomp_partition")
    train_cfg = {"method": "lora", "precision": "bf16", "speed": {"attention": "sdpa", **speed_cfg}}
    levers = speed.resolve(train_cfg, "cpu")
    cfg = model_config(shape)
    cfg.num_hidden_layers = layers
    kwargs = speed.model_load_kwargs(train_cfg, levers)
    kwargs.pop("dtype", None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, **kwargs).to(torch.bfloat16)
    model = speed.patch_model(model, train_cfg, levers)
    lora = LoraConfig(r=64, lora_alpha=16, target_modules="all-linear")
    model = speed.after_peft(get_peft_model(model, lora, **speed.peft_kwargs(levers)), train_cfg, levers)
    frozen = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, tuple[int, list]] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen:
            kept.setdefault(ptr, (t.untyped_storage().nbytes(), []))[1].append(tuple(t.shape))
        return t

    ids = torch.randint(0, cfg.vocab_size, (1, tokens))
    decoder = (
        model.get_base_model().model
    )  # the decoder stack alone: the loss's own tensors are not the layers'
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        decoder(input_ids=ids, position_ids=torch.arange(tokens)[None])
    return kept


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--speed", nargs="*", default=[], help="train.speed keys, KEY=VALUE (compile=on etc.)")
    ns = p.parse_args()
    speed_cfg: dict = {"compile": "on", "fused_lora": "on", "adapter_dtype": "bf16"}
    for item in ns.speed:
        key, _, value = item.partition("=")
        speed_cfg[key] = float(value) if key == "activation_budget" else value
    kept = saved_storages(ns.shape, ns.layers, ns.tokens, speed_cfg)
    total = sum(nbytes for nbytes, _ in kept.values())
    print(f"{ns.shape}, {ns.layers} layers, {ns.tokens} tokens, speed {speed_cfg}")
    print(f"kept for backward: {total / ns.tokens / ns.layers:,.0f} bytes a token a layer")
    for nbytes, shapes in sorted(kept.values(), key=lambda v: -v[0])[: ns.top]:
        print(f"  {nbytes / ns.tokens:>9,.0f} bytes a token  {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
