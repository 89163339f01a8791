"""Token datasets as flat numpy arrays and back: what map writes, pack reads, and pack writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

DATASET_DIR = "dataset"  # inside a stage's entry: the `datasets` folder written by save_to_disk


def flat_column(ds, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column, without going through Python lists."""
    column = ds.data.table.column(name).combine_chunks()
    if isinstance(column, pa.ChunkedArray):  # an empty table has no chunks to combine
        column = pa.array([], type=column.type)
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0]


def list_array(values: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))


def in_memory_dataset(columns: dict[str, pa.Array | list], fingerprint: str):
    """A `datasets.Dataset` over Arrow data. The fingerprint is given: without one, datasets hashes every byte of
    an in-memory table to make one — seconds for a large set, and the stage key already names the content."""
    import datasets
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(pa.table(columns)), fingerprint=fingerprint)


def save_columns(columns: dict[str, pa.Array], dest: Path, fingerprint: str) -> int:
    """Write list columns as a `datasets` dataset with save_to_disk; return the number of rows."""
    ds = in_memory_dataset(columns, fingerprint)
    ds.save_to_disk(str(dest))
    return len(ds)
