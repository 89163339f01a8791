#!/usr/bin/env python3
"""GPU speed benchmark: plain HF Trainer + PEFT against ftpipe's train-stage path, side by side, in one run.

Each case trains the same random-init model shape on the same packed data (random tokens, documents of random
length packed into rows of 2048) with the same batch and LoRA config, first as a user would set it up with
HF Trainer + PEFT, then through ftpipe's train-stage hooks (ftpipe/training/speed/). It prints tokens/s
(median step after warm-up), peak GPU memory, MFU and the ratios ftpipe / HF, and checks that both paths give
the same loss and LoRA gradients on the same weights and batch (the correctness guard).

    python3 scripts/bench.py                       # all cases + guard, on the GPU machine
    python3 scripts/bench.py --cases llama1b_lora --json out.json
    python3 scripts/bench.py --cases llama1b_lora --variants base:,flex:attention=flex --sides ftpipe

Needs torch, transformers, peft, accelerate; liger-kernel and bitsandbytes where the levers / QLoRA use them.
No hub access: models are built from their configs (written out below) with random weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ftpipe.training.profiling import summarize_profile  # noqa: E402

# The real dimensions of the two models (from their hub config.json), so no download is needed.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        tie_word_embeddings=True,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=128000,
        eos_token_id=128009,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
}

# Llama-3.1-8B: Llama-3.2-1B's architecture at another size (its rope scaling factor 8, an untied head)
SHAPES["llama-3.1-8b"] = {
    **SHAPES["llama-3.2-1b"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "head_dim": 128,
    "rope_scaling": {**SHAPES["llama-3.2-1b"]["rope_scaling"], "factor": 8.0},
    "tie_word_embeddings": False,
}

# case -> shape, method, rows per step, checkpointing (HF: gradient_checkpointing; ftpipe: train.speed.checkpointing
# offload, the memory-saving setting on CUDA)
CASES: dict[str, dict[str, Any]] = {
    "llama1b_lora": dict(shape="llama-3.2-1b", method="lora", batch=4, ckpt=False),
    "llama1b_lora_ckpt": dict(shape="llama-3.2-1b", method="lora", batch=4, ckpt=True),
    "llama1b_qlora": dict(shape="llama-3.2-1b", method="qlora", batch=4, ckpt=True),
    "qwen7b_lora": dict(shape="qwen2.5-7b", method="lora", batch=2, ckpt=True),
    "qwen7b_qlora": dict(shape="qwen2.5-7b", method="qlora", batch=2, ckpt=True),
}
LORA = dict(r=64, alpha=16, dropout=0.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # = all-linear
ROW = 2048
COLS = ("input_ids", "labels", "position_ids")
START = time.perf_counter()
PEAK_TFLOPS = 989.0  # H100 SXM dense bf16, the usual MFU denominator


def log(*a: Any) -> None:
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------------- data


def make_rows(n_rows: int, vocab: int, seed: int, row: int = ROW) -> list[dict[str, torch.Tensor]]:
    """Rows of `row` tokens, each several documents (lengths 64..1024, the last one cut to fill the row), with
    position_ids restarting per document and no loss on a document's first token (nothing predicts it)."""
    from ftpipe.data.labels import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        lengths: list[int] = []
        while sum(lengths) < row:
            lengths.append(min(int(torch.randint(64, 1025, (1,), generator=g)), row - sum(lengths)))
        ids = torch.randint(0, vocab, (row,), generator=g)
        pos = torch.cat([torch.arange(n) for n in lengths])
        labels = ids.clone()
        labels[pos == 0] = IGNORE_INDEX
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "doc_lengths": lengths})
    return rows


def packed_rows(dataset_dir: str, n_rows: int) -> list[dict[str, torch.Tensor]]:
    """The first `n_rows` rows of a pack stage's dataset (the `ftpipe` command's own rows, so both can be
    compared on the same data), cycled if it has fewer."""
    from datasets import load_from_disk

    data = load_from_disk(dataset_dir).with_format("torch")
    rows = []
    for i in range(n_rows):
        row = data[i % len(data)]
        pos = row["position_ids"]
        starts = (pos == 0).nonzero().squeeze(-1).tolist() + [len(pos)]
        lengths = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        rows.append({**{k: row[k] for k in COLS}, "doc_lengths": lengths})
    return rows


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        # numpy arrays, as the train stage's packed Arrow dataset (numpy format) hands them to the collator
        self.rows = [{k: r[k].numpy() for k in COLS} for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


# ----------------------------------------------------------------------------------------------------- models


def model_config(shape: str) -> Any:
    from transformers import AutoConfig

    spec = dict(SHAPES[shape])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def model_dir(shape: str, seed: int) -> Path:
    """A random-init checkpoint of `shape` on local disk (bf16 safetensors), written once per run: both sides
    load it with `from_pretrained`, as they would a downloaded model (QLoRA quantizes while loading)."""
    from transformers import AutoModelForCausalLM

    path = Path(tempfile.gettempdir()) / f"bench-{shape}-{seed}"
    if not (path / "config.json").exists():
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(model_config(shape), dtype=torch.bfloat16)
        model.save_pretrained(path, max_shard_size="20GB")
        del model
        cleanup()
        log(f"   wrote {path} in {time.perf_counter() - t0:.0f}s")
    return path


def lora_config(init_random: bool = False) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
        init_lora_weights=not init_random,
    )


