"""Whole runs on the embedded SmolLM2-135M-Instruct, as a user types them: the recipes must really learn.

The assistant run (~1.5 min on two cores, the wheel fetched from PyPI once) is in the default suite; the
colorist demo (`make demo`, ~8 min) runs with `make test-full`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FTPIPE = [sys.executable, "-m", "ftpipe.cli"]


def ftpipe(*args: str, cwd: Path, cache: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FTPIPE_CACHE": str(cache)}
    return subprocess.run(
        [*FTPIPE, *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=1800
    )


def last_run(cwd: Path) -> dict[str, dict]:
    (found,) = sorted(cwd.glob("outputs/*/*/run.json"))[-1:]
    return {row["name"]: row for row in json.loads(found.read_text())["stages"]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    # one cache for the module: the converted SmolLM2 folder is downloaded and dequantised once
    return Path(os.environ.get("FTPIPE_TEST_SHARED_CACHE") or tmp_path_factory.mktemp("smollm2-cache"))


def test_assistant_lora_names_its_owner_then_chat_answers_from_a_pipe(tmp_path, cache):
    args = ("+recipe=assistant_lora", "dataset.name=Alice")
    run = ftpipe(*args, cwd=tmp_path, cache=cache)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = last_run(tmp_path)["evaluate-chat"]
    assert metrics["name_rate_before"] < 0.5  # the base model does not know Alice
    assert metrics["name_rate_after"] >= 0.9
    assert metrics["name_rate_zh_after"] >= 0.8 and metrics["name_rate_en_after"] >= 0.8

    chat = ftpipe("chat", *args, cwd=tmp_path, cache=cache, stdin="Who are you?\n\nEXIT\n")
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "Alice" in chat.stdout


@pytest.mark.slow  # `make demo`: ~8 min of training on two cores
def test_colorist_lora_learns_colour_not_just_the_format(tmp_path, cache):
    run = ftpipe("+recipe=colorist_lora", cwd=tmp_path, cache=cache)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = last_run(tmp_path)["evaluate-chat"]
    assert metrics["hex_valid_rate_after"] >= 0.9
    assert metrics["color_distance_after"] < metrics["color_distance_mean_baseline"]
    assert metrics["answer_loss_after"] < metrics["answer_loss_before"]
    # the recipe's export: a q8_0 GGUF with its Modelfile, and the log says where
    export = last_run(tmp_path)["export"]
    (gguf_file,) = export["export_files"]
    path = Path(export["output"]) / gguf_file
    assert path.is_file() and (path.parent / "Modelfile").is_file()
    assert str(path) in run.stderr + run.stdout

    chat = ftpipe(
        "chat", "+recipe=colorist_lora", cwd=tmp_path, cache=cache, stdin="Give me a warm orange\n\nEXIT\n"
    )
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert any(re.fullmatch(r"#[0-9a-fA-F]{6}", line.strip()) for line in chat.stdout.splitlines()), (
        chat.stdout
    )
