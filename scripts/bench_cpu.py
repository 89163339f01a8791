"""CPU train-step benchmark for the colorist demo (issue 15): seconds per step, tokens/s and the fraction of the
CPU's fp32 matmul rate that a step reaches, for LoRA variants, through the `ftpipe` command.

    taskset -c 0,1 python scripts/bench_cpu.py --out DIR [--avx2] [--steps 30] [--variants all,last10,...]

The model is a random SmolLM2-135M shape (`tiny:llama` with its sizes and the SmolLM2 tokenizer): a step costs the
same as on the real weights. `--avx2` makes torch, MKL and oneDNN use AVX2 kernels only and trains in fp32, as on
a CPU without AVX512/bf16 (AMD EPYC, many laptops and CI runners). The reference rate is a large fp32 matmul
timed on the same cores under the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOLLM2 = {  # SmolLM2-135M's shape (config.json of HuggingFaceTB/SmolLM2-135M-Instruct)
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
}
VARIANTS = {  # name -> overrides on +recipe=colorist_lora
    "all_r64": [],
    "last10_r64": ["train.lora.last_layers=10"],
    "last10_r16": ["train.lora.last_layers=10", "train.lora.r=16", "train.lora.alpha=32"],
    "last6_r64": ["train.lora.last_layers=6"],
    "all_r16": ["train.lora.r=16", "train.lora.alpha=32"],
}
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def flops_per_token(last_layers: int | None, r: int, answer_fraction: float) -> float:
    """Training FLOPs per token: the forward through every layer, the input-gradient backward through the
    adapted layers only (the frozen ones below build no graph), the LoRA matmuls (forward + two backward), and
    the LM head on trained positions only (answer-only loss: forward and input gradient)."""
    h, i, n = SMOLLM2["hidden_size"], SMOLLM2["intermediate_size"], SMOLLM2["num_hidden_layers"]
    kv = h // SMOLLM2["num_attention_heads"] * SMOLLM2["num_key_value_heads"]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    per_layer = sum(a * b for a, b in linears)
    adapted = n if last_layers is None else last_layers
    head = 2 * SMOLLM2["vocab_size"] * h * answer_fraction
    forward = 2 * per_layer * n + head
    backward = 2 * per_layer * adapted + head
    lora = 3 * 2 * r * sum(a + b for a, b in linears) * adapted
    return forward + backward + lora


def matmul_gflops(env: dict[str, str]) -> float:
    code = (
        "import torch,time\n"
        "a=torch.randn(2048,2048);b=torch.randn(2048,2048)\n"
        "[a@b for _ in range(3)]\n"
        "t=time.perf_counter();n=20\n"
        "[a@b for _ in range(n)]\n"
        "print(2*2048**3*n/(time.perf_counter()-t)/1e9)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def run_variant(
    name: str, extra: list[str], steps: int, env: dict[str, str], cache: Path, fp32: bool
) -> dict:
    shape = [f"model.tiny.{k}={v}" for k, v in SMOLLM2.items() if k != "vocab_size"]
    args = [
        sys.executable, "-m", "ftpipe", "+recipe=colorist_lora", "model=tiny_llama", *shape,
        "stages=[train]", f"train.max_steps={steps}", "train.save_steps=100000", "train.sample_every=0",
        *(["train.precision=fp32"] if fp32 else []), *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(
        args, env={**env, "FTPIPE_CACHE": str(cache)}, capture_output=True, text=True, cwd=cache
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"variant": name, "error": (done.stdout + done.stderr)[-1500:]}
    run_json = max(cache.glob("outputs/*/*/run.json"), key=lambda p: p.stat().st_mtime)
    (train,) = [r for r in json.loads(run_json.read_text())["stages"] if r["name"] == "train"]
    return {"variant": name, "overrides": extra, "wall_seconds": round(wall, 1), **train}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--avx2", action="store_true", help="AVX2 kernels only, fp32 (a CPU without bf16)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    env = {**os.environ, **(AVX2_ENV if args.avx2 else {})}
    args.out.mkdir(parents=True, exist_ok=True)
    peak = matmul_gflops(env)
    cache = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    rows = []
    for name in args.variants.split(","):
        row = run_variant(name, VARIANTS[name], args.steps, env, cache, fp32=args.avx2)
        if "error" not in row:
            overrides = dict(o.split("=", 1) for o in row["overrides"])
            last = overrides.get("train.lora.last_layers")
            r = int(overrides.get("train.lora.r", 64))
            # colorist rows: ~8 of ~21 tokens a colour are trained (the hex digits and the end of turn)
            fpt = flops_per_token(int(last) if last else None, r, answer_fraction=8 / 21)
            seconds_per_step = row["train_seconds"] / row["train_steps"]
            row |= {
                "seconds_per_step": round(seconds_per_step, 3),
                "gflop_per_token": round(fpt / 1e9, 4),
                "achieved_gflops": round(fpt * row["train_tokens_per_second"] / 1e9, 1),
                "fraction_of_matmul_rate": round(fpt * row["train_tokens_per_second"] / 1e9 / peak, 3),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"avx2": args.avx2, "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))}
    summary |= {"matmul_gflops_fp32": round(peak, 1), "rows": rows}
    (args.out / f"bench_cpu{'_avx2' if args.avx2 else ''}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