def hf_model(case: dict[str, Any], path: Path, init_random: bool = False) -> nn.Module:
    """HF + PEFT as a user sets it up: `from_pretrained` in bf16 (sdpa), PEFT LoRA (fp32 adapters, its
    default); QLoRA: BitsAndBytesConfig nf4 + double quant + `prepare_model_for_kbit_training`. No KV cache in
    training (with one, packed rows attend across documents)."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "attn_implementation": "sdpa", "device_map": {"": 0}}
    if case["method"] == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    if case["method"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=case["ckpt"])
    return get_peft_model(model, lora_config(init_random))


def ftpipe_cfg(case: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The resolved config slice the train stage reads (schema defaults + this case)."""
    from dataclasses import asdict

    from ftpipe.config import LauncherConfig, OptimizerConfig, TrainConfig

    train = asdict(TrainConfig())
    train.update(
        method=case["method"],
        micro_batch_size=case["batch"],
        grad_accum=1,
        save_steps=10**6,
    )  # logging_steps: the train stage's default, as the command logs
    train["lora"] = {**train["lora"], "r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"]}
    train["lora"]["target_modules"] = list(TARGETS)
    speed_over = {k: v for k, v in overrides.items() if k in train["speed"]}
    ckpt = {"checkpointing": "offload"} if case["ckpt"] else {}
    train["speed"] = {**train["speed"], **ckpt, **speed_over}
    opt = asdict(OptimizerConfig())
    opt.update(lr=2e-4, scheduler="constant", warmup_ratio=0.0)
    opt.update({k.removeprefix("optimizer."): v for k, v in overrides.items() if k.startswith("optimizer.")})
    return {"train": train, "optimizer": opt, "seed": 0, "launcher": asdict(LauncherConfig())}


def ftpipe_model(case: dict[str, Any], path: Path, cfg: dict[str, Any]) -> nn.Module:
    """ftpipe's train stage: load_for_training (from_pretrained with the speed hooks, PEFT, after_peft)."""
    from ftpipe.training import speed
    from ftpipe.training.model import load_for_training

    return load_for_training(path, cfg["train"], speed.resolve(cfg["train"], "cuda"))


# ------------------------------------------------------------------------------------------------------ flops


def flops_per_token(case: dict[str, Any], rows: list[dict[str, Any]]) -> float:
    """Model FLOPs per token: 4 x frozen matmul params (forward + input-gradient; no weight gradient),
    6 x LoRA params, plus attention (forward 2*L^2*d per document and layer, causal; backward twice that)."""
    s = SHAPES[case["shape"]]
    h, inter, n_layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    hd = s.get("head_dim") or h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    frozen = n_layers * sum(i * o for i, o in shapes) + s["vocab_size"] * h
    lora = n_layers * sum(LORA["r"] * (i + o) for i, o in shapes)
    tokens = sum(len(r["input_ids"]) for r in rows)
    attn_fwd = n_layers * sum(2 * n * n * q for r in rows for n in r["doc_lengths"]) / tokens
    return 4 * frozen + 6 * lora + 3 * attn_fwd


# ----------------------------------------------------------------------------------------------------- timing


