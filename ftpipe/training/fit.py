"""The training run itself (one process, or one rank under torchrun): model, Trainer, resume, outputs."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import FtpipeError
from .distributed import deepspeed_config, zero_stage

log = logging.getLogger("ftpipe")

REQUIRED_COLUMNS = ("input_ids", "labels", "position_ids")


@dataclass
class TrainJob:
    """Everything one training run needs: plain config and paths (the train stage builds it from its inputs)."""

    cfg: dict[str, Any]  # the train stage's config slice
    model_dir: Path  # an HF model folder to start from
    dataset_dir: Path  # the packed dataset (`datasets.save_to_disk`)
    data_info: Path  # map's data.json (system prompt and prompts for sample replies)
    out: Path  # where checkpoints, tb/, final/ and log_history.json go
    build_dir: Path | None = None  # compiled artefacts kept between runs (`build_env`)

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> TrainJob:
        raw = json.loads(text)
        return cls(**{k: v if k == "cfg" or v is None else Path(v) for k, v in raw.items()})


def training_arguments(
    cfg: dict[str, Any], out_dir: str, levers: Any, precision: str, row_len: int | None = None
):
    """TrainingArguments for `levers.device` (levers: the run's resolved `speed.Levers`)."""
    from transformers import TrainingArguments

    from . import speed

    train, opt = cfg["train"], cfg["optimizer"]
    device = levers.device
    # train.speed.tokens_per_micro_batch: same rows per optimizer step, split into smaller micro-batches
    micro_batch, grad_accum = speed.micro_batches(train, row_len)
    scheduler = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[opt["scheduler"]]
    return TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=float(train["epochs"]),
        max_steps=train["max_steps"] or -1,
        **optimizer_arguments(opt, device),
        max_grad_norm=opt["max_grad_norm"],
        lr_scheduler_type=scheduler,
        # transformers 5 reads a float in [0, 1) here as a ratio of the total steps.
        warmup_steps=float(opt["warmup_ratio"]) if opt["warmup_ratio"] else 0,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        save_strategy="steps",
        save_steps=train["save_steps"],
        save_total_limit=train["save_total_limit"],
        logging_steps=train["logging_steps"],
        report_to="none",  # TensorBoard is attached explicitly, writing into the stage dir
        seed=cfg["seed"],
        data_seed=cfg["seed"],
        dataloader_num_workers=train["num_workers"],
        remove_unused_columns=False,  # the collator picks its columns; doc_lens etc. must reach it
        include_num_input_tokens_seen=True,
        disable_tqdm=False,
        **speed.training_args_overrides(levers),
        ddp_find_unused_parameters=False,  # every trained parameter takes part in every step
        # DDP would broadcast every buffer from rank 0 before every forward: a causal LM's own buffers (rotary
        # frequencies) are the same on every rank, and the fused LoRA ops keep frozen base weights as buffers
        # (4-bit data, grouped q/k/v and gate/up weights: most of the model) that never change.
        ddp_broadcast_buffers=False,
        ddp_timeout=cfg["launcher"]["timeout_minutes"] * 60,  # a lost rank fails the others, never hangs them
        deepspeed=deepspeed_config(cfg["launcher"], micro_batch, grad_accum, precision, opt["max_grad_norm"]),
    )


def optimizer_arguments(opt: dict[str, Any], device: str) -> dict[str, Any]:
    """The TrainingArguments that choose the optimizer for the `optimizer` config on `device` (the train
    stage's Trainer and the probe build theirs from these)."""
    optim = "adamw_torch_fused" if device == "cuda" else "adamw_torch"
    return {
        "optim": "adamw_bnb_8bit" if opt["name"] == "adamw_8bit" else optim,
        "learning_rate": opt["lr"],
        "weight_decay": opt["weight_decay"],
        "adam_beta1": opt["betas"][0],
        "adam_beta2": opt["betas"][1],
    }


