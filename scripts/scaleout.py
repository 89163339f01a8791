#!/usr/bin/env python3
"""Launchers through the `ftpipe` command a user runs: loss curves and tokens/s of each launcher against
`launcher=local`, a rank killed mid-run and resumed, and merged models compared (scale-out issue).

    python scripts/scaleout.py OUT_DIR [--shape llama-3.2-1b] [--cases lora_local,lora_zero2,...] [--steps 30]
        [--kill lora_zero2] [--deadline SECONDS]

A case may carry overrides of its own, `CASE@KEY=VALUE@...` (an A/B in the same call, each in its own cache),
as in scripts/bench_command.py.

Each case is one `python -m ftpipe` run on a random-init model of a real shape saved as a local folder (the
SmolLM2 tokenizer beside it) and a plain-text corpus packed into 2048-token rows, LoRA r64 on all linear layers
(or full fine-tuning), 4 rows per step. tokens/s is the median of the train stage's own logged rate after the
first two logs (compilation excluded), as `log_history.json` has it. `--shape tiny` runs the same on CPU.
Results: OUT_DIR/scaleout.json (rewritten after each case) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# case -> (method, launcher, stages): the stage list ends at merge where the merged model is compared
CASES: dict[str, tuple[str, str, str]] = {
    "lora_local": ("lora", "local", "merge"),
    "lora_torchrun": ("lora", "torchrun", "train"),
    "lora_zero2": ("lora", "deepspeed_zero2", "train"),
    "lora_zero3": ("lora", "deepspeed_zero3", "merge"),
    "lora_zero2_offload": ("lora", "deepspeed_zero2_offload", "train"),
    "full_local": ("full", "local", "merge"),
    "full_zero2": ("full", "deepspeed_zero2", "train"),
    "full_zero3": ("full", "deepspeed_zero3", "merge"),
    "full_zero2_offload": ("full", "deepspeed_zero2_offload", "train"),
}
WORDS = [f"w{i}" for i in range(3000)]


def case_spec(spec: str) -> tuple[str, list[str], str]:
    """`CASE@KEY=VALUE@...`: (the case, its own overrides, a folder name for its cache that Hydra's override
    grammar takes), so one call can run a case twice with different settings (an A/B in the same call)."""
    case, *own = spec.split("@")
    return case, own, re.sub(r"[^A-Za-z0-9._-]", "_", spec)


def corpus(path: Path, docs: int, seed: int = 0) -> Path:
    """Plain-text documents of 150-1500 random words: packing fills 2048-token rows with several of them."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(docs):
            fh.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(150, 1500)))}) + "\n")
    return path


