"""Data benchmark (issue 3): map + pack throughput on alpaca rows, token accounting, and a fully cached rerun.

    python /work/shared/bench/make_rows.py rows.jsonl 50000
    python scripts/bench_data.py rows.jsonl [--num-proc 2] [--baseline]

Template internlm2_chat, SmolLM2 tokenizer (model=tiny_llama carries it), max_length 2048, packing on, in a fresh
cache. The download stage (copying the file, building the tiny model) is timed apart: it is not data processing.
`--baseline` also times the tokenizer's own batched call on the same formatted texts, for reference.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from ftpipe import engine, stages
from ftpipe.cache import Cache
from ftpipe.config import compose, validate

DATA_STAGES = ["download", "map", "pack"]  # what this measures: never train on the benchmark rows


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the num_proc workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(cfg: dict, cache: Cache) -> tuple[dict[str, dict], float]:
    started = time.perf_counter()
    rows = engine.run(stages.plan(cfg, cache), cache)
    return {r["name"]: r for r in rows}, time.perf_counter() - started


def baseline(cfg: dict, model_dir: Path, data_dir: Path) -> tuple[int, float, float]:
    """The tokenizer's own batched call over the whole formatted texts (what map does, minus everything else)."""
    from transformers import AutoTokenizer

    from ftpipe.data.formats import load_conversations
    from ftpipe.data.templates import generation_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    train, _, _ = load_conversations(data_dir, cfg["dataset"])
    template = cfg["template"]
    texts = [
        generation_prompt(template, [], c[0]["input"], c[0].get("system"))
        + c[0]["output"]
        + template["suffix"]
        for c in train
    ]
    started, cpu = time.perf_counter(), cpu_seconds()
    n = 0
    for i in range(0, len(texts), 1000):
        n += sum(len(x) for x in tok(texts[i : i + 1000], add_special_tokens=False)["input_ids"])
    return n, time.perf_counter() - started, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("rows", type=Path, help="alpaca JSONL from make_rows.py")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument(
        "--baseline", action="store_true", help="also time the tokenizer's batched call alone"
    )
    ns = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import datasets

    datasets.disable_progress_bars()

    cache_dir = ns.cache_dir or Path(tempfile.mkdtemp(prefix="ftpipe-bench-"))
    cfg = validate(
        compose(
            [
                "model=tiny_llama",
                "template=internlm2_chat",
                "dataset=alpaca",
                f"dataset.path={ns.rows.resolve()}",
                "dataset.format=alpaca",
                f"dataset.max_length={ns.max_length}",
                "dataset.pack=true",
                f"dataset.num_proc={ns.num_proc}",
                f"cache_dir={cache_dir}",
                f"stages=[{','.join(DATA_STAGES)}]",
            ]
        )
    )
    cache = Cache(cache_dir)
    downloaded, download_s = run({**cfg, "stages": ["download"]}, cache)
    cpu_before = cpu_seconds()
    cold, _ = run(cfg, cache)
    cold_cpu = cpu_seconds() - cpu_before
    m, p = cold["map"], cold["pack"]
    assert not m["hit"] and not p["hit"], f"not a cold run: reuse of {cache_dir}"
    cold_s = m["seconds"] + p["seconds"]
    warm, warm_s = run(cfg, cache)
    assert all(r["hit"] for r in warm.values())
    assert set(cold) == {"download-model", "download-data", "map", "pack"}, (
        f"ran more than the data stages: {cold}"
    )

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine        {os.cpu_count()} CPUs, load average {load} (other jobs share these cores)")
    print(f"rows file      {ns.rows} ({downloaded['download-data']['rows']} rows), cache {cache_dir}")
    print(
        f"config         template internlm2_chat, SmolLM2 tokenizer, max_length {ns.max_length}, packing on,"
    )
    print(f"               num_proc {ns.num_proc}")
    print()
    print(f"{'step':<28}{'seconds':>10}{'tokens':>14}{'tokens/s':>14}")
    print(f"{'download (not data work)':<28}{download_s:>10.2f}")
    print(f"{'map (cold)':<28}{m['seconds']:>10.2f}{m['tokens']:>14,}{m['tokens'] / m['seconds']:>14,.0f}")
    print(
        f"{'pack (cold)':<28}{p['seconds']:>10.2f}{p['tokens_out']:>14,}{p['tokens_in'] / p['seconds']:>14,.0f}"
    )
    print(f"{'map + pack (cold)':<28}{cold_s:>10.2f}{m['tokens']:>14,}{m['tokens'] / cold_s:>14,.0f}")
    print(f"{'all stages, fully cached':<28}{warm_s:>10.3f}")
    print(
        f"{'map + pack CPU time':<28}{cold_cpu:>10.2f}{'':>14}{m['tokens'] / cold_cpu:>14,.0f} per CPU-second"
    )
    if ns.baseline:
        n, s, cpu = baseline(
            cfg,
            Path(downloaded["download-model"]["output"]) / "model",
            Path(downloaded["download-data"]["output"]) / "data",
        )
        print(f"{'tokenizer batched call only':<28}{s:>10.2f}{n:>14,}{n / s:>14,.0f}")
        print(f"{'tokenizer call CPU time':<28}{cpu:>10.2f}{'':>14}{n / cpu:>14,.0f} per CPU-second")
    print()
    lost = p["tokens_in"] - p["tokens_out"] - p["tokens_truncated"] - p["tokens_dropped_no_loss"]
    print(
        f"tokens in {p['tokens_in']:,} = out {p['tokens_out']:,} + truncated {p['tokens_truncated']:,}"
        f" + dropped (no loss) {p['tokens_dropped_no_loss']:,}; unaccounted {lost}"
    )
    print(f"packed rows {p['rows']:,}, documents {p['documents']:,}, fill ratio {p['fill_ratio']:.4f}")
    sys.exit(0 if lost == 0 else 1)


if __name__ == "__main__":
    main()
