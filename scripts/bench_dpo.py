#!/usr/bin/env python3
"""DPO + LoRA speed: one run through the `ftpipe` command against TRL's DPOTrainer with PEFT, same data, same
batch (pairs per step), same LoRA, same model: a random-init Llama-3.2-1B shape (no hub access needed).

    python scripts/bench_dpo.py --out DIR                       # on a CUDA machine (bf16)
    python scripts/bench_dpo.py --out DIR --shape tiny --steps 6 --pairs 48   # a CPU smoke run (fp32)

Needs torch, transformers, peft, accelerate, and trl (`pip install 'ftpipe[bench]'` or the trl wheel). Writes into
DIR: the model folder, `pairs.jsonl` (XTuner's preference rows, OpenAI messages), ftpipe's run dir and cache, TRL's
output dir and `bench_dpo.json`, and prints tokens/s of both: the median over the steps after `--warmup`, tokens
being the real (non-padding) tokens of chosen and rejected sequences, prompt included, and the whole run's mean.
Both sides use the tokenizer's chat template (ftpipe: template=tokenizer) and no gradient checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LORA = dict(r=64, alpha=16, dropout=0.0)
WORDS = (
    "the a colour model answer question river light stone quiet bright warm cold green blue red small large "
    "slowly quickly because although tomorrow yesterday garden window music number letter simple careful"
).split()


def log(*a: Any) -> None:
    print(*a, flush=True)


def shape(name: str) -> dict[str, Any]:
    if name == "tiny":  # the test suite's tiny Llama: its shape lives in conf/model/tiny_llama.yaml
        from omegaconf import OmegaConf

        tiny = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "tiny_llama.yaml"))["tiny"]
        return {"model_type": "llama", **tiny}
    sys.path.insert(0, str(REPO / "scripts"))
    from bench import SHAPES  # the real Llama-3.2-1B dimensions, shared with scripts/bench.py

    return SHAPES[name]


def write_model(out: Path, shape_name: str) -> Path:
    """A random-init model of the shape, with ftpipe's SmolLM2 tokenizer (it has a chat template)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ftpipe.paths import ASSETS_DIR

    dest = out / f"model-{shape_name}"
    if (dest / "config.json").is_file():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "smollm2_tokenizer")
    dims = dict(shape(shape_name))
    arch = dims.pop("model_type")
    dims.update(
        vocab_size=max(dims.get("vocab_size", 0), len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    dtype = torch.float32 if shape_name == "tiny" else torch.bfloat16
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **dims), dtype=dtype)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def write_pairs(out: Path, n: int, prompt_words: int, answer_words: int, seed: int = 0) -> Path:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(k // 2, k)))

    path = out / "pairs.jsonl"
    with open(path, "w") as fh:
        for _ in range(n):
            row = {
                "prompt": [{"role": "user", "content": text(prompt_words)}],
                "chosen": [{"role": "assistant", "content": text(answer_words)}],
                "rejected": [{"role": "assistant", "content": text(answer_words)}],
            }
            fh.write(json.dumps(row) + "\n")
    return path


def median_after(values: list[float], warmup: int) -> float | None:
    kept = values[warmup:] or values
    return round(statistics.median(kept), 1) if kept else None


def run_ftpipe(args, model: Path, pairs: Path, cuda: bool) -> dict[str, Any]:
    run_dir = args.out / "ftpipe_run"
    overrides = [
        f"model.path={model}",
        "dataset=assistant_preference",  # a preference dataset group (the default, colorist, is char-level)
        f"dataset.path={pairs}",
        "dataset.format=preference",
        "dataset.eval_size=0",
        "dataset.name=null",
        "dataset.pack=false",  # one pair a row: micro_batch_size counts pairs, as TRL's batch does
        f"dataset.max_length={args.max_length}",
        "template=tokenizer",
        "train=lora",
        "train.objective=dpo",
        f"train.dpo.beta={args.beta}",
        f"train.lora.r={LORA['r']}",
        f"train.lora.alpha={LORA['alpha']}",
        "train.lora.target_modules=all-linear",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.batch}",
        "train.grad_accum=1",
        "train.logging_steps=1",
        f"train.save_steps={args.steps * 10}",
        f"train.precision={'bf16' if cuda else 'fp32'}",
        f"optimizer.lr={args.lr}",
        "optimizer.warmup_ratio=0",
        "optimizer.scheduler=constant",
        "stages=[train]",
        f"cache_dir={args.out / 'ftpipe_cache'}",
        f"hydra.run.dir={run_dir}",
    ]
    log("ftpipe:", " ".join(overrides))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ftpipe", *overrides], env=env, cwd=args.out)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"ftpipe exited with {proc.returncode}")
    rows = {r["name"]: r for r in json.loads((run_dir / "run.json").read_text())["stages"]}
    train = rows["train"]
    history = json.loads((Path(train["output"]) / "log_history.json").read_text())
    # each log row (logging_steps=1): tokens/s of that step, from ftpipe's own token count (input_ids, no padding)
    rates = [row["tokens_per_second"] for row in history if "tokens_per_second" in row]
    return {
        "side": "ftpipe",
        "tokens_per_second_median": median_after(rates, args.warmup),
        "tokens_per_second_run": train["train_tokens_per_second"],
        "tokens": train["train_tokens"],
        "train_seconds": train["train_seconds"],
        "peak_memory_gib": train["train_peak_memory_gib"],
        "loss_first": history[0].get("loss") if history else None,
        "loss_last": train["train_loss"],
        "wall_seconds": round(wall, 1),
    }


