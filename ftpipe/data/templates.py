"""Prompt templates: conversation → token ids + labels for training, and the same text for generation.

A template is the `template` config group as a plain dict (conf/template/NAME.yaml, fields of
config.TemplateConfig), XTuner's PROMPT_TEMPLATE reproduced field for field:

    turn 1: [BOS] system.format(system) + instruction.format(input, round) | output + suffix | [EOS] sep
    turn 2: [BOS]                        instruction.format(input, round) | output + suffix | [EOS] sep …

Only the part after `|` carries loss (unless train_on_inputs). As in XTuner's encode_fn the tokenizer's EOS
follows each answer (with loss) when `suffix_as_eos` is false, and then the next turn starts with BOS again;
`sep` (no loss) goes between turns, not after the last. One deliberate difference: BOS is not added in front
of a turn whose text already starts with the BOS token (SmolLM2's BOS is `<|im_start|>`, which ChatML turns
begin with anyway — XTuner would double it). The `tokenizer` template uses the model's own `chat_template`.

Text functions never see a tokenizer, so they take the BOS/EOS strings as keywords; tokenise their output
with ``add_special_tokens=False`` (HF's chat-template convention), or use `prompt_ids`.
"""

from __future__ import annotations

import functools
import re
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import yaml

from ..errors import FtpipeError
from ..paths import CONF_DIR

IGNORE_INDEX = -100

# XTuner's SYSTEM_TEMPLATE, except `colorist`: its prompt is most of each colour example, and CPU training time
# grows with it, so ftpipe uses a short one. XTuner's original: "You are a professional color designer. Please
# provide the corresponding colors based on the description of Human.\n"
SYSTEM_TEMPLATE: dict[str, str] = {
    "moss_sft": (
        "You are an AI assistant whose name is {bot_name}.\n"
        "Capabilities and tools that {bot_name} can possess.\n"
        "- Inner thoughts: enabled.\n"
        "- Web search: enabled. API: Search(query)\n"
        "- Calculator: enabled. API: Calculate(expression)\n"
        "- Equation solver: enabled. API: Solve(equation)\n"
        "- Text-to-image: disabled.\n"
        "- Image edition: disabled.\n"
        "- Text-to-speech: disabled.\n"
    ),
    "alpaca": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n"
    ),
    "arxiv_gentile": (
        "If you are an expert in writing papers, please generate "
        "a good paper title for this paper based on other authors' "
        "descriptions of their abstracts.\n"
    ),
    "colorist": "You are a colorist. Reply with the hex color.",
    "coder": (
        "You are a professional programer. Please provide the "
        "corresponding code based on the description of Human.\n"
    ),
    "lawyer": "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n",
    "medical": "如果你是一名医生，请根据患者的描述回答医学问题。\n",
    "sql": (
        "If you are an expert in SQL, please generate a good SQL Query "
        "for Question based on the CREATE TABLE statement.\n"
    ),
}

TOKENIZER_TEMPLATE = "tokenizer"

# segment kinds: text to tokenise, text tokenised one token per character, the BOS id, the EOS id
_TEXT, _CHARS, _BOS, _EOS = range(4)
Segment = tuple[int, str, bool]  # (kind, text, carries loss)


# ---- templates as config ------------------------------------------------------------------------------
@functools.cache
def _template_file(name: str) -> dict[str, Any]:
    path = CONF_DIR / "template" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "template").glob("*.yaml"))
        raise FtpipeError(f"template={name!r}: no such template; there are {known}")
    return yaml.safe_load(path.read_text())


def load_template(name: str) -> dict[str, Any]:
    """A packaged template by name, with TemplateConfig's defaults (for code outside a Hydra run)."""
    from ..config import TemplateConfig

    defaults = {k: v for k, v in TemplateConfig().__dict__.items() if k != "name"}
    return {
        **defaults,
        **_template_file(name),
        "stop_words": list(_template_file(name).get("stop_words", [])),
    }


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


def stop_words(template: dict[str, Any]) -> list[str]:
    """Strings that end a generated answer (add the tokenizer's EOS; XTuner does so implicitly)."""
    return list(template.get("stop_words") or [])


