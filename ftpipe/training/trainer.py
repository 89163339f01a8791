"""HF Trainer glue: the loss path (speed/loss.py), throughput/memory logging, checkpoint discovery for resume."""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .devices import peak_memory_gib, reset_peak_memory
from .objectives import PreferenceLoss, count_pairs
from .speed.loss import training_loss

log = logging.getLogger("ftpipe")


class Throughput(TrainerCallback):
    """Marks time and tokens at train start and at each log, so logs can carry tokens/s since the last one; and
    how long the run took from `started` (the train stage's start) to its first optimizer step: model loading,
    compilation (or its cache) and the first step, what a user waits for before training runs."""

    def __init__(self, started: float | None = None) -> None:
        self.started = time.perf_counter() if started is None else started
        self.mark: tuple[float, int] | None = None
        self.start: tuple[float, int] | None = None
        self.first_step_seconds: float | None = None
        self.loop_began: float | None = None  # seconds from `started` to the training loop (model, optimizer)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.mark = (time.perf_counter(), state.num_input_tokens_seen)
        self.loop_began = self.start[0] - self.started

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_seconds is None:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # once: the step's kernels have run, not only been queued
            self.first_step_seconds = round(time.perf_counter() - self.started, 2)
            if state.is_world_process_zero:
                log.info(
                    "[train] first optimizer step (step %d) %.1f s after the train stage started, %.1f s after"
                    " the training loop began%s",
                    state.global_step,
                    self.first_step_seconds,
                    self.first_step_seconds - self.loop_began,
                    compile_cache_note(),
                )
                if line := graph_break_warning():
                    log.warning(line)

    @staticmethod
    def steady_rate(history: list[dict[str, Any]]) -> float | None:
        """Median tokens/s of the logs after the first (which holds compilation and warm-up): the rate a
        long run trains at."""
        rates = [row["tokens_per_second"] for row in history if "tokens_per_second" in row][1:]
        return round(statistics.median(rates), 1) if rates else None

    def rate(self, tokens_now: int) -> float | None:
        if self.mark is None:
            return None
        now = time.perf_counter()
        seconds, tokens = now - self.mark[0], tokens_now - self.mark[1]
        self.mark = (now, tokens_now)
        return tokens / seconds if seconds > 0 else None


def compile_cache_note() -> str:
    """How the compiled graphs so far came about (what makes a warm start warm): inductor's and AOTAutograd's
    cache hits and misses; empty when nothing was compiled."""
    import sys

    if "torch._dynamo" not in sys.modules:
        return ""
    from torch._dynamo.utils import counters

    graphs = counters["stats"].get("unique_graphs", 0)
    if not graphs:
        return ""
    inductor, aot = counters["inductor"], counters["aot_autograd"]
    return (
        f" ({graphs} graphs; compile cache: inductor {inductor.get('fxgraph_cache_hit', 0)} hits /"
        f" {inductor.get('fxgraph_cache_miss', 0)} misses, autograd {aot.get('autograd_cache_hit', 0)} /"
        f" {aot.get('autograd_cache_miss', 0)}{compile_seconds_note()})"
    )


# ftpipe's parts that run eagerly on purpose (`torch.compiler.disable`: a long document's attention, MLP chunks)
DELIBERATE_BREAK = "Skip calling `torch.compiler.disable()`d function"


def graph_break_warning() -> str | None:
    """One line for the graph breaks so far other than ftpipe's deliberate ones, or None. A break costs speed
    and memory, and can come from one torch release's dynamo alone: torch 2.11's broke every decoder layer at
    `function.__get__`, which the CPU tests' torch traces (docs/performance.md, c32)."""
    import sys

    if "torch._dynamo" not in sys.modules:
        return None
    from torch._dynamo.utils import counters

    breaks = {why: n for why, n in counters["graph_break"].items() if not why.startswith(DELIBERATE_BREAK)}
    if not breaks:
        return None
    first = next(iter(breaks)).splitlines()[0]
    return (
        f"[train] the compiled layers broke their graphs {sum(breaks.values())} time(s), first at: {first}; "
        "each break costs speed and memory (TORCH_LOGS=graph_breaks shows where)"
    )


# torch's own timers of a compilation (`torch._dynamo.utils.compilation_time_metrics`), as the log names them
COMPILE_PHASES = (
    ("_compile.compile_inner", "compiling"),
    ("bytecode_tracing", "tracing"),
    ("inductor_codecache_torch_key", "hashing torch"),
    ("AOTAutogradCache.inductor_load", "loading from the cache"),
    ("async_compile.wait", "waiting for kernels"),
    ("backward._backward_impl", "compiling backward"),
)


