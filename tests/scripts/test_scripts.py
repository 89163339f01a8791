"""Every script in scripts/ runs on a tiny input, so a change that breaks one fails here rather than unseen."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={
            **os.environ,
            "FTPIPE_CACHE": str(tmp_path / "cache"),
            # shell scripts call `python`: the interpreter running these tests
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            **env,
        },
        timeout=600,
    )


def test_bench_data_measures_the_data_stages_only_and_accounts_for_every_token(tmp_path):
    rows = tmp_path / "rows.jsonl"
    with open(rows, "w") as fh:
        for i in range(300):
            fh.write(
                json.dumps({"instruction": f"say {i}", "input": "", "output": f"number {i} " * (i % 7 + 1)})
            )
            fh.write("\n")
    done = _run(
        [
            sys.executable,
            str(SCRIPTS / "bench_data.py"),
            str(rows),
            "--num-proc",
            "1",
            "--baseline",
            "--cache-dir",
            str(tmp_path / "bench-cache"),
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(300 rows)" in done.stdout and "unaccounted 0" in done.stdout
    assert "tokenizer batched call only" in done.stdout
    assert not (tmp_path / "bench-cache" / "train").exists()  # the data benchmark never trains


def test_make_colorist_regenerates_the_packaged_rows(tmp_path):
    out = tmp_path / "colorist.jsonl"
    done = _run([sys.executable, str(SCRIPTS / "make_colorist.py"), str(out)], tmp_path)
    assert done.returncode == 0, done.stderr
    packaged = Path(__file__).resolve().parents[2] / "ftpipe" / "data" / "embedded" / "colorist.jsonl"
    assert out.read_text() == packaged.read_text()


def test_colorist_grid_runs_a_sweep_and_copies_its_summary(tmp_path):
    tiny = "model=tiny_llama stages=[train] train.max_steps=1 train.save_steps=1"
    done = _run(
        ["bash", str(SCRIPTS / "colorist_grid.sh"), str(tmp_path / "grid"), "lora_lr"],
        tmp_path,
        GRID_EXTRA=tiny,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (tmp_path / "grid" / "lora_lr.md").read_text()
    assert summary.count("optimizer.lr=") >= 3, summary


def test_scaleout_runs_its_cases_through_ftpipe_and_reports_each(tmp_path):
    done = _run(
        [sys.executable, str(SCRIPTS / "scaleout.py"), str(tmp_path / "so"), "--shape", "tiny",
         "--cases", "lora_local", "--steps", "4", "--save-steps", "100"],
        tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (case,) = json.loads((tmp_path / "so" / "scaleout.json").read_text())["cases"].values()
    assert case["rc"] == 0 and len(case["losses"]) == 2 and case["merged"]
    assert case["loss_max_rel_gap_vs_local"] == 0.0


def test_bench_builds_every_case_through_ftpipes_own_config_and_training_arguments(tmp_path, monkeypatch):
    """scripts/bench.py times on a GPU only; here its glue to ftpipe (config slice, levers, Trainer arguments)
    runs for every case, so a renamed key or hook breaks this test instead of the next GPU call."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench

    from ftpipe.training import speed
    from ftpipe.training.fit import training_arguments

    for shape in bench.SHAPES:
        assert bench.model_config(shape).num_hidden_layers > 0
    for name, case in bench.CASES.items():
        cfg = bench.ftpipe_cfg(case, {})
        levers = speed.resolve(cfg["train"], "cuda")
        args = training_arguments(cfg, str(tmp_path / name), levers, "fp32", bench.ROW)  # bf16 needs the GPU
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps == case["batch"], name