def build_env(build_dir: Path) -> dict[str, str]:
    """Where what is compiled on first use is kept, per cache rather than per run or in /tmp: DeepSpeed's ops
    (minutes to build) and torch.compile's artefacts (inductor's FX graphs, AOTAutograd's graphs, Triton
    kernels, autotuning results), and flash-attn-4's JIT-compiled kernels where it is installed (speed/fa4.py).
    With these a second run of the same shapes compiles nothing: on the CPU a tiny model's first step went from
    44 s to 4.6 s, and docs/performance.md has the GPU figures."""
    return {
        "TORCH_EXTENSIONS_DIR": str(build_dir / "torch_extensions"),
        "TORCHINDUCTOR_CACHE_DIR": str(build_dir / "inductor"),
        "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "1",
        "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": str(build_dir / "fa4"),
    }


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _sampler(job: TrainJob, prec: str):
    from transformers import AutoTokenizer

    from ..data.info import DataInfo
    from .devices import autocast_dtype
    from .sampling import SampleReplies, sample_prompts

    cfg = job.cfg
    tokenizer = AutoTokenizer.from_pretrained(
        job.model_dir, trust_remote_code=bool(cfg["model"]["trust_remote_code"])
    )
    questions, ids, stops = sample_prompts(DataInfo.read(job.data_info), cfg["template"], tokenizer)
    return SampleReplies(
        cfg["train"]["sample_every"],
        tokenizer,
        questions,
        ids,
        stops,
        cfg["train"]["sample_max_new_tokens"],
        job.out / "samples.jsonl",
        autocast_dtype(prec),
    )


def _check_objective(train_cfg: dict[str, Any], data_info: Path) -> bool:
    """True for a preference objective; the objective and the data (format after `auto`) must agree."""
    from ..data.formats import PREFERENCE_FORMAT
    from ..data.info import DataInfo
    from .objectives import PREFERENCE_OBJECTIVES

    objective = train_cfg["objective"]
    pairs = DataInfo.read(data_info).format == PREFERENCE_FORMAT
    if objective in PREFERENCE_OBJECTIVES and not pairs:
        raise FtpipeError(
            f"config key `train.objective`: {objective} needs preference pairs (prompt/chosen/rejected rows), "
            f"but the data is format {DataInfo.read(data_info).format!r}"
        )
    if objective == "sft" and pairs:
        raise FtpipeError(
            "config key `train.objective`: sft on preference pairs would also learn the rejected answers; "
            "set train.objective=dpo or orpo"
        )
    return objective in PREFERENCE_OBJECTIVES


