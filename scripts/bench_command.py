#!/usr/bin/env python3
"""The speed a user gets: the `ftpipe` command itself, timed from its own logs, beside the bench's harness on
the same rows (issue 18).

    python scripts/bench_command.py OUT [--cases lora,lora_offload,qlora,long128k,lora@KEY=VALUE] [--steps 60]
        [--warm lora [--warm-cprofile]] [--harness lora,qlora] [--probe llama-3.1-8b:qlora:262144[:START]] [--deadline SECONDS]

Each case is one `python -m ftpipe ... stages=[train]` run on a random-init model of a real shape saved as a
local folder (scripts/scaleout.py: the SmolLM2 tokenizer beside it) and a plain-text corpus packed into rows of
the case's length; LoRA r64 / alpha 16 on all linear layers, bf16, constant lr. Figures, all from the train
stage's entry: `train_tokens_per_second_steady` (median of the logged rates after the first log),
`train_first_step_seconds` (train stage start to the first optimizer step), peak memory.
- `--warm CASE`: the same command again with another learning rate, so the train stage misses its cache
  while the compiled artefacts (under the cache's shared/build) are found: the warm start. `--warm-cprofile`
  runs it under cProfile (OUT/CASE_warm_cprofile.txt: where the seconds before the first step go; the
  whole profile in OUT/CASE_warm_cprofile.txt.prof).
- `--harness CASE,...`: `scripts/bench.py --sides ftpipe,hf --rows-from <the case's packed rows>`, so the
  harness and HF Trainer + PEFT train on exactly the command's rows, in the same call.
- `CASE@KEY=VALUE@...`: that case with overrides of its own (an A/B in the same call), in a cache of its own;
  its harness run takes the same speed levers and optimizer (e.g. `lora_offload@optimizer=adamw_8bit`).
- `--probe SHAPE:METHOD:MAX[:START]`: `ftpipe probe` on that shape (the longest single sequence that trains),
  doubling from START (32768) tokens.
Results: OUT/command.json (rewritten after each piece) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from scaleout import WORDS, case_spec, ftpipe, ftpipe_env, model_folder, newest_entry  # noqa: E402
from scaleout import corpus as short_documents  # noqa: E402

# case -> shape, method, packed rows per step, checkpointing, row length
CASES: dict[str, tuple[str, str, int, str, int]] = {
    "lora": ("llama-3.2-1b", "lora", 4, "none", 2048),
    "lora_offload": ("llama-3.2-1b", "lora", 4, "offload", 2048),
    "qlora": ("llama-3.2-1b", "qlora", 4, "offload", 2048),
    "qwen7b_qlora": ("qwen2.5-7b", "qlora", 2, "offload", 2048),
    "long32k": ("llama-3.2-1b", "lora", 1, "auto", 32768),
    "long128k": ("llama-3.2-1b", "lora", 1, "auto", 131072),
    "tiny": ("tiny", "lora", 4, "none", 256),  # a dry run of this script on the CPU
}
# the bench.py case with the same shape, method, rows and checkpointing
HARNESS = {
    "lora": "llama1b_lora",
    "lora_offload": "llama1b_lora_ckpt",
    "qlora": "llama1b_qlora",
    "qwen7b_qlora": "qwen7b_qlora",
}
TOKENS_PER_WORD = 4.6  # the SmolLM2 tokenizer on these words ("w1234" -> 4-5 tokens)


def corpus(path: Path, row_len: int, rows: int, seed: int = 0) -> Path:
    """Rows of 2048: documents of 150-1500 words (700-7000 tokens, the longer ones split over rows). Long rows:
    each document a little longer than a row, so every row starts a document that fills it."""
    if row_len <= 2048:  # (the tiny case: many rows of 256)
        return short_documents(path, rows, seed)
    rng = random.Random(seed)
    words = int(row_len / TOKENS_PER_WORD * 1.05)
    with open(path, "w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=words))}) + "\n")
    return path


def overrides(case: str, model: str, data: Path, steps: int, cache: Path) -> list[str]:
    shape, method, rows, ckpt, row_len = CASES[case]
    long_rows = row_len > 2048
    return [
        *(["model=tiny_llama"] if shape == "tiny" else [f"model.path={model}", "model.gguf_file=null"]),
        f"dataset.path={data}",
        "dataset.format=pretrain",
        "dataset.eval_size=0",
        f"dataset.max_length={row_len}",
        "dataset.truncation=split",
        f"train.method={method}",
        f"train.micro_batch_size={rows}",
        f"train.max_steps={steps}",
        f"train.logging_steps={1 if long_rows else 5}",
        f"train.save_steps={10**6}",
        "train.lora.r=64",
        "train.lora.alpha=16",
        "train.lora.target_modules=all-linear",
        f"train.speed.checkpointing={ckpt}",
        "optimizer.lr=2e-4",
        "optimizer.scheduler=constant",
        "optimizer.warmup_ratio=0",
        "stages=[train]",
        f"cache_dir={cache}",
        f"hydra.run.dir={cache}/runs/{time.time_ns()}",
    ]


def stray_compile_workers() -> int:
    """How many of inductor's compile workers are running (`torch._inductor.compile_worker`)."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            count += b"compile_worker" in cmdline.read_bytes()
        except OSError:  # the process ended meanwhile
            pass
    return count