# ---- segments: the one description of a formatted conversation -----------------------------------------
def _system_text(template: dict[str, Any], system: str | None) -> str:
    if not system or not template.get("system"):
        return ""
    return template["system"].format(system=system)


def _segments(
    template: dict[str, Any],
    conversation: Sequence[dict[str, Any]],
    train_on_inputs: bool = False,
    char_level_answers: bool = False,
) -> list[Segment]:
    """The conversation as (kind, text, loss) segments; a last turn with output None stops at its prompt."""
    segs: list[Segment] = []
    suffix, sep = template.get("suffix") or "", template.get("sep") or ""
    suffix_as_eos = bool(template.get("suffix_as_eos"))
    need_bos = True
    last = len(conversation) - 1
    for i, turn in enumerate(conversation):
        if need_bos:
            segs.append((_BOS, "", False))
        prompt = _system_text(template, turn.get("system"))
        prompt += template["instruction"].format(input=turn.get("input") or "", round=i + 1)
        segs.append((_TEXT, prompt, train_on_inputs))
        output = turn.get("output")
        if output is None:
            break
        if char_level_answers or turn.get("char_level"):
            segs.append((_CHARS, output, True))
            if suffix:
                segs.append((_TEXT, suffix, True))
        else:
            segs.append((_TEXT, output + suffix, True))
        need_bos = False
        if not suffix_as_eos:
            segs.append((_EOS, "", True))
            need_bos = True
        if sep and i < last:
            segs.append((_TEXT, sep, train_on_inputs))
    return segs