class StepTimer:
    """Times the steps after warm-up as one window: the GPU is drained when it opens (end of step `warmup`) and
    when it closes (end of step `warmup + steps`), and nowhere in between, so the Trainer runs as it would
    (the CPU preparing the next step while the GPU finishes this one). Peak memory is read over the window
    (compilation and autotuning in the warm-up excluded) and over the whole run. Optionally a torch.profiler
    table of two more steps after the window (and its chrome trace), and one more step run under
    `torch.cuda.set_sync_debug_mode("warn")` that records where the host waited for the GPU."""

    def __init__(
        self,
        warmup: int,
        steps: int,
        profile: bool = False,
        trace: str | None = None,
        sync_debug: bool = False,
    ) -> None:
        self.warmup, self.steps = warmup, steps
        self.profile_at = warmup + steps if profile else None
        self.trace = trace
        self.sync_at = (warmup + steps + (2 if profile else 0)) if sync_debug else None
        self.syncs: list[dict[str, Any]] | None = None
        self._showwarning: Any = None
        self.marks: list[float] = []
        self.window: tuple[float, float] | None = None
        self.t0 = 0.0
        self.peak_warmup = 0.0
        self.peak_window = 0.0
        self.prof: Any = None
        self.profile: dict[str, Any] | None = None

    def extra_steps(self) -> int:
        return (2 if self.profile_at is not None else 0) + (1 if self.sync_at is not None else 0)

    def _sync_debug_on(self) -> None:
        import traceback
        import warnings

        found: dict[str, dict[str, Any]] = {}
        self.syncs = []
        self._showwarning = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if "synchroniz" not in text:
                return self._showwarning(message, category, filename, lineno, file, line)
            stack = [
                f"{fr.filename.split('site-packages/')[-1]}:{fr.lineno} {fr.name}"
                for fr in traceback.extract_stack()[:-2]
                if "warnings.py" not in fr.filename
            ][-12:]
            key = "|".join(stack[-4:])
            if key in found:
                found[key]["count"] += 1
            else:
                found[key] = {"message": text[:160], "count": 1, "stack": stack}
                self.syncs.append(found[key])

        warnings.showwarning = record
        warnings.filterwarnings("always", message=".*synchroniz.*")
        torch.cuda.set_sync_debug_mode("warn")

    def _sync_debug_off(self) -> None:
        import warnings

        torch.cuda.set_sync_debug_mode("default")
        if self._showwarning is not None:
            warnings.showwarning = self._showwarning

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if timer.profile_at is not None and state.global_step == timer.profile_at:
                    from torch.profiler import ProfilerActivity, profile

                    torch.cuda.synchronize()
                    timer.prof = profile(
                        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True
                    )
                    timer.prof.__enter__()
                    timer.prof_t0 = time.perf_counter()
                if timer.sync_at is not None and state.global_step == timer.sync_at:
                    timer._sync_debug_on()

            def on_step_end(self, args, state, control, **kw):
                step = state.global_step
                if step == timer.warmup:
                    torch.cuda.synchronize()
                    timer.peak_warmup = torch.cuda.max_memory_allocated() / 2**30
                    torch.cuda.reset_peak_memory_stats()
                    timer.t0 = time.perf_counter()
                elif step == timer.warmup + timer.steps:
                    torch.cuda.synchronize()
                    timer.window = (timer.t0, time.perf_counter())
                    timer.peak_window = torch.cuda.max_memory_allocated() / 2**30
                timer.marks.append(time.perf_counter())
                if timer.prof is not None and step == timer.profile_at + 2:
                    torch.cuda.synchronize()
                    wall = time.perf_counter() - timer.prof_t0
                    timer.prof.__exit__(None, None, None)
                    timer.profile = summarize_profile(timer.prof, wall, 2)
                    if timer.trace:
                        try:
                            import gzip
                            import shutil

                            raw = timer.trace.removesuffix(".gz")
                            timer.prof.export_chrome_trace(raw)
                            with open(raw, "rb") as src, gzip.open(raw + ".gz", "wb", compresslevel=6) as dst:
                                shutil.copyfileobj(src, dst)
                            os.remove(raw)
                        except Exception as exc:  # a diagnostic only
                            timer.profile["trace_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    timer.prof = None
                if timer.sync_at is not None and step == timer.sync_at + 1:
                    timer._sync_debug_off()

        return _CB()

    def step_ms(self) -> list[float]:
        """Per-step times as the host saw them (no drain at each step: indicative, the window is the figure)."""
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]


def hf_trainer(model: nn.Module, rows, case: dict[str, Any], steps: int, timer: StepTimer, optim: str | None):
    from transformers import Trainer, TrainingArguments

    args = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-"),
        per_device_train_batch_size=case["batch"],
        max_steps=steps,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        bf16=True,
        gradient_checkpointing=case["ckpt"],
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=0,
    )
    if optim:
        args["optim"] = optim
    return Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=Rows(rows),
        data_collator=padded_collator,
        callbacks=[timer.callback()],
    )