def model_folder(shape: str, where: Path) -> str:
    """A random-init model of `shape` (scripts/bench.py's configs) with the SmolLM2 tokenizer, or `tiny:llama`."""
    if shape == "tiny":
        return "tiny:llama"
    import shutil

    import torch
    from bench import model_config  # scripts/bench.py: the real shapes, written out
    from transformers import AutoModelForCausalLM

    path = where / shape
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(model_config(shape), dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
        for item in (ROOT / "ftpipe" / "assets" / "smollm2_tokenizer").iterdir():
            shutil.copy2(item, path / item.name)
    return str(path)


def overrides(
    case: str, model: str, data: Path, out: Path, steps: int, shape: str, save_steps: int = 0
) -> list[str]:
    method, launcher, last = CASES[case]
    tiny = shape == "tiny"
    return [
        f"model.path={model}",
        "model=tiny_llama" if tiny else "model.gguf_file=null",
        f"dataset.path={data}",
        "dataset.format=pretrain",
        "dataset.eval_size=0",
        f"dataset.max_length={256 if tiny else 2048}",
        f"train.method={method}",
        "train.micro_batch_size=4",
        f"train.max_steps={steps}",
        "train.logging_steps=2" if tiny else "train.logging_steps=5",
        f"train.save_steps={save_steps or max(2, steps // 2)}",
        "train.lora.r=64",
        "train.lora.alpha=16",
        "train.lora.target_modules=all-linear",
        f"optimizer.lr={2e-4 if method == 'lora' else 2e-5}",
        "optimizer.scheduler=constant",
        "optimizer.warmup_ratio=0",
        f"launcher={launcher}",
        "launcher.nproc_per_node=1",
        f"stages=[{last}]",
        f"hydra.run.dir={out / 'runs' / case}-{time.time_ns()}",
    ]


DATA_STAGES = ("download-model", "download-data", "map", "pack")


def seeded_cache(out: Path, name: str) -> Path:
    """A fresh cache for one case holding the data stages' entries (hard links: entries never change), so every
    case trains on the same packed rows without re-tokenising and no case hits another's train entry."""
    import shutil

    cache = out / "cache" / name
    shutil.rmtree(cache, ignore_errors=True)
    for stage in DATA_STAGES:
        shutil.copytree(out / "cache" / "data" / stage, cache / stage, copy_function=os.link)
    return cache


def ftpipe(args: list[str], env: dict[str, str], log: Path, wait: bool = True, python_args: tuple = ()):
    fh = open(log, "a")
    proc = subprocess.Popen(
        [sys.executable, *python_args, "-m", "ftpipe", *args], env=env, stdout=fh, stderr=subprocess.STDOUT
    )
    if wait:
        proc.wait()
        fh.close()
    return proc


def newest_entry(cache: Path, stage: str) -> tuple[Path, dict[str, Any]] | None:
    """(folder, manifest) of the stage's newest committed entry in `cache`."""
    found = sorted((cache / stage).glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return (found[-1].parent, json.loads(found[-1].read_text())) if found else None


def ftpipe_env() -> dict[str, str]:
    """The environment for `python -m ftpipe` runs: this checkout's ftpipe first on the path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def result_of(cache: Path) -> dict[str, Any]:
    """The case's committed entries, read from its cache (so a failed later stage still leaves its train)."""
    train_dir, manifest = newest_entry(cache, "train")  # type: ignore[misc]
    train = manifest["metrics"]
    history = json.loads((train_dir / "log_history.json").read_text())
    logs = [r for r in history if "loss" in r]
    rates = [r["tokens_per_second"] for r in logs[2:] if r.get("tokens_per_second")]
    merged = newest_entry(cache, "merge")
    return {
        "losses": [r["loss"] for r in logs],
        "tokens_per_second": statistics.median(rates) if rates else None,
        "peak_memory_gib": max((r.get("peak_memory_gib") or 0) for r in logs) if logs else None,
        "train_seconds": train.get("train_seconds"),
        "resumed_from_step": train.get("resumed_from_step"),
        "merged": str(merged[0]) if merged else None,
        "merge": {k: v for k, v in merged[1]["metrics"].items()} if merged else None,
    }


def worker_pid() -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"ftpipe.training.worker" in cmdline and b"torch.distributed.run" not in cmdline:
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def kill_and_resume(case: str, args: list[str], env: dict, out: Path, steps: int) -> dict[str, Any]:
    """SIGKILL the (only) rank after its first checkpoint; the stage must fail naming it; the rerun resumes."""
    log = out / f"{case}_kill.log"
    cache = Path(next(a for a in args if a.startswith("cache_dir=")).split("=", 1)[1])
    proc = ftpipe(args, env, log, wait=False)
    first = max(2, steps // 2)
    while proc.poll() is None and not list(
        cache.glob(f"train/*.tmp/checkpoints/checkpoint-{first}/trainer_state.json")
    ):
        time.sleep(0.2)
    pid = worker_pid()
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    text = log.read_text(errors="replace")
    message = next((line for line in text.splitlines() if "failed under launcher=" in line), None)
    ftpipe(args, env, log)
    return {"killed_rc": proc.returncode, "message": message, "rerun": result_of(cache)}


def merged_difference(a: str, b: str) -> float:
    """Largest |weight difference| between two merged model folders (safetensors, tensor by tensor)."""
    from safetensors import safe_open

    worst = 0.0
    files_a = sorted(Path(a, "model").glob("*.safetensors"))
    files_b = {p.name: p for p in Path(b, "model").glob("*.safetensors")}
    for fa in files_a:
        with safe_open(str(fa), "pt") as ha, safe_open(str(files_b[fa.name]), "pt") as hb:
            for name in ha.keys():
                worst = max(
                    worst, (ha.get_tensor(name).float() - hb.get_tensor(name).float()).abs().max().item()
                )
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", default="llama-3.2-1b", help="a scripts/bench.py shape, or tiny (CPU)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-steps", type=int, default=0, help="default: half of --steps")
    parser.add_argument("--extra", default="", help="space-separated overrides added to every case")
    parser.add_argument("--kill", default="", help="comma list of cases to also kill mid-run and resume")
    parser.add_argument("--deadline", type=float, default=0, help="seconds: start no new case after this")
    ns = parser.parse_args()
    started = time.time()
    out = ns.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = ftpipe_env()
    env.setdefault("TORCH_EXTENSIONS_DIR", str(out / "torch_extensions"))
    model = model_folder(ns.shape, Path(os.environ.get("TMPDIR", "/tmp")))
    data = corpus(out / "corpus.jsonl", 400 if ns.shape == "tiny" else 600)
    results: dict[str, Any] = {"shape": ns.shape, "steps": ns.steps, "cases": {}}
    report = out / "scaleout.json"
    first = case_spec(ns.cases.split(",")[0])[0]
    ftpipe(
        [
            *overrides(first, model, data, out, ns.steps, ns.shape),
            "stages=[pack]",
            f"cache_dir={out / 'cache' / 'data'}",
        ],
        env,
        out / "data.log",
    )
    for spec in ns.cases.split(","):
        if ns.deadline and time.time() - started > ns.deadline:
            results["cases"][spec] = {"skipped": "deadline"}
            continue
        case, own, name = case_spec(spec)
        cache = seeded_cache(out, name)
        base = [
            *overrides(case, model, data, out, ns.steps, ns.shape, ns.save_steps),
            *ns.extra.split(),
            *own,
        ]
        t0 = time.time()
        rc = ftpipe([*base, f"cache_dir={cache}"], env, out / f"{name}.log").returncode
        try:
            results["cases"][spec] = {
                **result_of(cache),
                "rc": rc,
                "wall_seconds": round(time.time() - t0, 1),
            }
        except (TypeError, ValueError, FileNotFoundError, KeyError) as exc:
            tail = (out / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
            results["cases"][spec] = {"error": f"{type(exc).__name__}: {exc}", "rc": rc, "log_tail": tail}
        if spec in ns.kill.split(","):
            seeded = seeded_cache(out, f"{name}_kill")
            results["cases"][spec]["kill"] = kill_and_resume(
                name, [*base, f"cache_dir={seeded}"], env, out, ns.steps
            )
        report.write_text(json.dumps(results, indent=1))
    compare(results)
    report.write_text(json.dumps(results, indent=1))
    return 0


def compare(results: dict[str, Any]) -> None:
    """Each case against `<method>_local`: loss curve gap, tokens/s ratio, merged model difference."""
    cases = results["cases"]
    print(f"{'case':<22}{'tok/s':>10}{'vs local':>10}{'peak GiB':>10}{'max loss gap':>14}")
    for name, res in cases.items():
        if "losses" not in res:
            print(f"{name:<22} {res.get('error') or res.get('skipped')}")
            continue
        ref = cases.get(f"{name.split('_')[0]}_local", {})
        gap = max(
            (abs(a - b) / abs(b) for a, b in zip(res["losses"], ref.get("losses", []), strict=False)),
            default=None,
        )
        ratio = (
            res["tokens_per_second"] / ref["tokens_per_second"]
            if ref.get("tokens_per_second") and res["tokens_per_second"]
            else None
        )
        res["loss_max_rel_gap_vs_local"], res["tokens_per_second_vs_local"] = gap, ratio
        if "kill" in res and "losses" in res["kill"]["rerun"]:
            resumed = res["kill"]["rerun"]["losses"]
            res["kill"]["loss_max_rel_gap_vs_uninterrupted"] = max(
                abs(a - b) / abs(b) for a, b in zip(resumed, res["losses"], strict=False)
            )
        if res.get("merged") and ref.get("merged") and name != f"{name.split('_')[0]}_local":
            res["merged_max_abs_weight_diff_vs_local"] = merged_difference(res["merged"], ref["merged"])
        fmt = lambda v, f: format(v, f) if isinstance(v, int | float) else "-"  # noqa: E731
        print(
            f"{name:<22}{fmt(res['tokens_per_second'], ',.0f'):>10}{fmt(ratio, '.3f'):>10}"
            f"{fmt(res['peak_memory_gib'], '.2f'):>10}{fmt(gap, '.2e'):>14}"
        )


if __name__ == "__main__":
    sys.exit(main())
