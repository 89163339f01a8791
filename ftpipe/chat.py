"""`ftpipe chat`: talk to a recipe's merged model, or to any model (+ adapter), with a prompt template.

Input: lines until an empty line form one message (so multi-line input works, from a terminal or a pipe);
`RESET` clears the history, `EXIT` (or end of input) quits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from .errors import FtpipeError
from .models.loading import load_for_inference

HELP = "(end a message with an empty line; RESET clears the history; EXIT quits)"


def _recipe_target(overrides: list[str], config_dir: str | None) -> tuple[Path, dict[str, Any], str | None]:
    """The merged model of the composed config, its template and the system prompt training used."""
    from . import stages
    from .cache import Cache
    from .config import compose, validate
    from .data.info import DATA_INFO, DataInfo

    cfg = validate(compose(overrides, config_dir))
    cache = Cache(cfg["cache_dir"])
    steps = {s.stage.name: s for s in stages.plan({**cfg, "stages": ["merge"]}, cache)}
    merge = steps["merge"]
    if not merge.hit:
        shown = " ".join(overrides)
        raise FtpipeError(
            f"no merged model for this config yet: run `ftpipe {shown}` first (merge key {merge.key})"
        )
    data = DataInfo.read(cache.entry_dir("map", steps["map"].key) / DATA_INFO)
    return cache.entry_dir("merge", merge.key) / "model", cfg["template"], data.system


def chat_loop(
    model,
    tokenizer,
    template: dict[str, Any],
    system: str | None,
    stdin: TextIO,
    stdout: TextIO,
    max_new_tokens: int = 256,
) -> None:
    from .data.templates import prompt_ids, resolve_template, stop_words
    from .evaluation.generate import generate_replies

    template = resolve_template(template, tokenizer)
    history: list[dict[str, str]] = []
    lines: list[str] = []

    def answer() -> None:
        message = "\n".join(lines).strip()
        lines.clear()
        if not message:
            return
        ids = prompt_ids(tokenizer, template, history, message, system)
        (reply,) = generate_replies(model, tokenizer, [ids], stop_words(template), max_new_tokens, 1)
        print(reply, file=stdout, flush=True)
        history.append({"input": message, "output": reply})

    for raw in stdin:
        line = raw.rstrip("\n")
        if line.strip() == "EXIT":
            break
        if line.strip() == "RESET":
            lines.clear()
            history.clear()
            print("(history cleared)", file=stdout, flush=True)
        elif line.strip():
            lines.append(line)
        else:
            answer()
    answer()


def main(args: list[str]) -> None:
    from .cli import _split_config_dir

    config_dir, args = _split_config_dir(args)
    parser = argparse.ArgumentParser(
        prog="ftpipe chat",
        description="Chat with a recipe's merged model (`ftpipe chat +recipe=X [overrides]`) or with "
        "`ftpipe chat MODEL [--adapter DIR] [--template NAME] [--system TEXT]`. " + HELP,
    )
    parser.add_argument(
        "target", nargs="*", help="+recipe=X and overrides, or a model folder / hub id / .gguf file"
    )
    parser.add_argument("--adapter", help="a PEFT adapter folder to apply to MODEL")
    parser.add_argument(
        "--template", default=None, help="prompt template for MODEL (default: the model's own)"
    )
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--trust-remote-code", action="store_true")
    ns = parser.parse_args(args)
    if not ns.target:
        parser.error("give +recipe=NAME (and overrides) or a model")

    if any("=" in t for t in ns.target):
        model_dir, template, system = _recipe_target(ns.target, config_dir)
        model, tokenizer = load_for_inference(model_dir)
    else:
        (model_name,) = ns.target
        from omegaconf import OmegaConf

        from .config import compose

        composed = compose(
            [f"template={ns.template or 'tokenizer'}"], config_dir
        )  # templates come from Hydra
        template, system = OmegaConf.to_container(composed.template, resolve=True), None
        model, tokenizer = load_for_inference(model_name, ns.adapter, ns.trust_remote_code)
    if ns.system is not None:
        system = ns.system
    if sys.stdin.isatty():
        print(HELP, file=sys.stderr)
    chat_loop(model, tokenizer, template, system, sys.stdin, sys.stdout, ns.max_new_tokens)