def padded_collator(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """HF's side of a batch: rows stacked, the shorter ones (a pack stage's rows can be) padded to the longest
    with a document of pad tokens that no label trains, so its attention mask keeps it apart."""
    from ftpipe.data.labels import IGNORE_INDEX

    longest = max(len(r["input_ids"]) for r in rows)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in COLS}
    for r in rows:
        pad = longest - len(r["input_ids"])
        fill = {
            "input_ids": torch.zeros(pad),
            "labels": torch.full((pad,), IGNORE_INDEX),
            "position_ids": torch.arange(pad),
        }
        for k in COLS:
            out[k].append(torch.cat([torch.as_tensor(r[k]), fill[k]]).long())
    return {k: torch.stack(v) for k, v in out.items()}


def ftpipe_trainer(model: nn.Module, rows, cfg: dict[str, Any], steps: int, timer: StepTimer):
    """The train stage's Trainer: its TrainingArguments, PackedCollator (padding-free) and FtTrainer."""
    import dataclasses

    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    from ftpipe.training import speed
    from ftpipe.training.collator import PackedCollator
    from ftpipe.training.fit import training_arguments
    from ftpipe.training.trainer import FtTrainer

    cfg = {**cfg, "train": {**cfg["train"], "max_steps": steps}}
    levers = speed.resolve(cfg["train"], "cuda")
    args = training_arguments(cfg, tempfile.mkdtemp(prefix="bench-"), levers, "bf16", ROW)
    # The loop the command runs: its logging (every train.logging_steps, each log reading the loss and the
    # gradient norm back), progress bar and TensorBoard writer; only checkpoints are off (the window is short).
    args = dataclasses.replace(args, save_strategy="no")
    tensorboard = TensorBoardCallback(SummaryWriter(log_dir=tempfile.mkdtemp(prefix="bench-tb-")))
    return FtTrainer(
        model=model,
        args=args,
        train_dataset=Rows(rows),
        data_collator=PackedCollator(**speed.collator_kwargs(levers)),
        callbacks=[timer.callback(), tensorboard, *speed.callbacks(levers)],
        loss_mode=speed.loss_mode(levers),
        device="cuda",
    )


def annotate_trainer(trainer: Any) -> None:
    """Name the Trainer's host phases in profiler traces (record_function ranges around its step pieces)."""
    from torch.profiler import record_function

    def wrap(obj: Any, name: str) -> None:
        fn = getattr(obj, name, None)
        if fn is None:
            return

        def wrapped(*a: Any, **k: Any) -> Any:
            with record_function(f"## {name}"):
                return fn(*a, **k)

        setattr(obj, name, wrapped)

    for name in (
        "training_step",
        "compute_loss",
        "get_batch_samples",
        "_clip_grad_norm",
        "floating_point_ops",
    ):
        wrap(trainer, name)
    wrap(trainer.accelerator, "backward")
    wrap(trainer.callback_handler, "call_event")
    wrap(trainer, "_maybe_log_save_evaluate")


def cleanup() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def saved_activations(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """GPU memory held after a training forward, before backward (what the layers saved), in GiB: total and
    per decoder layer (median delta), to see what checkpointing / recompute choices keep."""
    from ftpipe.training.speed.stack import decoder_stack

    deltas: list[int] = []
    last = [0]

    def hook(*_: Any) -> None:
        now = torch.cuda.memory_allocated()
        deltas.append(now - last[0])
        last[0] = now

    handles = [layer.register_forward_hook(hook) for layer in decoder_stack(model).layers]
    model.train()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    last[0] = base
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**batch)
    held = torch.cuda.memory_allocated() - base
    for h in handles:
        h.remove()
    del out
    cleanup()
    return {
        "forward_held_gib": held / 2**30,
        "per_layer_gib": statistics.median(deltas[1:] or deltas) / 2**30,
    }