def run_trl(args, model_path: Path, pairs: Path, cuda: bool) -> dict[str, Any]:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa"
    )
    data = datasets.load_dataset("json", data_files=str(pairs), split="train")
    steps: list[tuple[float, int]] = []

    class Timed(DPOTrainer):
        """Counts the real tokens of each batch (TRL pads chosen and rejected to one width)."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            self._tokens = int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            steps.append((time.perf_counter() - self.t, trainer._tokens))

    config = DPOConfig(
        output_dir=str(args.out / "trl_out"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=args.beta,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=False,  # as ftpipe's default (train.speed.checkpointing=auto → none)
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=42,
    )
    peft = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Timed(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft,
        callbacks=[StepTimer()],
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    tokens = sum(n for _, n in steps)
    return {
        "side": "trl",
        "tokens_per_second_median": median_after([n / s for s, n in steps], args.warmup),
        "tokens_per_second_run": round(tokens / seconds, 1),
        "tokens": tokens,
        "train_seconds": round(seconds, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shape", default="llama-3.2-1b", help="llama-3.2-1b (GPU) or tiny (CPU smoke run)")
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median (compile, allocator)")
    p.add_argument("--batch", type=int, default=8, help="pairs per step, both sides")
    p.add_argument("--prompt-words", type=int, default=200)
    p.add_argument("--answer-words", type=int, default=150)
    p.add_argument("--max-length", type=int, default=2048, help="per pair for ftpipe, per sequence for TRL")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--sides", default="ftpipe,trl")
    args = p.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    model = write_model(args.out, args.shape)
    pairs = write_pairs(args.out, args.pairs, args.prompt_words, args.answer_words)
    results: dict[str, Any] = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "pairs_per_step": args.batch,
        "steps": args.steps,
        "lora": LORA,
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft")},
    }
    for side in args.sides.split(","):
        try:
            results[side] = (
                run_ftpipe(args, model, pairs, cuda)
                if side == "ftpipe"
                else run_trl(args, model, pairs, cuda)
            )
        except Exception as exc:  # report the other side even if one fails
            results[side] = {"side": side, "error": f"{type(exc).__name__}: {exc}"}
            log(f"{side} failed: {results[side]['error']}")
        if cuda:
            torch.cuda.empty_cache()
    try:
        import trl

        results["versions"]["trl"] = trl.__version__
    except ImportError:
        pass
    (args.out / "bench_dpo.json").write_text(json.dumps(results, indent=1))
    log(
        f"\nDPO + LoRA r{LORA['r']}, {args.shape}, {args.batch} pairs/step, {args.steps} steps on {results['device']}"
    )
    log(f"{'side':8} {'tok/s (median)':>15} {'tok/s (run)':>12} {'peak GiB':>9} {'loss first→last':>18}")
    for side in args.sides.split(","):
        r = results[side]
        if "error" in r:
            log(f"{side:8} error: {r['error']}")
            continue
        lf, ll = r["loss_first"], r["loss_last"]
        losses = f"{lf:.4f}→{ll:.4f}" if lf is not None and ll is not None else "?"
        log(
            f"{side:8} {r['tokens_per_second_median']!s:>15} {r['tokens_per_second_run']!s:>12} "
            f"{r['peak_memory_gib']!s:>9} {losses:>18}"
        )
    f, t = results.get("ftpipe", {}), results.get("trl", {})
    if f.get("tokens_per_second_median") and t.get("tokens_per_second_median"):
        log(
            f"ftpipe / TRL (median tokens/s): {f['tokens_per_second_median'] / t['tokens_per_second_median']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
