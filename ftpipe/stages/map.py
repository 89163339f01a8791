"""map: the training rows → prompt template → `input_ids` + `labels` (−100 except on answers), no truncation;
a preference pair gives two rows, chosen then rejected; and `data.json`, what later stages need to know about the data (data/info.py).

Length limits belong to pack, so changing `dataset.max_length` or packing never retokenises. Held-out rows
(split.json's eval_rows) are left out here; evaluation reads them with formats.load_conversations.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import numpy as np
import pyarrow as pa

from ..data.arrow import DATASET_DIR, in_memory_dataset, list_array
from ..data.formats import PREFERENCE_FORMAT, load_conversations, pair_conversations
from ..data.info import DATA_INFO, DataInfo
from ..data.labels import IGNORE_INDEX
from ..data.templates import encode, resolve_template
from ..engine import Stage, StageContext

log = logging.getLogger("ftpipe")

# Below this many rows, starting worker processes costs more than it saves.
PARALLEL_MIN_ROWS = 20_000
BATCH_SIZE = 1000


def _table(ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> pa.Table:
    # handing Arrow flat arrays skips converting millions of Python ints one list at a time
    return pa.table({"input_ids": list_array(ids, offsets), "labels": list_array(labels, offsets)})


def _columns(conversations: list[list[dict[str, Any]]]) -> dict[str, list]:
    # Conversations as lists of strings: Arrow builds and hands back string lists far faster than structs.
    return {
        "systems": [[t.get("system") or "" for t in conv] for conv in conversations],
        "inputs": [[t["input"] for t in conv] for conv in conversations],
        "outputs": [[t["output"] for t in conv] for conv in conversations],
        "char_level": [bool(conv[0].get("char_level")) for conv in conversations],
        "masked": [[bool(t.get("masked")) for t in conv] for conv in conversations],
    }


def _conversations(batch: dict[str, list]) -> list[list[dict[str, Any]]]:
    return [
        [
            {"system": s, "input": i, "output": o, "char_level": c, "masked": m}
            for s, i, o, m in zip(systems, inputs, outputs, masked, strict=True)
        ]
        for systems, inputs, outputs, c, masked in zip(
            batch["systems"],
            batch["inputs"],
            batch["outputs"],
            batch["char_level"],
            batch["masked"],
            strict=True,
        )
    ]


def _encode(
    batch: dict[str, list], tokenizer: Any, template: dict, format: str, train_on_inputs: bool
) -> pa.Table:
    return _table(*encode(tokenizer, template, _conversations(batch), format, train_on_inputs))


def _map(rows, fn, kwargs: dict, features, num_proc: int, key: str):
    return rows.map(
        fn,
        batched=True,
        batch_size=BATCH_SIZE,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs=kwargs,
        remove_columns=rows.column_names,
        features=features,
        new_fingerprint=f"ftpipe-map-{key}",  # the stage key already names the content
        desc="map: tokenise",
    )


def run(ctx: StageContext) -> dict[str, Any]:
    import datasets
    from transformers import AutoTokenizer

    cfg = ctx.cfg["dataset"]
    tokenizer = AutoTokenizer.from_pretrained(ctx.input("download-model", "model"))
    template = resolve_template(ctx.cfg["template"], tokenizer)
    train, held_out, report = load_conversations(ctx.input("download-data", "data"), cfg)
    DataInfo.of(report["format"], train, held_out).write(ctx.out)

    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
        }
    )
    pairs = report["format"] == PREFERENCE_FORMAT
    # A preference pair becomes two documents, chosen then rejected, always in that order (pack keeps them
    # together, and the preference objectives read documents 2k, 2k+1 as pair k).
    docs = [side for conv in train for side in pair_conversations(conv)] if pairs else train
    rows = in_memory_dataset(_columns(docs), f"ftpipe-rows-{ctx.out.name}")
    kwargs = {
        "tokenizer": tokenizer,
        "template": template,
        "format": report["format"],
        "train_on_inputs": bool(cfg.get("train_on_inputs")),
    }
    num_proc = max(1, int(cfg.get("num_proc") or 1)) if len(rows) >= PARALLEL_MIN_ROWS else 1
    if num_proc > 1:
        # Workers then receive memory-mapped files instead of pickled copies of the rows, and each runs the
        # tokenizer on one thread: num_proc processes already fill the cores.
        rows.save_to_disk(str(ctx.out / "rows.tmp"))
        rows = datasets.load_from_disk(str(ctx.out / "rows.tmp"))
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    if num_proc > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tokens = _map(rows, _encode, kwargs, features, num_proc, ctx.out.name)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    tokens.save_to_disk(str(ctx.out / DATASET_DIR))

    lengths = tokens.data.table.column("input_ids").combine_chunks().value_lengths().to_numpy()
    n_tokens = int(lengths.sum())
    loss_tokens = sum(
        int((chunk.flatten().to_numpy() != IGNORE_INDEX).sum())
        for chunk in tokens.data.table.column("labels").chunks
    )
    del tokens, rows
    shutil.rmtree(ctx.out / "rows.tmp", ignore_errors=True)  # the rows and the workers' shards
    return {
        **report,
        "tokens": n_tokens,
        "loss_tokens": loss_tokens,
        "max_tokens": int(lengths.max()) if len(lengths) else 0,
        "template": template.get("name"),
        **({"pairs": len(train)} if pairs else {}),
    }


STAGE = Stage(
    name="map",
    version="2",  # 2: data.json; dataset.system replaces only the format's default prompt
    reads=(
        "dataset.format",
        "dataset.system",
        "dataset.train_on_inputs",
        "dataset.skip_bad_rows",
        "dataset.char_level_answers",
        "dataset.num_proc",
        "template",
    ),
    upstream=("download-model", "download-data"),
    outputs=(DATASET_DIR, DATA_INFO),
    run=run,
)
