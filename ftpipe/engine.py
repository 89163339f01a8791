"""Plan and run a chain of cached stages. Knows the stage contract, never a stage by name.

A stage's key is the sha256 of its name, version, the config slice it reads (runtime-only keys dropped,
local paths replaced by their content hash), its upstream stages' keys. Same inputs → same key anywhere.
"""

from __future__ import annotations

import errno
import importlib.metadata
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import Timeout

from .cache import SHARED, Cache, sha256_of
from .errors import RESUMES, FtpipeError

log = logging.getLogger("ftpipe")

# Leaf names that tune how a stage runs, never what it produces; they stay out of every key.
RUNTIME_KEYS = frozenset({"num_proc", "num_workers", "log_level", "progress", "dataloader_workers"})
_LIBS = (
    "ftpipe",
    "torch",
    "transformers",
    "peft",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "deepspeed",
    "gguf",
)


@dataclass
class StageContext:
    cfg: dict[str, Any]  # the stage's slice of the resolved config, runtime keys included
    out: Path  # the only place the stage writes
    # upstream stage -> (its committed entry dir, the outputs it declares); read them with `input()`
    upstream: dict[str, tuple[Path, tuple[str, ...]]]
    shared: Path  # cache-wide folder for what outlives one entry: fetched wheels and GGUFs, compiled ops
    entry: Path | None = None  # where `out` will be once committed: for messages that name the final files
    # every stage upstream of this one, transitively: name -> (key, config slice); for provenance records,
    # never for reading config (that would be outside the stage's own slice)
    lineage: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)

    def input(self, stage: str, output: str) -> Path:
        """An upstream stage's declared output, as committed."""
        if stage not in self.upstream:
            raise KeyError(f"{stage!r} is not upstream of this stage (upstream: {sorted(self.upstream)})")
        entry, outputs = self.upstream[stage]
        if output not in outputs:
            raise KeyError(f"stage {stage!r} declares no output {output!r} (it declares {list(outputs)})")
        return entry / output


@dataclass(frozen=True)
class Stage:
    name: str
    version: str  # bump when the stage's output for the same inputs changes
    reads: tuple[str, ...]  # dotted config keys forming the slice
    run: Callable[[StageContext], dict[str, Any] | None]  # returns metrics for the manifest and run.json
    upstream: tuple[str, ...] = ()
    # files or folders the stage writes into its dir, the names downstream stages ask for (DVC's `outs`);
    # an output may be absent only if the stage lists it in `optional`
    outputs: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    path_keys: tuple[str, ...] = ()  # keys of `reads` that may name local files: hashed by content
    # the slice as the key sees it, where several settings give one result (e.g. the same global batch
    # split over more ranks); the stage still runs with the full slice
    key_view: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    resumable: bool = False  # keep <key>.tmp after a failure so a rerun can continue from it


@dataclass
class PlannedStage:
    stage: Stage
    key: str
    slice: dict[str, Any]
    key_material: dict[str, Any]
    hit: bool
    upstream_keys: dict[str, str] = field(default_factory=dict)
    upstream_outputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    lineage: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _put(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


def without_runtime_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_runtime_keys(v) for k, v in value.items() if k not in RUNTIME_KEYS}
    if isinstance(value, list):
        return [without_runtime_keys(v) for v in value]
    return value


def local_path(value: Any) -> Path | None:
    """The value as an existing local path, or None for hub ids, embedded names and the like."""
    if not isinstance(value, str) or not value or ":" in value.split("/")[0]:
        return None
    path = Path(value).expanduser()
    return path.resolve() if path.exists() else None