def measure(side: str, case: dict[str, Any], rows, args, overrides: dict[str, Any] | None = None) -> dict:
    from ftpipe.training.collator import PackedCollator

    cleanup()
    path = model_dir(case["shape"], args.seed)
    steps = args.warmup + args.steps
    n_rows = steps * case["batch"]
    diag = side == "ftpipe" or args.diag_hf
    trace = None
    if args.profile and diag and args.trace_dir:
        trace = str(Path(args.trace_dir) / f"trace_{args.current_case}_{side}_{args.current_variant}.json")
    timer = StepTimer(
        args.warmup,
        args.steps,
        profile=args.profile and diag,
        trace=trace,
        sync_debug=args.sync_debug and diag,
    )
    steps += timer.extra_steps()
    n_rows += timer.extra_steps() * case["batch"]
    t0 = time.perf_counter()
    if side == "hf":
        model = hf_model(case, path)
        trainer = hf_trainer(model, rows[:n_rows], case, steps, timer, args.hf_optim)
    else:
        torch._dynamo.reset()  # no compiled graph of an earlier variant (other levers) is reused
        cfg = ftpipe_cfg(case, overrides or {})
        model = ftpipe_model(case, path, cfg)
        trainer = ftpipe_trainer(model, rows[:n_rows], cfg, steps, timer)
    build_s = time.perf_counter() - t0
    if args.profile and diag:
        annotate_trainer(trainer)
    cleanup()
    torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t1
    peak = timer.peak_window
    peak_all = max(timer.peak_warmup, peak, torch.cuda.max_memory_allocated() / 2**30)
    reserved = torch.cuda.max_memory_reserved() / 2**30
    mem: dict[str, float] = {}
    if args.memory:
        try:
            if side == "hf":
                one = padded_collator(rows[: case["batch"]])
            else:
                from ftpipe.training import speed

                kw = speed.collator_kwargs(speed.resolve(cfg["train"], "cuda"))
                one = PackedCollator(**kw)([{k: r[k].tolist() for k in COLS} for r in rows[: case["batch"]]])
            mem = saved_activations(model, one)
        except Exception as exc:  # a diagnostic: never fail the run for it
            mem = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    assert timer.window is not None, "the timed window did not close"
    med = (timer.window[1] - timer.window[0]) / args.steps  # mean step over the window
    # the rows' own lengths (a pack stage's rows are at most ROW long): the tokens the command counts too
    tokens = case["batch"] * statistics.mean(len(r["input_ids"]) for r in rows[:n_rows])
    tps = tokens / med
    fpt = flops_per_token(case, rows[:n_rows])
    del trainer, model
    cleanup()
    from torch._dynamo.utils import counters

    return {
        "side": side,
        "tok_s": tps,
        "step_ms": med * 1e3,
        "step_ms_host": timer.step_ms(),
        "peak_gib": peak,
        "peak_all_gib": peak_all,
        "reserved_gib": reserved,
        "mfu": tps * fpt / (PEAK_TFLOPS * 1e12),
        "tflops": tps * fpt / 1e12,
        "build_s": build_s,
        "train_wall_s": wall,
        "overrides": overrides or {},
        "memory": mem,
        "profile": timer.profile,
        "syncs": timer.syncs,
        "dynamo": {
            "unique_graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values()),
        },
    }


# ------------------------------------------------------------------------------------------------------ guard


def _loss_and_grads(model: nn.Module, batch: dict[str, torch.Tensor], autocast: bool) -> tuple[float, dict]:
    model.train()
    model.zero_grad(set_to_none=True)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch)
    out.loss.backward()
    grads = {
        n.split("base_model.model.", 1)[-1]: p.grad.detach().float().clone()
        for n, p in model.named_parameters()
        if "lora_" in n and p.grad is not None
    }
    return float(out.loss), grads