def wait_for_quiet_host(limit: float = 30.0) -> float:
    """Seconds waited until the compile workers an earlier run started have exited: they outlive their run by
    seconds (each still importing torch) and would compete with the next run's own imports, as they do not
    when a user starts the next run."""
    began = time.time()
    while stray_compile_workers() and time.time() - began < limit:
        time.sleep(0.5)
    return round(time.time() - began, 1)


def run_ftpipe(
    args: list[str], env: dict[str, str], log: Path, cprofile: Path | None = None
) -> tuple[int, float]:
    """(exit code, wall seconds) of one `python -m ftpipe` run, its output appended to `log`, started once the
    host is quiet (`wait_for_quiet_host`); with `cprofile` the run is under cProfile and its 60 costliest calls
    (cumulative) are written there, the whole profile beside it (`cprofile`.prof, for `python -m pstats`)."""
    waited = wait_for_quiet_host()
    if waited:
        with open(log, "a") as fh:
            fh.write(f"[bench_command] waited {waited} s for an earlier run's compile workers to exit\n")
    began = time.time()
    python_args = ("-m", "cProfile", "-o", f"{cprofile}.prof") if cprofile else ()
    rc = ftpipe(args, env, log, python_args=python_args).returncode
    if cprofile and Path(f"{cprofile}.prof").is_file():
        import io
        import pstats

        text = io.StringIO()
        pstats.Stats(f"{cprofile}.prof", stream=text).sort_stats("cumulative").print_stats(60)
        cprofile.write_text(text.getvalue())
    return rc, round(time.time() - began, 1)


def mean_rate(history: list[dict[str, Any]]) -> float | None:
    """Tokens over seconds across the log windows after the first (each window's seconds = its tokens / its
    rate), where the median of the windows is what the train entry reports."""
    logs = [r for r in history if "tokens_per_second" in r and "num_input_tokens_seen" in r]
    tokens = seconds = 0.0
    for before, row in zip(logs, logs[1:], strict=False):
        delta = row["num_input_tokens_seen"] - before["num_input_tokens_seen"]
        tokens, seconds = tokens + delta, seconds + delta / row["tokens_per_second"]
    return round(tokens / seconds, 1) if seconds else None


def train_result(cache: Path) -> dict[str, Any]:
    entry = newest_entry(cache, "train")
    if entry is None:
        return {"error": "no train entry"}
    path, manifest = entry
    metrics = manifest["metrics"]
    history = json.loads((path / "log_history.json").read_text())
    keys = ("train_tokens_per_second_steady", "train_tokens_per_second", "train_first_step_seconds")
    return {
        **{
            k: metrics.get(k)
            for k in (
                *keys,
                "train_peak_memory_gib",
                "train_peak_memory_gib_steady",
                "train_seconds",
                "train_steps",
            )
        },
        # the harness's statistic (tokens over time across the steps after warm-up) from the command's logs
        "mean_rate_after_first_log": mean_rate(history),
        "rates": [r["tokens_per_second"] for r in history if "tokens_per_second" in r],
        "losses": [r["loss"] for r in history if "loss" in r],
        "entry": str(path),
    }


def harness_variant(own: list[str]) -> list[str]:
    """A case's own overrides as bench.py's `--variants` (the speed levers and the optimizer, which the
    harness builds as the train stage does); profiling keys stay with the command."""
    keys = []
    for item in own:
        key, _, value = item.partition("=")
        if key.startswith("train.speed."):
            keys.append(f"{key.removeprefix('train.speed.')}={value}")
        elif key == "optimizer":
            keys.append(f"optimizer.name={value}")
        elif key.startswith("optimizer."):
            keys.append(item)
    return ["--variants", "own:" + "+".join(keys)] if keys else []


