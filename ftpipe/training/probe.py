"""`ftpipe probe`: the longest single sequence a config trains on this machine, found by trying it.

The model is built as the train stage builds it (same levers, resolved for the longest length tried), then
whole training steps (forward, backward, optimizer step) run on one document of random tokens, doubling its
length until a step runs out of memory or the limit is reached, then bisecting between the longest that fit
and the shortest that did not. One timed step per length, after one untimed step that compiles the layers (they
are generic in the length from then on: speed.compiled.dynamic_in_length); it runs at the first length or, if
shorter, at the shortest length that takes the long-sequence branches (one-document attention, chunked MLP), so
probing 256k tokens does not spend a 256k-token step on compiling. A timed step during which anything was
compiled says so (`compiled`).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("ftpipe")


@dataclass
class Attempt:
    tokens: int
    fits: bool
    peak_gib: float | None = None
    step_seconds: float | None = None
    compiled: bool = False  # the timed step compiled a graph: its time holds the compilation

    @property
    def tokens_per_second(self) -> float | None:
        return round(self.tokens / self.step_seconds, 1) if self.fits and self.step_seconds else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def search(step: Callable[[int], Attempt], start: int, limit: int, resolution: int) -> list[Attempt]:
    """Try `start`, doubling up to `limit`; then bisect between the longest length that fit and the shortest
    that did not, to `resolution` tokens (lengths are multiples of it). Returns the attempts in order."""
    attempts: list[Attempt] = []
    fit_len, fail_len = 0, None
    length = min(limit, max(resolution, start // resolution * resolution))
    while True:
        attempt = step(length)
        attempts.append(attempt)
        if not attempt.fits:
            fail_len = length
            break
        fit_len = length
        if length >= limit:
            return attempts
        length = min(limit, length * 2)
    while fail_len - fit_len > resolution:
        mid = (fit_len + fail_len) // 2 // resolution * resolution
        if mid <= fit_len:
            break
        attempt = step(mid)
        attempts.append(attempt)
        fit_len, fail_len = (mid, fail_len) if attempt.fits else (fit_len, mid)
    return attempts


def longest(attempts: list[Attempt]) -> Attempt | None:
    fitting = [a for a in attempts if a.fits]
    return max(fitting, key=lambda a: a.tokens) if fitting else None


def build_optimizer(params: list[Any], opt: dict[str, Any], device: str) -> Any:
    """The optimizer the train stage's Trainer builds for `optimizer` (its class from transformers, so the
    probe measures the states a run will hold)."""
    from transformers import Trainer, TrainingArguments

    from .fit import optimizer_arguments

    args = TrainingArguments(**optimizer_arguments(opt, device), use_cpu=device == "cpu", report_to="none")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return cls(params, **kwargs)


def probe(
    model_dir: Path, cfg: dict[str, Any], start: int, limit: int, resolution: int = 1024
) -> list[Attempt]:
    """Attempts for the train config `cfg` (the resolved config: train, optimizer, seed, model) on model_dir."""
    import torch

    from . import speed
    from .collator import PackedCollator
    from .devices import autocast_dtype, precision, train_device
    from .model import QUANTIZED, load_for_training
    from .speed.attention import LONG_DOCUMENT
    from .speed.loss import training_loss

    # The frozen prefix caches the bottom layers' output of each dataset row; a probe's rows are new each time.
    train_cfg = {**cfg["train"], "speed": {**cfg["train"]["speed"], "frozen_prefix": "off"}}
    device = train_device()
    prec = precision(train_cfg, device)
    torch.manual_seed(cfg["seed"])
    levers = speed.resolve(train_cfg, device, micro_batch_tokens=limit)
    log.info("[probe] levers for %d tokens: %s", limit, levers)
    model = load_for_training(model_dir, train_cfg, levers, bool(cfg["model"]["trust_remote_code"]))
    if train_cfg["method"] not in QUANTIZED:  # quantized ones were loaded onto the GPU (device_map)
        model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg["optimizer"], device)
    collator = PackedCollator(**speed.collator_kwargs(levers))
    vocab = model.config.vocab_size
    positions = getattr(model.config, "max_position_embeddings", None)
    cast = autocast_dtype(prec)
    cuda = device == "cuda"
    warm = [False]  # the first step compiles the layers
    # longer than a chunk of the MLP and a long document, so the timed lengths take no branch it did not compile
    warm_up_tokens = 2 * max(LONG_DOCUMENT, levers.mlp_chunk_tokens)

    def one_step(batch: dict[str, Any]) -> None:
        with torch.autocast(device, dtype=cast or torch.float32, enabled=cast is not None):
            loss, _ = training_loss(model, batch, batch["input_ids"].shape[1] - 1, speed.loss_mode(levers))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def document(tokens: int) -> dict[str, Any]:
        ids = torch.randint(0, vocab, (tokens,))
        row = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(tokens)}
        return {
            k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in collator([row]).items()
        }

    def step(tokens: int) -> Attempt:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            if not warm[0]:  # untimed: it compiles
                one_step(document(min(tokens, warm_up_tokens)))
                warm[0] = True
            batch = document(tokens)
            graphs = _graphs_compiled()
            if cuda:
                torch.cuda.synchronize()
            began = time.perf_counter()
            one_step(batch)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - began
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            attempt = Attempt(tokens, fits=False)
        else:
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            attempt = Attempt(
                tokens,
                True,
                round(peak, 2) if peak is not None else None,
                round(seconds, 3),
                compiled=_graphs_compiled() != graphs,
            )
        batch = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        beyond = f" (beyond the model's {positions} positions)" if positions and tokens > positions else ""
        if attempt.fits:
            peak_text = f"peak {attempt.peak_gib:.2f} GiB, " if attempt.peak_gib is not None else ""
            log.info(
                "[probe] %d tokens%s: fits, %s%.2f s a step, %.0f tokens/s%s",
                tokens,
                beyond,
                peak_text,
                attempt.step_seconds,
                attempt.tokens_per_second,
                " (the step compiled a graph: its time holds that)" if attempt.compiled else "",
            )
        else:
            log.info("[probe] %d tokens%s: out of memory", tokens, beyond)
        return attempt

    return search(step, start, limit, resolution)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