def _rel(g: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, float]:
    keys = sorted(ref)
    a = torch.cat([g[k].flatten() for k in keys])
    b = torch.cat([ref[k].flatten() for k in keys])
    return float((a - b).norm() / b.norm()), float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def guard(case_name: str, rows, args, overrides: dict[str, Any]) -> dict[str, Any]:
    """Same weights, same batch: loss and LoRA gradients of (1) HF+PEFT as the user runs it (bf16 autocast,
    fp32 adapters), (2) ftpipe's train-stage path with its levers, against (0) the same model in fp32. Pass:
    ftpipe's error vs fp32 is within bf16 tolerance (at most twice HF's own error, or 2e-2) and its gradients
    point the same way. QLoRA has no fp32 twin: there ftpipe is compared with HF's QLoRA directly."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from ftpipe.training.collator import PackedCollator

    case = dict(CASES[case_name])
    path = model_dir(case["shape"], args.seed)
    batch_rows = rows[: case["batch"]]
    padded = padded_collator(batch_rows)
    cleanup()
    hf = hf_model(case, path, init_random=True)
    if case["ckpt"]:
        hf.gradient_checkpointing_enable()
        hf.enable_input_require_grads()
    adapters = {k: v.detach().clone() for k, v in get_peft_model_state_dict(hf).items()}
    hf_loss, hf_grads = _loss_and_grads(hf, padded, autocast=True)
    ref_loss = ref_grads = None
    if case["method"] != "qlora":
        hf.float()
        ref_loss, ref_grads = _loss_and_grads(hf, padded, autocast=False)
    del hf
    cleanup()
    cfg = ftpipe_cfg(case, overrides)
    fast = ftpipe_model(case, path, cfg)
    if case["method"] != "qlora":
        fast = fast.cuda()  # (the Trainer moves it in training; 4-bit models are placed at load)
    dtype = next(p for n, p in fast.named_parameters() if "lora_A" in n).dtype
    set_peft_model_state_dict(fast, {k: v.to(dtype) for k, v in adapters.items()})
    from ftpipe.training import speed

    collate = PackedCollator(**speed.collator_kwargs(speed.resolve(cfg["train"], "cuda")))
    fast_loss, fast_grads = _loss_and_grads(
        fast, collate([{k: r[k].tolist() for k in COLS} for r in batch_rows]), autocast=True
    )
    del fast
    cleanup()
    res: dict[str, Any] = {
        "case": case_name,
        "overrides": overrides,
        "hf_loss": hf_loss,
        "ftpipe_loss": fast_loss,
    }
    if ref_grads is not None:
        res["fp32_loss"] = ref_loss
        res["hf_grad_err"], res["hf_grad_cos"] = _rel(hf_grads, ref_grads)
        res["ftpipe_grad_err"], res["ftpipe_grad_cos"] = _rel(fast_grads, ref_grads)
        res["hf_loss_err"] = abs(hf_loss - ref_loss) / abs(ref_loss)
        res["ftpipe_loss_err"] = abs(fast_loss - ref_loss) / abs(ref_loss)
        tol = max(2 * res["hf_grad_err"], 2e-2)
        res["pass"] = bool(
            res["ftpipe_grad_err"] <= tol
            and res["ftpipe_grad_cos"] >= 0.999
            and res["ftpipe_loss_err"] <= 1e-2
        )
    else:
        res["ftpipe_vs_hf_grad_err"], res["ftpipe_vs_hf_grad_cos"] = _rel(fast_grads, hf_grads)
        res["loss_err"] = abs(fast_loss - hf_loss) / abs(hf_loss)
        res["pass"] = bool(
            res["ftpipe_vs_hf_grad_err"] <= 5e-2
            and res["ftpipe_vs_hf_grad_cos"] >= 0.998
            and res["loss_err"] <= 1e-2
        )
    return res


# ------------------------------------------------------------------------------------------------------ probe


def probe() -> dict[str, Any]:
    """Versions and a check of varlen_attn's causal switch and grouped heads against SDPA, per document."""
    import torch.nn.functional as F

    from ftpipe.data import boundaries
    from ftpipe.training.speed import attention as attn

    out: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("transformers", "peft", "accelerate", "triton", "liger_kernel", "bitsandbytes"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # report, do not stop the bench
            out[mod] = f"missing ({type(exc).__name__}: {exc})"
    out["gpu"] = torch.cuda.get_device_name()
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        out["varlen_signature"] = str(inspect.signature(varlen_attn))
        torch.manual_seed(0)
        lengths = [300, 1000, 77, 671]
        t, h, hkv, d = sum(lengths), 32, 8, 64
        q = torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        pos = torch.cat([torch.arange(n) for n in lengths]).cuda()[None]
        ref, start = [], 0
        for n in lengths:
            sl = slice(start, start + n)
            qq = q[sl].double().transpose(0, 1)
            kk = k[sl].double().repeat_interleave(h // hkv, 1).transpose(0, 1)
            vv = v[sl].double().repeat_interleave(h // hkv, 1).transpose(0, 1)
            ref.append(F.scaled_dot_product_attention(qq, kk, vv, is_causal=True).transpose(0, 1))
            start += n
        ref_o = torch.cat(ref)
        g = torch.randn_like(ref_o)
        ref_grads = torch.autograd.grad((ref_o * g).sum(), (q, k, v))
        fn, causal, _ = attn._varlen_fn()
        cu, longest = boundaries.cu_seqlens(pos)

        def packed(forward):  # an attention function as transformers calls it, on this packed row
            heads_first = (t.transpose(0, 1)[None] for t in (q, k, v))
            return forward(None, *heads_first, None, None, position_ids=pos)[0][0]

        for gqa in (False, True):
            try:
                if gqa:  # the kernel given fewer KV heads than query heads, without a flag
                    o = fn(q, k, v, cu, cu, longest, longest, **causal)
                else:  # ftpipe's path: enable_gqa where the wrapper has it, else K/V repeated
                    o = packed(attn.varlen_attention_forward)
                grads = torch.autograd.grad((o.double() * g).sum(), (q, k, v))
                err = float((o.double() - ref_o).norm() / ref_o.norm())
                gerr = [
                    float((a.double() - b).norm() / b.norm()) for a, b in zip(grads, ref_grads, strict=True)
                ]
                out[f"varlen_gqa_native={gqa}"] = {"out_err": err, "grad_err": gerr}
            except Exception as exc:
                out[f"varlen_gqa_native={gqa}"] = f"error: {type(exc).__name__}: {exc}"[:300]
        ok = out.get("varlen_gqa_native=True")
        # Whether the kernel accepts grouped heads natively (flash-attn's kernels do; the PyTorch wrapper may
        # not pass them through): informational, ftpipe repeats K/V where the wrapper has no enable_gqa.
        native_gqa = bool(isinstance(ok, dict) and ok["out_err"] < 1e-2 and max(ok["grad_err"]) < 2e-2)
        out["varlen_native_gqa_ok"] = native_gqa
        out["flex_out_err"] = float(
            (packed(attn.flex_attention_forward).double() - ref_o).norm() / ref_o.norm()
        )
    except Exception as exc:
        out["attention_probe_error"] = f"{type(exc).__name__}: {exc}"[:500]
        traceback.print_exc()
    return out


# ------------------------------------------------------------------------------------------------------- main


def parse_variants(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """`name:key=val+key=val,name2:` -> [(name, {key: val})]; values int where they parse."""
    out = []
    for part in filter(None, spec.split(",")):
        name, _, kv = part.partition(":")
        d: dict[str, Any] = {}
        for item in filter(None, kv.split("+")):
            k, _, v = item.partition("=")
            for conv in (int, float, str):
                try:
                    d[k] = conv(v)
                    break
                except ValueError:
                    continue
        out.append((name, d))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    p.add_argument("--sides", default="hf,ftpipe", help="hf, ftpipe or both")
    p.add_argument(
        "--variants",
        default="default:",
        help="ftpipe overrides: name:key=val+key=val,... (a train.speed key's leaf, or optimizer.KEY)",
    )
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--guard", default="llama1b_lora,llama1b_lora_ckpt,llama1b_qlora", help="cases to guard, or ''"
    )
    p.add_argument("--hf-optim", default=None, help="HF side optimizer (default: TrainingArguments' default)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of two ftpipe steps")
    p.add_argument("--trace-dir", default=None, help="with --profile: write gzipped chrome traces here")
    p.add_argument(
        "--sync-debug", action="store_true", help="one step in sync-debug mode: where the host waits"
    )
    p.add_argument("--diag-hf", action="store_true", help="profile / sync-debug the HF side too")
    p.add_argument("--memory", action="store_true", help="activation memory held after a forward")
    p.add_argument("--probe", action="store_true", help="only the environment / attention probe")
    p.add_argument("--json", default=os.environ.get("BENCH_JSON"), help="write all results here")
    p.add_argument("--guard-first", action="store_true", help="run the guard before the timed runs")
    p.add_argument("--rows-from", default=None, help="a pack stage's dataset folder: train on its rows")
    p.add_argument("--deadline", type=float, default=0, help="seconds: start no new run after this (0: none)")
    args = p.parse_args()

    # The same CUDA allocator settings for both sides (ftpipe's hooks switch expandable segments on anyway).
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError):
        pass
    if not torch.cuda.is_available():
        log("bench.py needs a CUDA GPU (run it on the GPU machine)")
        return 2
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:]}
    results["env"] = probe()
    log(json.dumps(results["env"], indent=1))

    def dump() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    dump()
    if args.probe:
        return 0
    variants = parse_variants(args.variants)
    rows_cache: dict[str, list] = {}
    results["runs"] = []
    if args.guard_first:
        run_guards(args, variants, rows_cache, results, dump)
    for name in filter(None, args.cases.split(",")):
        case = CASES[name]
        vocab = SHAPES[case["shape"]]["vocab_size"]
        n_rows = (args.warmup + args.steps + 3) * 4
        rows = rows_cache.setdefault(
            case["shape"],
            packed_rows(args.rows_from, n_rows) if args.rows_from else make_rows(n_rows, vocab, args.seed),
        )
        sides = [s for s in ("hf", "ftpipe") if s in args.sides.split(",")]
        for side in sides:
            for vname, ov in variants if side == "ftpipe" else [("hf", {})]:
                if args.deadline and time.perf_counter() - START > args.deadline:
                    log(f"== {name} / {side} / {vname}: skipped (deadline)")
                    continue
                log(f"== {name} / {side} / {vname} {ov}")
                args.current_case, args.current_variant = name, vname
                try:
                    r = measure(side, case, rows, args, ov)
                    r.update(case=name, variant=vname)
                    log(
                        f"   {r['tok_s']:,.0f} tok/s  {r['step_ms']:.1f} ms/step  peak {r['peak_gib']:.2f} GiB"
                        f"  MFU {r['mfu']:.1%}  (build {r['build_s']:.0f}s, train {r['train_wall_s']:.0f}s)"
                    )
                except Exception as exc:
                    traceback.print_exc()
                    r = {
                        "case": name,
                        "side": side,
                        "variant": vname,
                        "error": f"{type(exc).__name__}: {exc}"[:800],
                    }
                    cleanup()
                results["runs"].append(r)
                dump()
    if not args.guard_first:
        run_guards(args, variants, rows_cache, results, dump)
    report(results)
    dump()
    return 0