def fit(job: TrainJob) -> dict[str, Any] | None:
    """Train into job.out; returns the metrics on the main process, None on other ranks."""
    # The warm-start figure counts from here to the first optimizer step: the imports below are part of it
    # (when the earlier stages were cache hits, the train stage is the first to import torch and the rest).
    started = time.perf_counter()
    import torch
    from datasets import load_from_disk
    from torch.utils.tensorboard import SummaryWriter
    from transformers import set_seed
    from transformers.integrations import TensorBoardCallback

    from . import speed
    from .collator import PackedCollator
    from .devices import autocast_dtype, precision, train_device
    from .model import load_for_training
    from .speed.frozen_prefix import ROW_INDEX, FrozenPrefix
    from .trainer import FtTrainer, last_checkpoint

    cfg, train_cfg = job.cfg, job.cfg["train"]
    if job.build_dir is not None:
        for name, value in build_env(job.build_dir).items():
            os.environ.setdefault(name, value)  # the user's own setting wins
    device = train_device()
    prec = precision(train_cfg, device)
    # numpy rows: the collator turns them into tensors without a Python int per token (2.6x faster per batch)
    dataset = load_from_disk(str(job.dataset_dir)).with_format("numpy")
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise FtpipeError(f"train: the packed dataset lacks columns {missing} (has {dataset.column_names})")
    if len(dataset) == 0:
        raise FtpipeError("train: the packed dataset is empty (check dataset.path and dataset.max_length)")

    pairs = _check_objective(train_cfg, job.data_info)
    set_seed(cfg["seed"])  # before the model: LoRA's initial weights are random
    row_len = len(dataset[0]["input_ids"])  # packed rows all hold as many tokens
    rows, _ = speed.micro_batches(train_cfg, row_len)
    # the speed policy, once per run
    levers = speed.resolve(train_cfg, device, zero_stage(cfg["launcher"]), micro_batch_tokens=rows * row_len)
    mark = None
    if levers.compile and job.build_dir is not None:
        mark = speed.compiled.compiled_mark(
            job.build_dir, levers, job.model_dir, train_cfg, (rows, row_len), prec
        )
        if speed.compiled.load_compiled_in_process(mark):
            log.info("[train] these graphs were compiled before: loading them from the cache in this process")
    loading = time.perf_counter()
    model = load_for_training(job.model_dir, train_cfg, levers, bool(cfg["model"]["trust_remote_code"]))
    log.info(
        "[train] model built in %.1f s (%.1f s after the train stage started)",
        time.perf_counter() - loading,
        time.perf_counter() - started,
    )
    checkpoints = job.out / "checkpoints"
    main = is_main_process()
    callbacks = [TensorBoardCallback(SummaryWriter(log_dir=str(job.out / "tb")))] if main else []
    callbacks += speed.callbacks(levers)
    if train_cfg["sample_every"]:
        callbacks.append(_sampler(job, prec))
    if (profiled := train_cfg.get("profile") or {}).get("steps"):
        from .profiling import ProfileSteps

        callbacks.append(
            ProfileSteps(
                profiled["start"],
                profiled["steps"],
                job.out,
                host_ops=profiled.get("host_ops", True),
                memory=profiled.get("memory", False),
            )
        )
    collator = PackedCollator(**speed.collator_kwargs(levers))
    prefix = None
    if levers.frozen_prefix:
        dataset = dataset.add_column(ROW_INDEX, list(range(len(dataset))))
        prefix = FrozenPrefix.build(model, dataset, collator, torch.device(device), autocast_dtype(prec))
    preference = None  # the SFT loss
    if pairs:
        from .objectives import PreferenceLoss, reference_copy

        # LoRA/QLoRA: the reference is the policy with its adapters disabled; full: a frozen copy
        full_dpo = train_cfg["method"] == "full" and train_cfg["objective"] == "dpo"
        preference = PreferenceLoss(train_cfg, reference_copy(model) if full_dpo else None)
    trainer = FtTrainer(
        model=model,
        args=training_arguments(cfg, str(checkpoints), levers, prec, row_len),
        train_dataset=dataset,
        data_collator=collator,
        callbacks=callbacks,
        loss_mode=speed.loss_mode(levers),
        device=device,
        frozen_prefix=prefix,
        preference=preference,
        started=started,
    )
    resume = last_checkpoint(checkpoints, prune=main)
    if resume is not None:
        log.info("[train] resuming from step %s (%s)", resume.name.split("-")[-1], resume)
    log.info(
        "[train] %s %s on %s (%s), %d packed rows, %s loss",
        train_cfg["objective"],
        train_cfg["method"],
        device,
        prec,
        len(dataset),
        train_cfg["objective"] if pairs else speed.loss_mode(levers),
    )
    tokens_before = 0
    if resume is not None:
        tokens_before = json.loads((resume / "trainer_state.json").read_text()).get(
            "num_input_tokens_seen", 0
        )
    loop_start = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        if prefix is not None:
            prefix.restore()
    seconds = time.time() - loop_start
    if mark is not None and main:
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()

    trainer.save_model(str(job.out / "final"))  # collective under DeepSpeed; writes on the main process
    if not main:
        return None
    history = trainer.state.log_history
    (job.out / "log_history.json").write_text(json.dumps(history, indent=1))
    losses = [row["loss"] for row in history if "loss" in row]
    # after the first log (loading, compilation and warm-up): what training itself holds
    peaks = [row["peak_memory_gib"] for row in history if "peak_memory_gib" in row]
    steady_peak = max(peaks[1:]) if len(peaks) > 1 else None
    tokens = int(trainer.state.num_input_tokens_seen)
    steady = trainer.throughput.steady_rate(history)
    if steady is not None:
        log.info(
            "[train] %d steps, %.0f tokens/s steady (median of the logs after the first), peak %.2f GiB"
            " (%.2f GiB after the first log)",
            trainer.state.global_step,
            steady,
            trainer.run_peak_gib(),
            steady_peak,
        )
    return {
        "train_loss": losses[-1] if losses else result.training_loss,
        "train_loss_first": losses[0] if losses else None,
        "train_steps": trainer.state.global_step,
        "train_tokens": tokens,
        "train_tokens_per_second": round((tokens - tokens_before) / seconds, 1) if seconds > 0 else None,
        "train_tokens_per_second_steady": steady,
        "train_first_step_seconds": trainer.throughput.first_step_seconds,
        "train_seconds": round(seconds, 2),
        "train_peak_memory_gib": round(trainer.run_peak_gib(), 3),
        "train_peak_memory_gib_steady": steady_peak,
        "train_precision": prec,
        "train_device": device,
        "train_world_size": trainer.args.world_size,
        "resumed_from_step": int(resume.name.split("-")[-1]) if resume is not None else None,
    }
