"""pack: tokenised documents → rows of ≤ `dataset.max_length` tokens, with per-document position ids.

Reads only length and packing keys, so changing the template or the data format never reaches its key except
through map's. Output columns: input_ids, labels, position_ids, doc_lens (see data/packing.py for the label
contract with train).
"""

from __future__ import annotations

from typing import Any

from ..data.arrow import DATASET_DIR, flat_column, list_array, save_columns
from ..data.formats import PREFERENCE_FORMAT
from ..data.info import DATA_INFO, DataInfo
from ..data.packing import pack
from ..engine import Stage, StageContext
from ..errors import FtpipeError


def run(ctx: StageContext) -> dict[str, Any]:
    import datasets

    cfg = ctx.cfg["dataset"]
    docs = datasets.load_from_disk(str(ctx.input("map", DATASET_DIR)))
    ids, offsets = flat_column(docs, "input_ids")
    labels, label_offsets = flat_column(docs, "labels")
    assert (offsets == label_offsets).all(), "map wrote input_ids and labels of different lengths"
    # preference pairs (map writes chosen, rejected alternating) are packed as units: data/packing.py
    pairs = DataInfo.read(ctx.input("map", DATA_INFO)).format == PREFERENCE_FORMAT
    packed = pack(ids, labels, offsets, int(cfg["max_length"]), bool(cfg["pack"]), cfg["truncation"], pairs)
    if packed.metrics["documents"] == 0 and cfg["truncation"] == "drop":
        raise FtpipeError(
            f"pack: all {packed.metrics['documents_in']} samples are longer than dataset.max_length="
            f"{cfg['max_length']} and truncation=drop leaves them out; raise max_length, or set "
            "dataset.truncation=truncate (or split)"
        )
    if packed.metrics["documents"] == 0:
        raise FtpipeError(
            f"pack: none of the {packed.metrics['documents_in']} samples has a token to train on after cutting "
            f"them to dataset.max_length={cfg['max_length']} (truncation={cfg['truncation']}); raise max_length"
        )
    save_columns(
        {
            "input_ids": list_array(packed.input_ids, packed.row_offsets),
            "labels": list_array(packed.labels, packed.row_offsets),
            "position_ids": list_array(packed.position_ids, packed.row_offsets),
            "doc_lens": list_array(packed.doc_lens, packed.doc_offsets),
        },
        ctx.out / DATASET_DIR,
        fingerprint=f"ftpipe-pack-{ctx.out.name}",
    )
    return {**packed.metrics, "max_length": int(cfg["max_length"]), "packed": bool(cfg["pack"])}


STAGE = Stage(
    name="pack",
    version="1",
    reads=("dataset.max_length", "dataset.pack", "dataset.truncation"),
    upstream=("map",),  # its dataset, and its data.json (preference pairs or not)
    outputs=(DATASET_DIR,),
    run=run,
)