def run_guards(args, variants, rows_cache, results, dump) -> None:
    results.setdefault("guard", [])
    for name in filter(None, args.guard.split(",")):
        if args.deadline and time.perf_counter() - START > args.deadline:
            log(f"== guard {name}: skipped (deadline)")
            continue
        try:
            ov = variants[0][1] if variants else {}
            g = guard(
                name,
                rows_cache.get(CASES[name]["shape"])
                or make_rows(4, SHAPES[CASES[name]["shape"]]["vocab_size"], args.seed),
                args,
                ov,
            )
        except Exception as exc:
            traceback.print_exc()
            g = {"case": name, "pass": False, "error": f"{type(exc).__name__}: {exc}"[:800]}
            cleanup()
        log(f"== guard {name}: {json.dumps(g)}")
        results["guard"].append(g)
        dump()


# issue 5's "Must show": (case, what, test on (ftpipe run, HF run))
TARGETS_MUST = [
    ("llama1b_lora", ">= 2.0x HF tok/s", lambda r, b: b is not None and r["tok_s"] >= 2.0 * b["tok_s"]),
    (
        "llama1b_lora",
        "<= 0.35x HF peak",
        lambda r, b: b is not None and r["peak_gib"] <= 0.35 * b["peak_gib"],
    ),
    ("llama1b_lora_ckpt", ">= 44k tok/s", lambda r, b: r["tok_s"] >= 44_000),
    ("llama1b_lora_ckpt", "<= 3.5 GiB", lambda r, b: r["peak_gib"] <= 3.5),
    ("llama1b_qlora", ">= 2.0x HF tok/s", lambda r, b: b is not None and r["tok_s"] >= 2.0 * b["tok_s"]),
    ("llama1b_qlora", "<= 2.7 GiB", lambda r, b: r["peak_gib"] <= 2.7),
    ("qwen7b_qlora", ">= 10k tok/s", lambda r, b: r["tok_s"] >= 10_000),
    ("qwen7b_qlora", "<= 7.5 GiB", lambda r, b: r["peak_gib"] <= 7.5),
]


