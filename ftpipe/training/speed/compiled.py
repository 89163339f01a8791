"""The compile lever (`train.speed.compile`): the process settings for torch.compile'd decoder layers (the
layers themselves are wrapped by `checkpointing.wrap_layers`) and the host-side quiet they need."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .policy import Levers


def set_allocator() -> None:
    """Grow allocator segments in place instead of cudaMalloc/cudaFree churn: the offloaded checkpoint's
    side-stream copies (record_stream) and 4-bit dequantized weights free blocks out of order. Before loading."""
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError):  # a torch without the setting: the default allocator
        pass


def configure(levers: Levers, layers: int) -> None:
    """dynamo's cache for one graph per layer variant, and the partitioner's activation budget."""
    import torch._dynamo as dynamo
    import torch._functorch.config as functorch_config

    # All layers share one code object (and so one cache): an entry per layer, grad mode (a checkpoint's
    # forward runs without grad, its recompute with) and branch (a long document's attention and chunked MLP
    # break the graph, whose resume function is shared again). A full cache falls back to eager: a 32-layer
    # Llama-3.1-8B over 64 entries ran part of its later layers uncompiled.
    per_code = max(64, 8 * layers)
    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, per_code)
    dynamo.config.accumulated_cache_size_limit = max(dynamo.config.accumulated_cache_size_limit, 2 * per_code)
    # Read when the layers compile (at the first step): below 1.0 the partitioner recomputes the cheapest
    # activations (elementwise ops first) in backward instead of keeping them.
    functorch_config.activation_memory_budget = levers.activation_budget or 1.0


# Under the build dir (fit.build_env): an empty file per set of graphs a finished run compiled into its cache;
# removing the build dir removes both.
COMPILED_MARKS = "compiled"


def compiled_mark(
    build_dir: Path,
    levers: Levers,
    model_dir: Path,
    train_cfg: dict[str, Any],
    micro_batch: tuple[int, int],
    precision: str,
) -> Path:
    """Where a run marks its graphs as compiled into the build dir's cache: one file per set of what decides
    them (the levers, the model's config, the method and adapter settings, the micro-batch's rows x tokens,
    the precision, ftpipe's, torch's and triton's versions). A factor left out would only make a cold start
    compile in one process; one too many, a warm start keep the pool."""
    from ... import __version__

    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    config_json = model_dir / "config.json"
    key = {
        "versions": [__version__, torch.__version__, triton],
        "levers": dataclasses.asdict(levers),
        "model": config_json.read_text() if config_json.is_file() else str(model_dir),
        "method": train_cfg["method"],
        "lora": train_cfg.get("lora"),
        "micro_batch": list(micro_batch),
        "precision": precision,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return build_dir / COMPILED_MARKS / digest


def load_compiled_in_process(mark: Path) -> bool:
    """On a warm start (`mark` exists: these graphs were compiled into this cache before) every kernel comes
    from the cache, and inductor's pool of compile workers (a process per core, each importing torch, started
    at the first compilation) would only compete with the run for the host: without it the first step of a
    warm Llama-3.2-1B LoRA run came 0.6-1.0 s sooner on an H200 machine. A cold start keeps the pool, which
    compiles the kernels in parallel. True when set; the user's own TORCHINDUCTOR_COMPILE_THREADS wins."""
    if not mark.exists() or "TORCHINDUCTOR_COMPILE_THREADS" in os.environ:
        return False
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    return True


def compiled_layer(layer_forward: Callable) -> Callable:
    """A decoder layer's forward, torch.compile'd so that every layer runs one graph of every length."""
    # the outer wrapper may hand a new (detached) tensor on: the inner one marks what the graph receives
    return one_graph_per_grad_mode(dynamic_in_length(torch.compile(layer_forward)))


def one_graph_per_grad_mode(run: Callable) -> Callable:
    """Every layer's hidden states need grad exactly when grad is on. The first layer's input (the frozen
    embeddings' output) needs none, and dynamo guards on the flag: that layer compiled a graph of its own (2
    graphs for a model's layers, 4 under a checkpoint's no-grad forward and recompute), each traced again at
    every warm start. The price of one graph is the first layer's input gradient: the backward of its q/k/v
    projections' input and its norm (about a tenth of one layer's backward GEMMs), and a leaf's gradient freed
    with the graph. Under no grad (a checkpoint's first forward) the input is only detached: nothing to pay."""

    def call(*args: Any, **kwargs: Any) -> Any:
        grad = torch.is_grad_enabled()
        if args and torch.is_tensor(args[0]) and args[0].requires_grad != grad:
            args = (args[0].detach().requires_grad_(grad), *args[1:])
        elif torch.is_tensor(hidden := kwargs.get("hidden_states")) and hidden.requires_grad != grad:
            kwargs["hidden_states"] = hidden.detach().requires_grad_(grad)
        return run(*args, **kwargs)

    return call


def dynamic_in_length(run: Callable) -> Callable:
    """A compiled layer whose graph is generic in the sequence length from its first call: every dimension of
    its tensor arguments as long as the hidden states' token dimension (hidden states, rotary cos/sin, a mask)
    and the document boundaries are marked dynamic. Without it the first batch compiles a graph for its exact
    length and the second compiles again, generic (dynamo's automatic dynamic shapes): two compilations
    before training runs, of which the compile cache (fit.build_env) serves only the first from disk.
    `maybe_`: a dimension the graph specializes anyway stays static instead of failing."""
    mark = torch._dynamo.maybe_mark_dynamic

    def call(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if torch.is_tensor(hidden) and hidden.dim() == 3:
            tokens = hidden.shape[1]
            for value in (*args, *kwargs.values()):
                for t in value if isinstance(value, tuple) else (value,):  # position_embeddings: (cos, sin)
                    if torch.is_tensor(t):
                        for dim, size in enumerate(t.shape):
                            if size == tokens:
                                mark(t, dim)
            for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
                if torch.is_tensor(cu := kwargs.get(name)):
                    mark(cu, 0)
        return run(*args, **kwargs)

    return call


class QuietGC(TrainerCallback):
    """Trainer callback: no full Python garbage collections in the middle of steps. A generation-2 collection
    walks every live object (transformers, dynamo caches: millions) and stalls the host for tens of ms, while
    the GPU, fed just-in-time by the compiled layers, runs dry: the slow outlier steps of the bench. Objects
    alive at the start are frozen out of collection; young generations are collected every `every` steps."""

    def __init__(self, every: int = 50) -> None:
        self.every = every

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        gc.collect()
        gc.freeze()
        gc.disable()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every == 0:
            gc.collect(1)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        gc.enable()
        gc.unfreeze()
