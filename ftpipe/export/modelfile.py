"""The training template as an Ollama Modelfile: TEMPLATE (a Go text/template over `.Messages`), SYSTEM (the
system prompt training used) and one `PARAMETER stop` per stop word.

The TEMPLATE lays a conversation out as segments.py does for training (and jinja.py for transformers):

    turn 1: [BOS] system.format(system) + instruction.format(input, round) | output + suffix [EOS] sep
    turn 2: [BOS if answers end with EOS] instruction.format(input, round) | …

Go templates have no arithmetic, so the round number is the length of a string that grows by one character
per user turn. No `{{-` trim markers: they would eat the template's own newlines. BOS in front of the first
turn is left to the runtime when the tokenizer adds it anyway (llama.cpp and Ollama then add it once).
"""

from __future__ import annotations

import string
from typing import Any

from ..data.templates import stop_words, uses_tokenizer_template
from ..errors import FtpipeError
from .gguf import added_specials


def _go_text(text: str) -> str:
    """Literal text in a Go template. Only `{{` means something there, but a lone `{` next to an action
    would form one too (`{` + `{{ .Content }}`), so every brace is written as a string action."""
    return text.replace("{", '{{ "{" }}')


def _go_format(fmt: str, fields: dict[str, str], key: str) -> str:
    parts = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        parts.append(_go_text(literal))
        if name is not None:
            if name not in fields:
                raise FtpipeError(f"config key `template.{key}`: unknown field {{{name}}} in {fmt!r}")
            parts.append(fields[name])
    return "".join(parts)


def _literal_start(fmt: str) -> str:
    return next(iter(string.Formatter().parse(fmt)), ("", None, None, None))[0]


def go_template(template: dict[str, Any], bos_token: str, eos_token: str, runtime_adds_bos: bool) -> str:
    """A Go template that renders Ollama's `.Messages` (+ `.System`) as generation_prompt renders them."""
    system_fmt = template.get("system") or ""
    instruction = template["instruction"]
    suffix_as_eos = bool(template.get("suffix_as_eos"))

    def bos_before(fmt: str, first: bool) -> str:  # as segments.assemble: not where the turn opens with it
        if not bos_token or _literal_start(fmt).startswith(bos_token) or (first and runtime_adds_bos):
            return ""
        return _go_text(bos_token)

    system_part = _go_format(system_fmt, {"system": "{{ $.System }}"}, "system")
    instruction_part = _go_format(
        instruction, {"input": "{{ .Content }}", "round": "{{ len $round }}"}, "instruction"
    )
    if system_fmt:
        first = (
            f"{{{{ if $.System }}}}{bos_before(system_fmt, True)}{system_part}"
            f"{{{{ else }}}}{bos_before(instruction, True)}{{{{ end }}}}"
        )
    else:
        first = bos_before(instruction, True)
    later = "" if suffix_as_eos else bos_before(instruction, False)
    answer_end = _go_text((template.get("suffix") or "") + ("" if suffix_as_eos else eos_token))
    return (
        '{{ $round := "" }}{{ $answered := false }}{{ range .Messages }}'
        '{{ if eq .Role "user" }}'
        f"{{{{ if $answered }}}}{_go_text(template.get('sep') or '')}{{{{ end }}}}"
        '{{ $round = printf "%sx" $round }}'
        f"{{{{ if eq (len $round) 1 }}}}{first}{{{{ else }}}}{later}{{{{ end }}}}"
        f"{instruction_part}{{{{ $answered = false }}}}"
        f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{answer_end}{{{{ $answered = true }}}}'
        "{{ end }}{{ end }}"
    )


def _quoted(value: str, what: str) -> str:
    if '"""' in value:
        raise FtpipeError(f'{what}: {value[:60]!r} contains """, which an Ollama Modelfile cannot quote')
    return f'"{value}"' if '"' not in value and "\n" not in value else f'"""{value}"""'


def modelfile(gguf_name: str, template: dict[str, Any], system: str | None, tokenizer: Any) -> str:
    """The Modelfile beside `gguf_name` (a path relative to it). `template=tokenizer` has no Go form: the
    TEMPLATE line is left out and Ollama derives one from the GGUF's tokenizer.chat_template."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    lines = ["# written by ftpipe: `ollama create NAME -f Modelfile` in this folder, then `ollama run NAME`"]
    lines.append(f"FROM ./{gguf_name}")
    if not uses_tokenizer_template(template):
        adds_bos, _ = added_specials(tokenizer)
        lines.append(f'TEMPLATE """{go_template(template, bos, eos, adds_bos)}"""')
        if '"""' in lines[-1][len('TEMPLATE """') : -3]:
            raise FtpipeError('config key `template`: its text contains """, which a Modelfile cannot quote')
    if system and (template.get("system") or uses_tokenizer_template(template)):
        lines.append(f"SYSTEM {_quoted(system, 'config key `dataset.system`')}")
    for word in dict.fromkeys([*stop_words(template), eos]):
        if word:
            lines.append(f"PARAMETER stop {_quoted(word, 'config key `template.stop_words`')}")
    return "\n".join(lines) + "\n"