def slice_config(stage: Stage, cfg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted in stage.reads:
        _put(out, dotted, _get(cfg, dotted))
    return out


def plan(
    cfg: dict[str, Any],
    chain: Sequence[Stage],
    cache: Cache,
    aliases: dict[str, tuple[str, ...]] | None = None,
) -> list[PlannedStage]:
    """Keys and hit/miss for the requested stages plus everything upstream of them, in chain order.

    `aliases` names groups of stages a user may ask for by one word (`stages=[download]`)."""
    by_name = {s.name: s for s in chain}
    aliases = aliases or {}
    # `evaluate_chat` is accepted for `evaluate-chat`: Hydra users type underscores out of habit.
    asked = [name.replace("_", "-") for name in cfg.get("stages") or [s.name for s in chain]]
    wanted = {stage for name in asked for stage in aliases.get(name, (name,))}
    unknown = wanted - by_name.keys()
    if unknown:
        raise FtpipeError(
            f"config key `stages`: unknown stage(s) {sorted(unknown)}; available: "
            f"{[s.name for s in chain] + sorted(aliases)}"
        )
    todo = list(wanted)
    while todo:  # close over upstream dependencies
        for up in by_name[todo.pop()].upstream:
            if up not in wanted:
                wanted.add(up)
                todo.append(up)

    planned: dict[str, PlannedStage] = {}
    for stage in chain:
        if stage.name not in wanted:
            continue
        cfg_slice = slice_config(stage, cfg)
        hashed = without_runtime_keys(cfg_slice)
        for dotted in stage.path_keys:
            path = local_path(_get(cfg_slice, dotted))
            if path is not None:  # the key follows the content, not where it sits on this machine
                _put(hashed, dotted, {"content_sha256": cache.content_hash(path)})
        if stage.key_view is not None:
            hashed = stage.key_view(hashed)
        upstream_keys = {up: planned[up].key for up in stage.upstream}
        material = {
            "stage": stage.name,
            "version": stage.version,
            "config": hashed,
            "upstream": upstream_keys,
        }
        key = sha256_of(material)[:20]
        lineage: dict[str, tuple[str, dict[str, Any]]] = {}
        for up in stage.upstream:
            lineage.update(planned[up].lineage)
            lineage[up] = (planned[up].key, planned[up].slice)
        planned[stage.name] = PlannedStage(
            stage,
            key,
            cfg_slice,
            material,
            cache.has(stage.name, key),
            upstream_keys,
            {up: by_name[up].outputs for up in stage.upstream},
            lineage,
        )
    return list(planned.values())


def lib_versions() -> dict[str, str]:
    versions = {}
    for lib in _LIBS:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def run(steps: list[PlannedStage], cache: Cache) -> list[dict[str, Any]]:
    """Run each planned stage unless its entry exists; return one run.json row per stage."""
    rows = []
    for step in steps:
        name, key = step.stage.name, step.key
        started = time.time()
        hit = cache.has(name, key)
        if not hit:
            lock = cache.lock(name, key)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info("[%s] %s is being computed by another run; waiting for it", name, key)
                lock.acquire()
            try:
                hit = cache.has(name, key)  # the run we waited for may have committed it
                if not hit:
                    metrics = _execute(step, cache)
            finally:
                lock.release()
        if hit:
            cache.touch(name, key)
            metrics = cache.manifest(name, key).get("metrics", {})
        seconds = round(time.time() - started, 3)
        output = cache.entry_dir(name, key)
        log.info("[%s] %s in %.1fs → %s", name, "hit" if hit else "ran", seconds, output)
        rows.append(
            {"name": name, "key": key, "hit": hit, "seconds": seconds, "output": str(output), **metrics}
        )
    return rows


def _execute(step: PlannedStage, cache: Cache) -> dict[str, Any]:
    stage, key = step.stage, step.key
    tmp = cache.tmp_dir(stage.name, key)
    if tmp.exists() and not stage.resumable:
        shutil.rmtree(tmp)  # leftovers of a killed run
    tmp.mkdir(parents=True, exist_ok=True)
    upstream = {
        up: (cache.entry_dir(up, up_key), step.upstream_outputs[up])
        for up, up_key in step.upstream_keys.items()
    }
    log.info("[%s] miss: running into %s", stage.name, tmp)
    started = time.time()
    ctx = StageContext(
        cfg=step.slice,
        out=tmp,
        upstream=upstream,
        shared=cache.root / SHARED,
        entry=cache.entry_dir(stage.name, key),
        lineage=step.lineage,
    )
    try:
        metrics = stage.run(ctx) or {}
        missing = [o for o in stage.outputs if o not in stage.optional and not (tmp / o).exists()]
        if missing:
            raise FtpipeError(f"{stage.name}: finished without writing its declared output(s) {missing}")
        finished = time.time()
        manifest = {
            "stage": stage.name,
            "key": key,
            "version": stage.version,
            "key_material": step.key_material,
            "slice": step.slice,
            "libs": lib_versions(),
            "started": started,
            "finished": finished,
            "seconds": round(finished - started, 3),
            "metrics": metrics,
            "files": cache.file_record(tmp),  # [size, sha256] each: a hit checks sizes, `cache verify` hashes
        }
        cache.commit(stage.name, key, manifest)
    except BaseException as exc:
        full = isinstance(exc, Exception) and not isinstance(exc, FtpipeError) and _disk_full(exc, tmp)
        if not stage.resumable:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise FtpipeError(
                f"{stage.name}: the disk holding {cache.root} filled up while writing {tmp.name} "
                f"({type(exc).__name__}); free space there or point cache_dir= at a larger disk. {RESUMES}"
            ) from exc
        raise
    return metrics


def _disk_full(exc: Exception, path: Path) -> bool:
    """Whether `exc` came from a full disk. Libraries wrap a failed write their own way (safetensors raises
    SafetensorError "… No space left on device (os error 28)"), so the errno, the OS's words, and the disk
    itself (looked at before the partial output is removed and frees it again) all count."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
        return True
    try:
        return shutil.disk_usage(path).free < 1 << 20
    except OSError:
        return False