def test_bench_command_cases_compose_into_valid_configs(tmp_path, monkeypatch):
    """scripts/bench_command.py runs the `ftpipe` command on the GPU machine; here each case's overrides go
    through compose + validate, so a renamed config key fails this test instead of the next GPU call."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_command

    from ftpipe.config import compose, validate

    data = bench_command.corpus(tmp_path / "corpus.jsonl", 131072, 2)
    words = [len(json.loads(line)["text"].split()) for line in data.read_text().splitlines()]
    assert all(w * bench_command.TOKENS_PER_WORD > 131072 for w in words)  # each document fills a long row
    for case in bench_command.CASES:
        overrides = bench_command.overrides(case, "some/model", data, 10, tmp_path / "cache")
        resolved = validate(compose([o for o in overrides if not o.startswith("hydra.")]))
        assert resolved["train"]["max_steps"] == 10 and resolved["stages"] == ["train"], case


def test_bench_reads_the_commands_packed_rows(tmp_path, monkeypatch):
    """bench.py --rows-from: the pack entry's rows, with each row's documents found from its position_ids."""
    import train_helpers as h

    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench

    pack_dir = h.packed_dataset_dir(tmp_path, h.tiny_model_dir(tmp_path))
    rows = bench.packed_rows(str(pack_dir / "dataset"), 3)
    for row in rows:
        assert sum(row["doc_lengths"]) == len(row["input_ids"]) == len(row["position_ids"])
        starts = (row["position_ids"] == 0).nonzero().squeeze(-1).tolist()
        assert len(starts) == len(row["doc_lengths"])
    assert bench.Rows(rows)[0]["input_ids"].dtype.kind == "i"  # numpy, as the train stage's dataset


def test_bench_pads_the_commands_shorter_rows_for_hf_with_nothing_trained_on_the_padding(monkeypatch):
    """A pack stage's rows can be shorter than the row length; HF's side stacks them padded."""
    import numpy as np

    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench

    long, short = np.arange(1, 6), np.arange(1, 4)
    batch = bench.padded_collator(
        [
            {"input_ids": long, "labels": long, "position_ids": np.arange(5)},
            {"input_ids": short, "labels": short, "position_ids": np.arange(3)},
        ]
    )
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, 5)
    assert batch["labels"][1].tolist() == [1, 2, 3, -100, -100]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 0, 1]  # the padding is a document of its own


def test_a_case_spec_carries_its_own_overrides_and_cache_folder(monkeypatch):
    """scaleout.py and bench_command.py spell an A/B the same way: CASE@KEY=VALUE@..., each in its own cache."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    from scaleout import case_spec

    assert case_spec("lora_zero2") == ("lora_zero2", [], "lora_zero2")
    case, own, folder = case_spec("lora_zero2@train.speed.compile=off@optimizer.lr=1e-4")
    assert (case, own) == ("lora_zero2", ["train.speed.compile=off", "optimizer.lr=1e-4"])
    assert folder == "lora_zero2_train.speed.compile_off_optimizer.lr_1e-4"  # no @ or = in cache_dir=...


def test_the_harness_of_a_case_with_its_own_overrides_runs_the_same_levers_and_optimizer(monkeypatch):
    """bench_command.py --harness CASE@...: bench.py gets the case's speed levers and optimizer (not its
    profiling keys), and builds its train config with them."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench
    import bench_command

    own = ["train.speed.fused_swiglu=on", "optimizer=adamw_8bit", "train.profile.memory=true"]
    flag, spec = bench_command.harness_variant(own)
    assert flag == "--variants" and spec == "own:fused_swiglu=on+optimizer.name=adamw_8bit"
    assert bench_command.harness_variant(["train.profile.host_ops=false"]) == []
    ((_, overrides),) = bench.parse_variants(spec)
    cfg = bench.ftpipe_cfg(bench.CASES["llama1b_lora_ckpt"], overrides)
    assert cfg["train"]["speed"]["fused_swiglu"] == "on" and cfg["optimizer"]["name"] == "adamw_8bit"
    assert cfg["train"]["speed"]["checkpointing"] == "offload" and cfg["optimizer"]["lr"] == 2e-4


def test_trace_gaps_tells_a_gap_the_host_caused_from_one_it_did_not(tmp_path):
    # (kernel, start us, duration us, when the host launched it) on the compute stream
    compute = [
        # step 0: the matmul is launched 300 us after the gather ends: a 400 us gap, host-bound
        ("vectorized_gather_kernel", 0, 100, 0),
        ("mm", 500, 100, 400),
        ("liger_cross_entropy_kernel", 600, 50, 50),
        # backward: launched long before, it waits 200 us (on a copy, say)
        ("mm_bwd", 850, 100, 60),
        # step 1: no gap at all
        ("vectorized_gather_kernel", 950, 100, 70),
        ("liger_cross_entropy_kernel", 1050, 50, 80),
    ]
    events = []
    for corr, (name, ts, dur, at) in enumerate(compute):
        events.append(
            {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": 7, "args": {"correlation": corr}}
        )
        events.append(
            {
                "cat": "cuda_runtime",
                "name": "cudaLaunchKernel",
                "ts": at,
                "dur": 5,
                "tid": 1,
                "args": {"correlation": corr},
            }
        )
    # a side stream's copy does not fill the compute stream's gaps
    events.append(
        {"cat": "kernel", "name": "copy", "ts": 100, "dur": 900, "tid": 13, "args": {"correlation": 99}}
    )
    trace = tmp_path / "trace.json.gz"
    with gzip.open(trace, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    done = _run([sys.executable, str(SCRIPTS / "trace_gaps.py"), str(trace)], tmp_path)
    assert done.returncode == 0, done.stderr
    mean = json.loads(done.stdout.splitlines()[-1])
    assert mean["steps"] == 2
    first = done.stdout.splitlines()[0]
    assert "forward_host_bound 0.4" in first and "backward_waiting 0.2" in first, first
    assert mean["mean"]["forward_waiting"] == 0 and mean["mean"]["backward_host_bound"] == 0
    assert mean["mean"]["forward_host_bound"] == 0.2 and mean["mean"]["backward_waiting"] == 0.1