def pack_dir(cache: Path) -> str | None:
    entry = newest_entry(cache, "pack")
    return str(entry[0] / "dataset") if entry else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--cases", default="lora,lora_offload,qlora")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--long-steps", type=int, default=4)
    p.add_argument("--warm", default="", help="comma list of cases to run a second time (warm start)")
    p.add_argument("--warm-cprofile", action="store_true", help="run the warm start under cProfile")
    p.add_argument("--harness", default="", help="comma list of cases to also run through scripts/bench.py")
    p.add_argument("--harness-args", default="--warmup 5 --steps 30 --guard=", help="extra bench.py args")
    p.add_argument("--probe", action="append", default=[], help="SHAPE:METHOD:MAX_TOKENS for ftpipe probe")
    p.add_argument("--extra", default="", help="space-separated overrides added to every case")
    p.add_argument("--deadline", type=float, default=0, help="seconds: start nothing new after this")
    ns = p.parse_args()
    started = time.time()
    out = ns.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = ftpipe_env()
    results: dict[str, Any] = {"argv": sys.argv[1:], "cases": {}, "harness": {}, "probe": {}}
    report = out / "command.json"
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))

    def late() -> bool:
        return bool(ns.deadline) and time.time() - started > ns.deadline

    for spec in filter(None, ns.cases.split(",")):
        if late():
            results["cases"][spec] = {"skipped": "deadline"}
            continue
        case, own, name = case_spec(spec)
        shape, _, rows, _, row_len = CASES[case]
        model = model_folder(shape, tmp)
        steps = ns.long_steps if row_len > 2048 else ns.steps
        data = corpus(out / f"corpus_{row_len}.jsonl", row_len, max(8, steps * rows // 2 + 8))
        cache = out / "cache" / name
        args = [*overrides(case, model, data, steps, cache), *ns.extra.split(), *own]
        rc, wall = run_ftpipe(args, env, out / f"{name}.log")
        res = {"rc": rc, "wall_seconds": wall, **train_result(cache)}
        if spec in ns.warm.split(","):
            cprofile = out / f"{name}_warm_cprofile.txt" if ns.warm_cprofile else None
            rc2, wall2 = run_ftpipe([*args, "optimizer.lr=1e-4"], env, out / f"{name}_warm.log", cprofile)
            res["warm"] = {"rc": rc2, "wall_seconds": wall2, **train_result(cache)}
        if spec in ns.harness.split(",") and (rows_dir := pack_dir(cache)):
            harness_json = out / f"harness_{name}.json"
            cmd = [
                sys.executable,
                str(ROOT / "scripts" / "bench.py"),
                "--cases",
                HARNESS[case],
                "--rows-from",
                rows_dir,
                "--json",
                str(harness_json),
                *ns.harness_args.split(),
                *harness_variant(own),
            ]
            with open(out / f"harness_{name}.log", "w") as fh:
                subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
            if harness_json.is_file():
                runs = json.loads(harness_json.read_text()).get("runs", [])
                results["harness"][spec] = {
                    r["side"]: {k: r.get(k) for k in ("tok_s", "peak_gib", "step_ms", "error")} for r in runs
                }
        results["cases"][spec] = res
        report.write_text(json.dumps(results, indent=1))
        print(
            f"{spec}: {json.dumps({k: v for k, v in res.items() if k not in ('rates', 'losses')})}",
            flush=True,
        )
    for spec in ns.probe:
        if late():
            results["probe"][spec] = {"skipped": "deadline"}
            continue
        shape, method, limit, *start = spec.split(":")
        model = model_folder(shape, tmp)
        attempts = out / f"probe_{shape}_{method}.json"
        args = [
            "probe",
            f"model.path={model}",
            "model.gguf_file=null",
            f"train.method={method}",
            "train.lora.r=64",
            "train.lora.alpha=16",
            "train.lora.target_modules=all-linear",
            f"cache_dir={out / 'cache' / 'probe'}",
            "--start",
            start[0] if start else "32768",
            "--max-tokens",
            limit,
            "--resolution",
            "16384",
            "--json",
            str(attempts),
        ]
        rc, wall = run_ftpipe(args, env, out / f"probe_{shape}_{method}.log")
        results["probe"][spec] = {
            "rc": rc,
            "wall_seconds": wall,
            "attempts": json.loads(attempts.read_text()) if attempts.is_file() else None,
        }
        report.write_text(json.dumps(results, indent=1))
        print(f"probe {spec}: {json.dumps(results['probe'][spec])}", flush=True)
    report.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