def report(results: dict[str, Any]) -> None:
    runs = [r for r in results.get("runs", []) if "error" not in r]
    base = {r["case"]: r for r in runs if r["side"] == "hf"}
    log(
        "\n| case | run | tok/s | peak GiB (timed steps) | peak GiB (whole run) | MFU | tok/s ÷ HF | peak ÷ HF |"
    )
    log("|---|---|---|---|---|---|---|---|")
    for r in runs:
        b = base.get(r["case"])
        ratio = f"{r['tok_s'] / b['tok_s']:.2f}x" if b and r is not b else ""
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}x" if b and r is not b else ""
        label = "HF Trainer + PEFT" if r["side"] == "hf" else f"ftpipe ({r['variant']})"
        log(
            f"| {r['case']} | {label} | {r['tok_s']:,.0f} | {r['peak_gib']:.2f} | {r['peak_all_gib']:.2f} "
            f"| {r['mfu']:.1%} | {ratio} | {mem} |"
        )
    for r in results.get("runs", []):
        if "error" in r:
            log(f"| {r['case']} | {r['side']} ({r.get('variant')}) | error: {r['error'][:120]} |")
    checks = []
    for case, what, test in TARGETS_MUST:
        for r in runs:
            if r["case"] == case and r["side"] == "ftpipe":
                ok = bool(test(r, base.get(case)))
                checks.append({"case": case, "variant": r["variant"], "target": what, "met": ok})
                log(f"target {case} ({r['variant']}) {what}: {'met' if ok else 'MISSED'}")
    results["targets"] = checks
    for g in results.get("guard", []):
        log(f"guard {g['case']}: {'PASS' if g.get('pass') else 'FAIL'} {json.dumps(g)[:400]}")


if __name__ == "__main__":
    sys.exit(main())
