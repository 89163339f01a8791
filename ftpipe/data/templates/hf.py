"""`template=tokenizer`: the model's own `chat_template`, rendered with transformers' Jinja environment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...errors import FtpipeError
from .segments import CHARS, TEXT, Segment, assemble

TOKENIZER_TEMPLATE = "tokenizer"


def uses_tokenizer_template(template: dict[str, Any]) -> bool:
    return template.get("name") == TOKENIZER_TEMPLATE or bool(template.get("chat_template"))


def resolve_template(template: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Fill what `template=tokenizer` takes from the model: its chat_template, BOS/EOS strings, EOS as a stop word."""
    if template.get("name") != TOKENIZER_TEMPLATE or template.get("chat_template"):
        return template
    jinja = getattr(tokenizer, "chat_template", None)
    if not isinstance(jinja, str) or not jinja:
        raise FtpipeError(
            "template=tokenizer: the model's tokenizer has no chat_template; pick a named template (`ftpipe ls`)"
        )
    stops = list(template.get("stop_words") or [])
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return {
        **template,
        "chat_template": jinja,
        "bos_token": tokenizer.bos_token or "",
        "eos_token": tokenizer.eos_token or "",
        "stop_words": stops,
    }


def messages(history: Sequence[dict[str, Any]], new_input: str | None, system: str | None) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    for turn in history:
        out += [
            {"role": "user", "content": turn["input"]},
            {"role": "assistant", "content": turn["output"]},
        ]
    if new_input is not None:
        out.append({"role": "user", "content": new_input})
    return out


def render(
    template: dict[str, Any], msgs: list[dict], bos_token: str, eos_token: str, generation: bool = True
) -> str:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    jinja = template.get("chat_template")
    if not jinja:
        raise FtpipeError("template=tokenizer: call resolve_template(template, tokenizer) first")
    return _compile_jinja_template(jinja).render(
        messages=msgs,
        add_generation_prompt=generation,
        bos_token=bos_token or template.get("bos_token", ""),
        eos_token=eos_token or template.get("eos_token", ""),
    )


def encode_with_chat_template(
    tokenizer: Any, template: dict[str, Any], conversation: Sequence[dict[str, Any]], train_on_inputs: bool
) -> tuple[list[int], list[int]]:
    """Loss spans from rendering the model's chat_template turn by turn: each answer is what the full render
    adds after the render with a generation prompt. Trailing whitespace after an answer carries no loss."""
    template = resolve_template(template, tokenizer)
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    system = next((t.get("system") for t in conversation if t.get("system")), None)
    history: list[dict[str, Any]] = []
    segs: list[Segment] = []
    done = ""
    for turn in conversation:
        prompt = render(template, messages(history, turn["input"], system), bos, eos)
        history.append({"input": turn["input"], "output": turn["output"]})
        full = render(template, messages(history, None, system), bos, eos, generation=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise FtpipeError(
                "template=tokenizer: the model's chat_template does not render a conversation turn by turn "
                "(an earlier render is not a prefix of a later one); pick a named template (`ftpipe ls`)"
            )
        answer = full[len(prompt) :]
        trailing = answer[len(answer.rstrip()) :]
        answer = answer[: len(answer) - len(trailing)]
        segs.append((TEXT, prompt[len(done) :], train_on_inputs))
        loss = train_on_inputs or not turn.get("masked")  # a preference prompt's history: context only
        if turn.get("char_level"):
            if not answer.startswith(turn["output"]):
                raise FtpipeError("dataset.char_level_answers: the chat_template rewrites answers")
            segs.append((CHARS, turn["output"], loss))
            segs.append((TEXT, answer[len(turn["output"]) :], loss))
        else:
            segs.append((TEXT, answer, loss))
        if trailing:
            segs.append((TEXT, trailing, train_on_inputs))
        done = full
    ids, labels = assemble(tokenizer, [segs])
    return ids[0], labels[0]
