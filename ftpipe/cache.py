"""The stage cache: content hashing, entry layout, manifests, per-key locks, listing and pruning.

Layout: ``<root>/<stage>/<key>/`` holds a finished entry; ``manifest.json`` is written last, so a folder
without one is not an entry. Work happens in ``<key>.tmp/`` and becomes the entry by one atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .errors import FtpipeError

log = logging.getLogger("ftpipe")

MANIFEST = "manifest.json"
# Beside the stage folders: what outlives one entry (fetched wheels and GGUFs, compiled ops and graphs); safe to
# delete, refetched or rebuilt when a run needs it.
SHARED = "shared"
_HASH_MEMO = "file-hashes.json"
# Entry folders are named by hex keys; anything else under a stage folder is not ours to list or delete.
_ENTRY_NAME = re.compile(r"[0-9a-f]+(\.tmp)?")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_of(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Cache:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise FtpipeError(
                f"cache_dir={self.root} is a file, not a folder; point cache_dir= elsewhere"
            ) from None
        except PermissionError:
            raise FtpipeError(
                f"cache_dir={self.root}: not allowed to create it; point cache_dir= elsewhere"
            ) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise FtpipeError(
                f"cache_dir={self.root} is not writable; point cache_dir= (or FTPIPE_CACHE) elsewhere"
            )

    # ---- layout -------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        path = self.root / stage
        if path.is_symlink():  # writing or deleting through it would touch files outside the cache
            raise FtpipeError(f"{path} is a symlink; the cache only works in real folders under {self.root}")
        return path

    def entry_dir(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / key

    def tmp_dir(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / f"{key}.tmp"

    def lock(self, stage: str, key: str) -> FileLock:
        self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.stage_dir(stage) / f"{key}.lock"))

    def has(self, stage: str, key: str) -> bool:
        """A committed entry whose files are all there with the sizes its manifest recorded (cheap: stat only);
        a damaged one counts as missing, so it is recomputed instead of used."""
        entry = self.entry_dir(stage, key)
        if not (entry / MANIFEST).is_file():
            return False
        damaged = self.damaged(entry, check_hashes=False)
        if damaged:
            log.warning("[%s] %s is damaged (%s); recomputing it", stage, key, damaged[0])
        return not damaged

    def damaged(self, entry: Path, check_hashes: bool = True) -> list[str]:
        """What differs from the manifest's record of the entry's files: missing, resized or (with
        `check_hashes`) changed files. Entries committed before files were recorded are taken as they are."""
        try:
            recorded = json.loads((entry / MANIFEST).read_text()).get("files") or {}
        except (OSError, json.JSONDecodeError) as exc:
            return [f"{MANIFEST} unreadable: {exc}"]
        problems = []
        for rel, (size, digest) in sorted(recorded.items()):
            path = entry / rel
            try:
                actual = path.stat().st_size
            except OSError:
                problems.append(f"{rel} is missing")
                continue
            if actual != size:
                problems.append(f"{rel} has {actual} bytes, {size} were committed")
            elif check_hashes and file_sha256(path) != digest:
                problems.append(f"{rel} changed after commit (sha256 differs)")
        return problems

    @staticmethod
    def file_record(folder: Path) -> dict[str, list]:
        """[size, sha256] of every file under `folder` (the manifest aside), by relative path."""
        return {
            str(f.relative_to(folder)): [f.stat().st_size, file_sha256(f)]
            for f in sorted(folder.rglob("*"))
            if f.is_file() and not f.is_symlink() and f.name != MANIFEST
        }

    def manifest(self, stage: str, key: str) -> dict[str, Any]:
        return json.loads((self.entry_dir(stage, key) / MANIFEST).read_text())

    def commit(self, stage: str, key: str, manifest: dict[str, Any]) -> Path:
        """Write the manifest last, then rename the tmp dir into place: the entry appears whole or not at all."""
        tmp, final = self.tmp_dir(stage, key), self.entry_dir(stage, key)
        part = tmp / f"{MANIFEST}.part"
        part.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(part, tmp / MANIFEST)
        if final.exists():  # a manifest-less leftover (e.g. deleted by hand) must not block the rename
            shutil.rmtree(final)
        os.rename(tmp, final)
        return final

    def touch(self, stage: str, key: str) -> None:
        """Mark an entry as used now, so `cache gc --older-than` keeps what runs still reuse."""
        os.utime(self.entry_dir(stage, key) / MANIFEST)

    # ---- content hashing ------------------------------------------------------------------------
    def content_hash(self, path: Path) -> str:
        """sha256 of a file, or of a folder's relative names and file contents.

        Memoised by (path, size, mtime) so large unchanged inputs are not re-read on every run; the memo
        only speeds things up, the recorded value is always a real content hash.
        """
        path = Path(path).resolve()
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        stamp = [
            (str(f.relative_to(path)) if f != path else "", f.stat().st_size, f.stat().st_mtime_ns)
            for f in files
        ]
        memo_key = sha256_of([str(path), stamp])
        memo = self._read_memo()
        if memo_key in memo:
            return memo[memo_key]
        digest = hashlib.sha256()
        for f, (rel, _, _) in zip(files, stamp, strict=True):
            digest.update(rel.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        value = digest.hexdigest()
        memo[memo_key] = value
        self._write_memo(memo)
        return value

    def _read_memo(self) -> dict[str, str]:
        try:
            return json.loads((self.root / _HASH_MEMO).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _write_memo(self, memo: dict[str, str]) -> None:
        tmp = self.root / f"{_HASH_MEMO}.{os.getpid()}"
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, self.root / _HASH_MEMO)

    # ---- inspection and pruning -----------------------------------------------------------------
    def entries(self) -> Iterator[CacheEntry]:
        """Entries and partial work held in real folders inside the root; symlinks are never followed."""
        for stage_dir in sorted(self.root.iterdir()):
            if not self._owned(stage_dir, self.root) or stage_dir.name.startswith("."):
                continue
            for d in sorted(stage_dir.iterdir()):
                if not self._owned(d, stage_dir) or not _ENTRY_NAME.fullmatch(d.name):
                    continue
                if (d / MANIFEST).is_file():
                    yield CacheEntry(stage_dir.name, d.name, d, "complete")
                elif d.name.endswith(".tmp"):
                    yield CacheEntry(stage_dir.name, d.name[: -len(".tmp")], d, "partial")

    def shared_folders(self) -> list[tuple[Path, int]]:
        """(folder, bytes) for each real folder in `shared/` (symlinks are neither followed nor counted)."""
        shared = self.root / SHARED
        if not self._owned(shared, self.root):
            return []
        found = []
        for folder in sorted(shared.iterdir()):
            if self._owned(folder, shared):
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
                found.append((folder, size))
        return found

    def strays(self) -> list[Path]:
        """Symlinks where stage or entry folders belong: listed for the user, never followed or deleted."""
        found = [p for p in self.root.iterdir() if p.is_symlink()]
        for stage_dir in self.root.iterdir():
            if self._owned(stage_dir, self.root):
                found += [d for d in stage_dir.iterdir() if d.is_symlink()]
        return sorted(found)

    @staticmethod
    def _owned(path: Path, parent: Path) -> bool:
        """A real folder whose resolved location is directly inside `parent` (itself resolved)."""
        return path.is_dir() and not path.is_symlink() and path.resolve().parent == parent.resolve()

    def gc(self, older_than_days: float | None = None, dry_run: bool = False) -> list[CacheEntry]:
        """Remove partial work no process holds, and (if asked) entries unused for `older_than_days`."""
        removed = []
        now = time.time()
        for entry in list(self.entries()):
            if entry.state == "partial":
                doomed = True
            else:
                doomed = older_than_days is not None and now - entry.last_used > older_than_days * 86400
            if not doomed:
                continue
            lock = self.lock(entry.stage, entry.key)
            try:
                lock.acquire(timeout=0)
            except Timeout:  # a running stage owns it
                continue
            try:
                if not self._owned(entry.path, self.root / entry.stage):  # swapped for a link since listing
                    continue
                if not dry_run:
                    shutil.rmtree(entry.path)
                removed.append(entry)
            finally:
                lock.release()
        return removed


@dataclass
class CacheEntry:
    stage: str
    key: str
    path: Path
    state: str  # "complete" or "partial"

    @property
    def last_used(self) -> float:
        marker = self.path / MANIFEST
        return (marker if marker.exists() else self.path).stat().st_mtime

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
