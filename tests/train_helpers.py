"""Helpers for train/convert/merge tests: a tiny model folder and a packed dataset in the pack stage's shape.

`pack_documents` reproduces the pack stage's contract (input_ids, labels, position_ids, doc_lens; several
documents per row; position_ids restart at 0; each document's first label is -100) so these tests do not
depend on the data stages.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ftpipe.data.info import DataInfo
from ftpipe.training.fit import TrainJob

COLOURS = ["red", "green", "blue", "warm orange", "deep purple", "sky blue", "grass green", "pale pink"]


def tiny_model_dir(root: Path) -> Path:
    """download's output for model=tiny_llama, built once per cache root."""
    from ftpipe.models.sources import materialize_model

    dest = root / "download-model" / "model"
    if not (dest / "config.json").is_file():
        materialize_model(composed()["model"], dest, root / "downloads")
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


# Fast deterministic settings for the tiny model, as overrides of the real composed config.
TRAIN_OVERRIDES = (
    "model=tiny_llama",
    "train.max_steps=8",
    "train.micro_batch_size=2",
    "train.save_steps=4",
    "train.logging_steps=1",
    "train.precision=fp32",
    "train.sample_max_new_tokens=16",
    "train.lora.r=8",
    "train.lora.alpha=16",
    "optimizer.lr=5e-3",
    "optimizer.warmup_ratio=0",
    "optimizer.scheduler=constant",
)


def composed(*overrides: str, **train: Any) -> dict[str, Any]:
    """The resolved config a user gets from these overrides (train keys as keywords), through Hydra."""
    from ftpipe.config import compose, validate

    return validate(compose([*TRAIN_OVERRIDES, *overrides, *(f"train.{k}={v}" for k, v in train.items())]))


def train_cfg(*overrides: str, **train: Any) -> dict[str, Any]:
    """The train stage's config slice, composed from the real config with the fast settings above."""
    from ftpipe.engine import slice_config
    from ftpipe.stages import train as train_stage

    return slice_config(train_stage.STAGE, composed(*overrides, **train))


def data_info(root: Path) -> Path:
    """map's data.json for the chat documents: no system prompt, a few colour names to sample replies for."""
    path = root / "map" / "data.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        DataInfo(format="colors", system=None, held_out=[], sample_inputs=COLOURS[:3], answers=[]).write(
            path.parent
        )
    return path


def job(cfg: dict[str, Any], out: Path, model_dir: Path, pack_dir: Path) -> TrainJob:
    """A training job over the fixtures (as the train stage builds it from its inputs)."""
    out.mkdir(parents=True, exist_ok=True)
    return TrainJob(cfg, model_dir, pack_dir / "dataset", data_info(pack_dir.parent), out)


def chain_cfg(stages: list[str], n_docs: int = 48, **train_kw: Any) -> dict[str, Any]:
    """Config for train_worker's chain (stand-in download-model/map/pack, real train/convert/merge): the default
    config (colorist data, chatml) on the tiny model; `dataset.n_docs` sizes the stand-in packed dataset."""
    cfg = composed(**train_kw)
    cfg["dataset"]["n_docs"] = n_docs
    return {**cfg, "stages": stages}
