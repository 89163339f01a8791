"""Safe defaults, checked over the package's own source: nothing unpickles, remote code stays off unless asked."""

from __future__ import annotations

import re
from pathlib import Path

from ftpipe.config import compose, validate

PACKAGE = Path(__file__).resolve().parents[2] / "ftpipe"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_no_torch_load_without_weights_only_and_no_pickle_anywhere():
    assert SOURCES
    for path in SOURCES:
        text = path.read_text()
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), f"{path}: {call.group(0)}"
        assert not re.search(r"^\s*(import pickle|from pickle|import dill)", text, re.M), path


def test_trust_remote_code_is_never_hard_coded_on_and_defaults_off():
    for path in SOURCES:
        assert "trust_remote_code=True" not in path.read_text(), path
    for recipe in ("colorist_lora", "assistant_lora"):
        assert validate(compose([f"+recipe={recipe}"]))["model"]["trust_remote_code"] is False


def test_outputs_are_safetensors_only():
    """Every save goes through save_pretrained (safetensors by default) or save_file; no torch.save of weights."""
    for path in SOURCES:
        text = path.read_text()
        assert "safe_serialization=False" not in text, path
        assert not re.search(r"torch\.save\(", text), path
