"""Materialise a dataset's raw rows into a stage folder: local files as they are, others as JSONL."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from ..errors import FtpipeError
from ..models.sources import OFFLINE_HINT, hub_offline
from .embedded import EMBEDDED_SETS, write_embedded

DATA_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet"}
SPLIT_FILE = "split.json"


def materialize_dataset(cfg: dict[str, Any], dest: Path) -> dict[str, Any]:
    """Copy or fetch the rows of `cfg` (the `dataset` group) into `dest/raw/`, and choose the held-out rows.

    Local files are copied byte for byte so that row and line numbers in later messages match the user's file.
    """
    path: str = cfg["path"]
    raw = dest / "raw"
    raw.mkdir(parents=True)
    if path.startswith("embedded:"):
        which = path.removeprefix("embedded:")
        if which not in EMBEDDED_SETS:
            raise FtpipeError(f"dataset.path={path!r}: no such embedded set; there are {list(EMBEDDED_SETS)}")
        try:
            files = [write_embedded(which, cfg.get("name"), raw)]
        except ValueError as exc:
            raise FtpipeError(str(exc)) from None
        source = "embedded"
    elif (local := Path(path).expanduser()).exists():
        found = (
            [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.suffix in DATA_SUFFIXES)
        )
        if not found:
            raise FtpipeError(f"dataset.path={path!r}: no {sorted(DATA_SUFFIXES)} files there")
        for f in found:
            if f.suffix not in DATA_SUFFIXES:
                raise FtpipeError(f"dataset.path={path!r}: {f.name} is not one of {sorted(DATA_SUFFIXES)}")
        files = []
        for f in found:
            target = raw / (f.relative_to(local) if local.is_dir() else f.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            files.append(target)
        source = "local"
    elif path.startswith((".", "/", "~")):
        raise FtpipeError(f"dataset.path={path!r}: no such file or folder")
    else:
        files = [_hub_to_jsonl(path, cfg.get("split", "train"), raw)]
        source = "hub"

    n_rows = sum(count_rows(f) for f in files)
    eval_size = int(cfg.get("eval_size") or 0)
    if n_rows == 0:
        raise FtpipeError(f"dataset.path={path!r}: no rows in {', '.join(f.name for f in files)}")
    if eval_size >= n_rows:
        raise FtpipeError(f"dataset.eval_size={eval_size} but {path!r} has only {n_rows} rows")
    # Held-out rows are chosen by a fixed seed, so every run of the recipe evaluates on the same rows.
    held_out = sorted(random.Random(0).sample(range(n_rows), eval_size)) if eval_size else []
    (dest / SPLIT_FILE).write_text(
        json.dumps({"files": [str(f.relative_to(raw)) for f in files], "eval_rows": held_out})
    )
    return {
        "dataset_source": source,
        "rows": n_rows,
        "rows_train": n_rows - len(held_out),
        "rows_eval": len(held_out),
    }


def count_rows(path: Path) -> int:
    if path.suffix == ".jsonl":
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise FtpipeError(
                f"{path.name}:{exc.lineno}: broken JSON: {exc.msg} (column {exc.colno})"
            ) from None
        return len(data) if isinstance(data, list) else 1
    if path.suffix == ".csv":
        import csv

        with open(path, newline="") as fh:
            return max(sum(1 for _ in csv.reader(fh)) - 1, 0)
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _hub_to_jsonl(name: str, split: str, raw: Path) -> Path:
    if hub_offline():
        raise FtpipeError(
            f"dataset.path={name!r} is a hub name but HF_HUB_OFFLINE=1 (this machine is offline). {OFFLINE_HINT}"
        )
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise FtpipeError(
            f"dataset.path={name!r}: not a local file and the hub did not serve it "
            f"(offline or unknown name?): {type(exc).__name__}: {str(exc)[:300]}. {OFFLINE_HINT}"
        ) from None
    target = raw / f"{name.replace('/', '__')}.{split}.jsonl"
    ds.to_json(target, force_ascii=False)
    return target