def _tokenize_whole(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # the Rust batch call without offset tracking and without transformers' per-row Python wrapping
        return [enc.ids for enc in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


class _PieceTokenizer:
    """Tokenise text as the pieces between added tokens, each distinct piece once per call.

    A fast tokenizer cuts added tokens out before it pre-tokenises, so a text's ids are the concatenation of its
    pieces' ids — when no added token strips neighbouring spaces and no normaliser runs. Templates repeat the same
    pieces (system prompt, role headers) in every row; tokenising them once saves a tenth of the work on alpaca.
    `usable` double-checks the equivalence on real texts before it is relied on.
    """

    def __init__(self, tokenizer: Any):
        backend = tokenizer._tokenizer
        added = backend.get_added_tokens_decoder()
        self.ok = backend.normalizer is None and not any(
            a.lstrip or a.rstrip or a.single_word for a in added.values()
        )
        self.ids = {a.content: i for i, a in added.items()}
        contents = sorted(self.ids, key=len, reverse=True)
        self.split = (
            re.compile("(" + "|".join(re.escape(c) for c in contents) + ")").split if contents else None
        )
        self.backend = backend
        self.checked = False

    def __call__(self, texts: list[str]) -> list[list[int]]:
        assert self.split is not None
        unique: dict[str, int] = {}
        layouts = []
        for text in texts:
            layout = []
            for j, piece in enumerate(self.split(text)):
                if j % 2:  # the separators re.split keeps: added tokens
                    layout.append(~self.ids[piece])
                elif piece:
                    layout.append(unique.setdefault(piece, len(unique)))
            layouts.append(layout)
        encoded = [e.ids for e in self.backend.encode_batch_fast(list(unique), add_special_tokens=False)]
        out = []
        for layout in layouts:
            ids: list[int] = []
            for k in layout:
                if k < 0:
                    ids.append(~k)
                else:
                    ids.extend(encoded[k])
            out.append(ids)
        return out

    def usable(self, tokenizer: Any, texts: list[str]) -> bool:
        if not self.checked:
            sample = [t for t in texts if any(c in t for c in self.ids)][:64] or texts[:64]
            self.ok = (
                self.ok and self.split is not None and self(sample) == _tokenize_whole(tokenizer, sample)
            )
            self.checked = True
        return self.ok


_PIECES: weakref.WeakKeyDictionary[Any, _PieceTokenizer | None] = weakref.WeakKeyDictionary()


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of many strings in one call, no special tokens added."""
    if tokenizer not in _PIECES:
        backend = getattr(tokenizer, "_tokenizer", None)
        fast = backend is not None and hasattr(backend, "encode_batch_fast")
        _PIECES[tokenizer] = _PieceTokenizer(tokenizer) if fast else None
    pieces = _PIECES[tokenizer]
    if pieces is not None and pieces.usable(tokenizer, texts):
        return pieces(texts)
    return _tokenize_whole(tokenizer, texts)


def _special_id(tokenizer: Any, which: str) -> int | None:
    value = getattr(tokenizer, f"{which}_token_id", None)
    return value if isinstance(value, int) else None


def _assemble_flat(
    tokenizer: Any, all_segments: list[list[Segment]]
) -> tuple[list[int], list[int], list[int]]:
    """Tokenise the text of every segment of every conversation in one batch, then lay out ids and labels:
    all conversations end to end, with each one's length."""
    texts: list[str] = []
    for segs in all_segments:
        for kind, text, _ in segs:
            if kind == _TEXT:
                texts.append(text)
            elif kind == _CHARS:
                texts.extend(text)
    encoded = _tokenize(tokenizer, texts) if texts else []
    bos_id, eos_id = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    pos = 0
    ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    for segs in all_segments:
        before = len(ids)
        pieces: list[tuple[int, list[int], bool]] = []
        for kind, text, loss in segs:
            if kind == _TEXT:
                pieces.append((kind, encoded[pos], loss))
                pos += 1
            elif kind == _CHARS:
                chars = encoded[pos : pos + len(text)]
                pos += len(text)
                for ch, char_ids in zip(text, chars, strict=True):
                    if len(char_ids) != 1:
                        raise FtpipeError(
                            f"dataset.char_level_answers: character {ch!r} of answer {text[:40]!r} is "
                            f"{len(char_ids)} tokens in this tokenizer, not one"
                        )
                pieces.append((kind, [c[0] for c in chars], loss))
            elif kind == _EOS:
                if eos_id is None:
                    raise FtpipeError(
                        "template: suffix_as_eos is false, so answers end with the tokenizer's EOS, "
                        "but this tokenizer has no eos_token"
                    )
                pieces.append((kind, [eos_id], loss))
            else:
                pieces.append((kind, [bos_id] if bos_id is not None else [], loss))
        for j, (kind, piece, loss) in enumerate(pieces):
            if kind == _BOS and piece:
                following = next((p for _, p, _ in pieces[j + 1 :] if p), None)
                if following and following[0] == piece[0]:
                    continue  # the turn already opens with the BOS token
                loss = False
            ids.extend(piece)
            labels.extend(piece if loss else [IGNORE_INDEX] * len(piece))
        lengths.append(len(ids) - before)
    return ids, labels, lengths


def _assemble(tokenizer: Any, all_segments: list[list[Segment]]) -> tuple[list[list[int]], list[list[int]]]:
    ids, labels, lengths = _assemble_flat(tokenizer, all_segments)
    all_ids, all_labels, start = [], [], 0
    for n in lengths:
        all_ids.append(ids[start : start + n])
        all_labels.append(labels[start : start + n])
        start += n
    return all_ids, all_labels


# ---- public API ------------------------------------------------------------------------------------------
def encode_batch(
    tokenizer: Any,
    template: dict[str, Any],
    conversations: Sequence[Sequence[dict[str, Any]]],
    train_on_inputs: bool = False,
    char_level_answers: bool = False,
) -> tuple[list[list[int]], list[list[int]]]:
    """encode_conversation for many conversations with one tokenizer call (what the map stage uses)."""
    if uses_tokenizer_template(template):
        pairs = [
            _encode_with_chat_template(tokenizer, template, conv, train_on_inputs, char_level_answers)
            for conv in conversations
        ]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    segments = [_segments(template, conv, train_on_inputs, char_level_answers) for conv in conversations]
    return _assemble(tokenizer, segments)


def encode_batch_flat(
    tokenizer: Any,
    template: dict[str, Any],
    conversations: Sequence[Sequence[dict[str, Any]]],
    train_on_inputs: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """encode_batch as flat int32 arrays (ids, labels) + int64 offsets, the shape Arrow stores list columns in."""
    if uses_tokenizer_template(template):
        ids, labels = encode_batch(tokenizer, template, conversations, train_on_inputs)
        flat_ids = [t for x in ids for t in x]
        flat_labels = [t for x in labels for t in x]
        lengths = [len(x) for x in ids]
    else:
        segments = [_segments(template, conv, train_on_inputs) for conv in conversations]
        flat_ids, flat_labels, lengths = _assemble_flat(tokenizer, segments)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.array(flat_ids, dtype=np.int32), np.array(flat_labels, dtype=np.int32), offsets


def encode_conversation(
    tokenizer: Any,
    template: dict[str, Any],
    conversation: Sequence[dict[str, Any]],
    train_on_inputs: bool = False,
    char_level_answers: bool = False,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are −100 except on answers and the suffix/EOS ending them."""
    ids, labels = encode_batch(tokenizer, template, [conversation], train_on_inputs, char_level_answers)
    return ids[0], labels[0]


def encode_pretrain(tokenizer: Any, texts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Pretraining documents: BOS + text + EOS (where the tokenizer has them), loss on every token after BOS."""
    bos_id, eos_id = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    head = [bos_id] if bos_id is not None else []
    tail = [eos_id] if eos_id is not None else []
    all_ids, all_labels = [], []
    for body in _tokenize(tokenizer, list(texts)):
        all_ids.append(head + body + tail)
        all_labels.append([IGNORE_INDEX] * len(head) + body + tail)
    return all_ids, all_labels


def _with_system(
    history: Sequence[dict[str, Any]], new_input: str, system: str | None
) -> list[dict[str, Any]]:
    turns = [{k: v for k, v in t.items() if k != "system"} for t in history]
    turns.append({"input": new_input, "output": None})
    if system:
        turns[0] = {"system": system, **turns[0]}
    return turns


def generation_prompt(
    template: dict[str, Any],
    history: Sequence[dict[str, Any]],
    new_input: str,
    system: str | None,
    *,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """The text in front of the next answer, as training formats it (history = earlier {input, output} turns).

    Pass the tokenizer's `bos_token`/`eos_token` to get them where training puts them; then tokenising the text
    with add_special_tokens=False gives the training ids (for text-boundary-safe tokenizers; `prompt_ids` always).
    """
    if uses_tokenizer_template(template):
        return _render_chat_template(template, _messages(history, new_input, system), bos_token, eos_token)
    text = ""
    segs = _segments(template, _with_system(history, new_input, system))
    for j, (kind, piece, _) in enumerate(segs):
        if kind == _BOS:
            # where _assemble puts BOS: in front of a turn, unless the turn's text already starts with it
            following = next((p for k, p, _ in segs[j + 1 :] if k in (_TEXT, _CHARS) and p), "")
            if bos_token and not following.startswith(bos_token):
                text += bos_token
        elif kind == _EOS:
            text += eos_token
        else:
            text += piece
    return text


def prompt_ids(
    tokenizer: Any,
    template: dict[str, Any],
    history: Sequence[dict[str, Any]],
    new_input: str,
    system: str | None,
    char_level_answers: bool = False,
) -> list[int]:
    """Token ids of generation_prompt exactly as training lays them out (segment by segment)."""
    if uses_tokenizer_template(template):
        template = resolve_template(template, tokenizer)
        text = _render_chat_template(
            template,
            _messages(history, new_input, system),
            tokenizer.bos_token or "",
            tokenizer.eos_token or "",
        )
        return _tokenize(tokenizer, [text])[0]
    segs = _segments(template, _with_system(history, new_input, system), False, char_level_answers)
    ids, _ = _assemble(tokenizer, [segs])
    return ids[0]


# ---- Jinja: the same prompt through tokenizer.apply_chat_template ---------------------------------------
def _jinja_str(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return "'" + escaped.replace("\t", "\\t") + "'"


def _jinja_format(fmt: str, values: dict[str, str]) -> str:
    """A Python format string as a Jinja expression; `values` maps field names to Jinja expressions."""
    import string

    parts = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        if literal:
            parts.append(_jinja_str(literal))
        if name is not None:
            if name not in values:
                raise FtpipeError(f"template: unknown field {{{name}}} in {fmt!r}")
            parts.append(values[name])
    return " ~ ".join(parts) if parts else "''"


def chat_template_jinja(template: dict[str, Any], default_system: str | None) -> str:
    """A chat template with which `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`
    gives generation_prompt(…, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token) exactly."""
    if uses_tokenizer_template(template):
        if not template.get("chat_template"):
            raise FtpipeError("template=tokenizer: call resolve_template(template, tokenizer) first")
        return template["chat_template"]
    system_expr = _jinja_format(template.get("system") or "", {"system": "ns.system"})
    instruction_expr = _jinja_format(template["instruction"], {"input": "m['content']", "round": "ns.turn"})
    suffix = _jinja_str(template.get("suffix") or "")
    sep = _jinja_str(template.get("sep") or "")
    suffix_as_eos = bool(template.get("suffix_as_eos"))
    # mirrors _segments: BOS before the first turn, and before every later one when answers end with EOS
    bos_turn = "ns.turn == 1" if suffix_as_eos else "true"
    use_system = "ns.turn == 1 and ns.system" if template.get("system") else "false"
    default = _jinja_str(default_system) if default_system else "''"
    lines = [
        f"{{#- generated by ftpipe from template {template.get('name')} -#}}",
        f"{{%- set ns = namespace(system={default}, turn=0, answered=false) -%}}",
        "{%- for m in messages -%}",
        "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}",
        "{%- elif m['role'] == 'user' -%}",
        f"{{%- if ns.answered -%}}{{{{- {sep} -}}}}{{%- endif -%}}",
        "{%- set ns.turn = ns.turn + 1 -%}",
        f"{{%- set turn_text = (({system_expr}) if ({use_system}) else '') ~ ({instruction_expr}) -%}}",
        f"{{%- if ({bos_turn}) and bos_token and not turn_text.startswith(bos_token) -%}}"
        "{{- bos_token -}}{%- endif -%}",
        "{{- turn_text -}}",
        "{%- set ns.answered = false -%}",
        "{%- elif m['role'] == 'assistant' -%}",
        f"{{{{- m['content'] ~ {suffix} -}}}}" + ("" if suffix_as_eos else "{{- eos_token -}}"),
        "{%- set ns.answered = true -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    return "\n".join(lines) + "\n"


def _messages(history: Sequence[dict[str, Any]], new_input: str | None, system: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    for turn in history:
        messages += [
            {"role": "user", "content": turn["input"]},
            {"role": "assistant", "content": turn["output"]},
        ]
    if new_input is not None:
        messages.append({"role": "user", "content": new_input})
    return messages


def _render_chat_template(
    template: dict[str, Any], messages: list[dict], bos_token: str, eos_token: str, generation: bool = True
) -> str:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    jinja = template.get("chat_template")
    if not jinja:
        raise FtpipeError("template=tokenizer: call resolve_template(template, tokenizer) first")
    return _compile_jinja_template(jinja).render(
        messages=messages,
        add_generation_prompt=generation,
        bos_token=bos_token or template.get("bos_token", ""),
        eos_token=eos_token or template.get("eos_token", ""),
    )


def _encode_with_chat_template(
    tokenizer: Any,
    template: dict[str, Any],
    conversation: Sequence[dict[str, Any]],
    train_on_inputs: bool,
    char_level_answers: bool,
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
        prompt = _render_chat_template(template, _messages(history, turn["input"], system), bos, eos)
        history.append({"input": turn["input"], "output": turn["output"]})
        full = _render_chat_template(template, _messages(history, None, system), bos, eos, generation=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise FtpipeError(
                "template=tokenizer: the model's chat_template does not render a conversation turn by turn "
                "(an earlier render is not a prefix of a later one); pick a named template (`ftpipe ls`)"
            )
        answer = full[len(prompt) :]
        trailing = answer[len(answer.rstrip()) :]
        answer = answer[: len(answer) - len(trailing)]
        segs.append((_TEXT, prompt[len(done) :], train_on_inputs))
        if char_level_answers or turn.get("char_level"):
            if not answer.startswith(turn["output"]):
                raise FtpipeError("dataset.char_level_answers: the chat_template rewrites answers")
            segs.append((_CHARS, turn["output"], True))
            segs.append((_TEXT, answer[len(turn["output"]) :], True))
        else:
            segs.append((_TEXT, answer, True))
        if trailing:
            segs.append((_TEXT, trailing, train_on_inputs))
        done = full
    ids, labels = _assemble(tokenizer, [segs])
    return ids[0], labels[0]