def compile_seconds_note() -> str:
    """Where the compilation's seconds went, e.g. "; compiling 2.1 s: tracing 1.0 s, loading from the cache
    0.6 s"; empty without torch's timers (older releases)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return ""
    seconds = {label: sum(compilation_time_metrics.get(key, ())) for key, label in COMPILE_PHASES}
    (total_label, total), *parts = seconds.items()
    if not total:
        return ""
    detail = ", ".join(f"{label} {value:.1f} s" for label, value in parts if value >= 0.05)
    return f"; {total_label} {total:.1f} s" + (f": {detail}" if detail else "")


class FtTrainer(Trainer):
    """Trainer with ftpipe's loss choice and extra scalars (tokens/s, the window's peak memory) in every
    training log."""

    def __init__(
        self,
        *args: Any,
        loss_mode: str = "answer_only",
        device: str = "cpu",
        frozen_prefix: Any = None,  # speed.frozen_prefix.FrozenPrefix: batches then carry cached hidden states
        preference: PreferenceLoss | None = None,
        started: float | None = None,  # time.perf_counter() at the train stage's start
        **kwargs: Any,
    ):
        self.frozen_prefix = frozen_prefix
        super().__init__(*args, **kwargs)
        self.loss_mode = loss_mode
        self.preference = preference  # train.objective dpo | orpo; None: the SFT loss
        self.device_kind = device
        # Both loss paths divide by num_items_in_batch themselves, so Trainer must compute it and must not
        # divide again by the accumulation steps: this keeps grad accumulation equal to one big batch.
        self.model_accepts_loss_kwargs = True
        self.throughput = Throughput(started)
        self.peak_gib = 0.0  # the run's peak so far, over the log windows
        self.add_callback(self.throughput)

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Count tokens from the batch's shape on the host. Trainer's own version builds a device tensor and
        reads it back (`.item()`), a GPU sync every micro-batch that stalls the queue. Packed rows have no
        padding and every rank the same shape, so numel x ranks is exact."""
        if self.args.include_num_input_tokens_seen in (False, "no"):
            return
        self.state.num_input_tokens_seen += inputs["input_ids"].numel() * self.accelerator.num_processes

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Trainer's FLOs estimate (6 x tokens x parameters), with the parameter count taken once: the stock
        version recounts every parameter of the model (named_modules + named_parameters walks) each micro-batch,
        on the training loop's thread between enqueueing one step and the next."""
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
        if not torch.is_tensor(ids):
            return super().floating_point_ops(inputs)
        if getattr(self, "_flos_per_token", None) is None:
            self._flos_per_token = super().floating_point_ops(
                {"input_ids": torch.zeros(1, 1, dtype=torch.long)}
            )
        return self._flos_per_token * ids.numel()

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        """Preference objectives divide by the pairs of the accumulated batch (their losses are per pair), as
        the SFT loss divides by its trained tokens; summed over ranks as Trainer sums the token counts."""
        if self.preference is None:
            return super()._get_num_items_in_batch(batch_samples, device)
        pairs = torch.tensor(sum(count_pairs(b["position_ids"]) for b in batch_samples))
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            pairs = self.accelerator.gather(pairs.to(device)).sum()
        return pairs.to(device)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        if self.preference is not None:
            loss, outputs = self.preference(model, inputs, num_items_in_batch), None
        else:
            if self.frozen_prefix is not None:
                inputs = self.frozen_prefix.inputs(inputs)
            loss, outputs = training_loss(model, inputs, num_items_in_batch, self.loss_mode)
        if (
            self.args.average_tokens_across_devices
            and num_items_in_batch is not None
            and self.accelerator.num_processes > 1
        ):
            # num_items_in_batch was summed over ranks; DDP averages gradients, so undo that mean.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def run_peak_gib(self) -> float:
        """The whole run's peak memory (loading, compilation and every step)."""
        return max(self.peak_gib, peak_memory_gib(self.device_kind))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            rate = self.throughput.rate(self.state.num_input_tokens_seen)
            if rate is not None:
                logs["tokens_per_second"] = round(rate, 1)
            # each log's peak is its own window's (the first holds loading and compilation)
            peak = peak_memory_gib(self.device_kind)
            self.peak_gib = max(self.peak_gib, peak)
            logs["peak_memory_gib"] = round(peak, 3)
            reset_peak_memory(self.device_kind)
            if self.preference is not None:
                logs.update(self.preference.pop_logs())
        super().log(logs, start_time)


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoints whose trainer_state.json (written last by Trainer) is readable, oldest first."""
    found = []
    for path in checkpoint_dir.glob("checkpoint-*"):
        try:
            step = int(path.name.split("-")[-1])
            json.loads((path / "trainer_state.json").read_text())
        except (ValueError, OSError):
            continue
        found.append((step, path))
    return [p for _, p in sorted(found)]


def last_checkpoint(checkpoint_dir: Path, prune: bool = True) -> Path | None:
    """The newest complete checkpoint; with `prune` (one process per run does it) half-written ones (a kill
    during save) are removed, so Trainer's rotation never counts them."""
    if not checkpoint_dir.is_dir():
        return None
    complete = complete_checkpoints(checkpoint_dir)
    for path in checkpoint_dir.glob("checkpoint-*") if prune else ():
        if path not in complete:
            log.warning("removing incomplete checkpoint %s (interrupted while saving)", path.name)
            shutil.rmtree(path, ignore_errors=True)
    return complete[-1] if complete else None
