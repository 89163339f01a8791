"""The Modelfile's TEMPLATE, rendered by Go's text/template as Ollama renders it (over `.System` and
`.Messages`), gives the prompt training gives, for every named template, with and without a system prompt and
history; SYSTEM and stop lines come from the same template object."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ftpipe.config import compose
from ftpipe.data.templates import generation_prompt
from ftpipe.export.modelfile import go_template, modelfile
from ftpipe.paths import ASSETS_DIR, CONF_DIR

RENDERER = Path(__file__).with_name("render_go_template.go")
NAMED = sorted(p.stem for p in (CONF_DIR / "template").glob("*.yaml") if p.stem != "tokenizer")
HISTORY = [{"input": "pale pink", "output": "#ffd1df"}, {"input": "sky {{blue}}", "output": "#75bbfd"}]


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    """Render a Go template over Ollama's values with the Go toolchain (`go` on PATH: `apt-get install golang-go`)."""
    if shutil.which("go") is None:
        pytest.skip("the Go toolchain is not installed (apt-get install golang-go)")
    folder = tmp_path_factory.mktemp("go")
    binary = folder / "render"
    built = subprocess.run(
        ["go", "build", "-o", str(binary), str(RENDERER)],
        capture_output=True,
        text=True,
        env={"GOCACHE": str(folder / "cache"), "HOME": str(folder), "PATH": "/usr/bin:/bin"},
    )
    assert built.returncode == 0, built.stderr

    def run(template: str, system: str | None, history: list[dict], new_input: str) -> str:
        (folder / "template.txt").write_text(template)
        messages = [{"Role": "system", "Content": system}] if system else []
        for turn in history:
            messages += [
                {"Role": "user", "Content": turn["input"]},
                {"Role": "assistant", "Content": turn["output"]},
            ]
        messages.append({"Role": "user", "Content": new_input})
        done = subprocess.run(
            [str(binary), str(folder / "template.txt")],
            capture_output=True,
            text=True,
            input=json.dumps({"System": system or "", "Messages": messages}),
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    return run


def named_template(name: str) -> dict:
    return OmegaConf.to_container(compose([f"template={name}"]).template, resolve=True)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS_DIR / "smollm2_tokenizer")


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("system", [None, "You are a colourist. Answer with {{hex}} codes."])
@pytest.mark.parametrize("history", [[], HISTORY], ids=["first-turn", "multi-turn"])
def test_template_renders_the_training_prompt(render, tokenizer, name, system, history):
    template = named_template(name)
    bos, eos = "<s>", "</s>"  # a BOS that no template opens with, so every place BOS goes shows
    got = render(go_template(template, bos, eos, runtime_adds_bos=False), system, history, "warm orange")
    assert got == generation_prompt(template, history, "warm orange", system, bos_token=bos, eos_token=eos)
    # with a tokenizer that adds BOS itself (llama.cpp, Ollama then add it once), the text starts after it
    got = render(go_template(template, bos, eos, runtime_adds_bos=True), system, history, "warm orange")
    assert bos + got == generation_prompt(
        template, history, "warm orange", system, bos_token=bos, eos_token=eos
    )


def test_round_numbers_count_user_turns(render):
    # and literal braces in the template text stay text (Go would read `{{` as an action)
    template = {**named_template("default"), "instruction": "[Round {round}] {{{{{input}}}}}\n"}
    got = render(go_template(template, "", "", runtime_adds_bos=False), None, HISTORY, "warm orange")
    assert got == generation_prompt(template, HISTORY, "warm orange", None)
    assert "[Round 3] {{warm orange}}" in got


def test_modelfile_lines_come_from_the_template(tokenizer):
    template = named_template("chatml")
    text = modelfile("m-q8_0.gguf", template, "You are a colourist.", tokenizer)
    lines = text.splitlines()
    assert "FROM ./m-q8_0.gguf" in lines
    assert 'SYSTEM "You are a colourist."' in lines
    assert [line for line in lines if line.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|im_end|>"',
        'PARAMETER stop "<|endoftext|>"',
    ]
    (template_line,) = [line for line in text.split("\n") if line.startswith("TEMPLATE")]
    assert template_line.startswith('TEMPLATE """{{') and text.count('"""') == 2
    # a template without a system field drops the system prompt in training: no SYSTEM line either
    assert "SYSTEM" not in modelfile("m.gguf", {**template, "system": ""}, "ignored", tokenizer)
