"""Helpers for train/convert/merge tests: a tiny model folder and a packed dataset in the pack stage's shape.

`pack_documents` reproduces the pack stage's contract (input_ids, labels, position_ids, doc_lens; several
documents per row; position_ids restart at 0; each document's first label is -100) so these tests do not
depend on the data stages.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

from ftpipe.engine import StageContext

TINY = {
    "path": "tiny:llama",
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
    },
    "trust_remote_code": False,
}

COLOURS = ["red", "green", "blue", "warm orange", "deep purple", "sky blue", "grass green", "pale pink"]


def tiny_model_dir(root: Path) -> Path:
    """download's output for model=tiny_llama, built once per cache root."""
    from ftpipe.models.sources import materialize_model

    dest = root / "download" / "model"
    if not (dest / "config.json").is_file():
        materialize_model(TINY, dest, root / "downloads")
    return dest


def chat_documents(tokenizer, n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of short prompt/answer exchanges; labels are -100 on the prompt."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        colour = rng.choice(COLOURS)
        prompt = tokenizer.encode(f"<|im_start|>user\n{colour}<|im_end|>\n<|im_start|>assistant\n")
        answer = tokenizer.encode(f"#{rng.randrange(16**6):06x}<|im_end|>\n")
        docs.append((prompt + answer, [-100] * len(prompt) + answer))
    return docs


def pack_documents(docs: list[tuple[list[int], list[int]]], max_length: int) -> dict[str, list]:
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "doc_lens": []}
    current: dict[str, list] = {k: [] for k in rows}

    def flush() -> None:
        if current["input_ids"]:
            for k in rows:
                rows[k].append(current[k])
            for k in current:
                current[k] = []

    for ids, labels in docs:
        ids, labels = ids[:max_length], labels[:max_length]
        if len(current["input_ids"]) + len(ids) > max_length:
            flush()
        current["input_ids"] += ids
        current["labels"] += [-100, *labels[1:]]
        current["position_ids"] += list(range(len(ids)))
        current["doc_lens"].append(len(ids))
    flush()
    return rows


def packed_dataset_dir(root: Path, model_dir: Path, n_docs: int = 48, max_length: int = 96) -> Path:
    """pack's output: a `dataset/` saved with save_to_disk."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    dest = root / "pack"
    if not (dest / "dataset").is_dir():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        Dataset.from_dict(pack_documents(chat_documents(tokenizer, n_docs), max_length)).save_to_disk(
            str(dest / "dataset")
        )
    return dest


def train_cfg(**train: Any) -> dict[str, Any]:
    """The train stage's config slice, with fast deterministic defaults for the tiny model."""
    base = {
        "method": "lora",
        "epochs": 1.0,
        "max_steps": 8,
        "micro_batch_size": 2,
        "grad_accum": 1,
        "save_steps": 4,
        "save_total_limit": 2,
        "logging_steps": 1,
        "precision": "fp32",
        "gradient_checkpointing": False,
        "loss": "answer_only",
        "sample_every": 0,
        "sample_max_new_tokens": 16,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "num_workers": 0,
    }
    lora = train.pop("lora", {})
    base.update(train)
    base["lora"].update(lora)
    return {
        "train": base,
        "optimizer": {
            "name": "adamw",
            "lr": 5e-3,
            "weight_decay": 0.0,
            "betas": [0.9, 0.999],
            "warmup_ratio": 0.0,
            "scheduler": "constant",
            "max_grad_norm": 1.0,
        },
        "seed": 42,
        "model": copy.deepcopy(TINY),
        "launcher": {
            "name": "local",
            "nproc_per_node": 1,
            "nnodes": 1,
            "rdzv_endpoint": None,
            "deepspeed": None,
        },
    }


def context(cfg: dict[str, Any], out: Path, inputs: dict[str, Path], cache_root: Path) -> StageContext:
    from ftpipe.cache import Cache

    out.mkdir(parents=True, exist_ok=True)
    return StageContext(cfg=cfg, out=out, inputs=inputs, cache=Cache(cache_root))


def chain_cfg(stages: list[str], n_docs: int = 48, **train_kw: Any) -> dict[str, Any]:
    """Config for train_worker's chain (stand-in download/pack, real train/convert/merge)."""
    from ftpipe.config import DatasetConfig, TemplateConfig

    template = {**TemplateConfig().__dict__, **_chatml()}
    dataset = {**DatasetConfig().__dict__, "path": "embedded:colorist", "format": "colors", "n_docs": n_docs}
    return {
        **train_cfg(**train_kw),
        "stages": stages,
        "dataset": dataset,
        "template": template,
        "merge": {"max_shard_size": "2GB", "dtype": "auto"},
    }


def _chatml() -> dict[str, Any]:
    import yaml

    from ftpipe.paths import CONF_DIR

    return yaml.safe_load((CONF_DIR / "template" / "chatml.yaml").read_text())
