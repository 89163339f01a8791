"""Raw dataset rows → the internal conversation form, with every problem pinned to `FILE:LINE`.

The internal form is XTuner's: a conversation is a list of turns ``{"system"?, "input", "output"}``; the
system text sits on the first turn. A row without a system turn of its own gets the format's default system
prompt (`default_system`: colors → XTuner's colorist prompt, alpaca → XTuner's alpaca prompt, others none),
which `dataset.system` replaces (`""`: none); a row's own system turns are never changed. A turn may also
carry ``"char_level": True`` (its answer is tokenised one token per character, see
`dataset.char_level_answers`). Pretraining rows become one turn with an empty input; the map stage encodes
them without a template.

A preference pair is a conversation whose last turn carries the rejected answer beside the chosen one
(``{"input", "output": chosen, "rejected": rejected}``); its earlier turns (the prompt's history) carry
``"masked": True``: context, no loss. `pair_conversations` splits it into the two conversations map encodes.

Row numbering: a row's index is its position among the non-blank rows of all files, in split.json's file
order — the same numbering `sources.count_rows` uses to choose the held-out `eval_rows`.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FtpipeError
from .sources import SPLIT_FILE
from .templates.system import SYSTEM_TEMPLATE

log = logging.getLogger("ftpipe")

Conversation = list[dict[str, Any]]
FORMATS = ("conversation", "alpaca", "openai", "oasst1", "colors", "pretrain", "preference")
PREFERENCE_FORMAT = "preference"
# the system prompt a format gives rows that carry none (XTuner's choices); `dataset.system` replaces it
FORMAT_SYSTEM = {"alpaca": SYSTEM_TEMPLATE["alpaca"], "colors": SYSTEM_TEMPLATE["colorist"]}
MAX_LISTED_PROBLEMS = 20
_HEX_COLOR = re.compile(r"#[0-9a-fA-F]{6}")


class RowError(ValueError):
    """A row that cannot become a conversation; the message says why, the reader adds where."""


@dataclass
class RawRow:
    file: str  # relative to raw/, as written in split.json
    line: int  # 1-based line where the row starts (row number for parquet)
    index: int  # position among all non-blank rows (the numbering of split.json's eval_rows)
    data: Any = None
    error: str | None = None  # set when the row could not even be parsed

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Problem:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Converted:
    """Every row of a dataset, converted: what load_conversations and `ftpipe check` both need."""

    format: str
    detected: bool  # format came from `auto`
    train: list[Conversation] = field(default_factory=list)
    eval: list[Conversation] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # rows kept but suspicious (chosen == rejected)
    rows: int = 0
    dropped: int = 0  # rows the format drops on purpose (alpaca `<nooutput>`)
    where: list[str] = field(default_factory=list)  # FILE:LINE of each train conversation, for `check`
    hint: str = ""  # when no row fits the configured format but they look like another one

    def report(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_detected": self.detected,
            "rows": self.rows,
            "rows_train": len(self.train),
            "rows_eval": len(self.eval),
            "rows_dropped": self.dropped,
            "rows_skipped": len({(p.file, p.line) for p in self.problems}),
        }


# ---- reading raw files ------------------------------------------------------------------------------
def iter_raw_rows(raw_dir: Path, files: list[str]) -> Iterator[RawRow]:
    """Yield every non-blank row of `files` (json, jsonl, csv, parquet) with where it came from."""
    index = 0
    for name in files:
        path = raw_dir / name
        readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
        reader = readers.get(path.suffix)
        if reader is None:
            raise FtpipeError(f"{name}: cannot read {path.suffix or 'suffix-less'} files")
        for row in reader(path, name):
            row.index = index
            index += 1
            yield row


def _jsonl_rows(path: Path, name: str) -> Iterator[RawRow]:
    with open(path, "rb") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield RawRow(name, line_no, -1, json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield RawRow(name, line_no, -1, error=f"broken JSON line: {_json_reason(exc)}")


def _json_reason(exc: Exception) -> str:
    return exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)


def _json_rows(path: Path, name: str) -> Iterator[RawRow]:
    """A JSON array (or one object), decoded element by element so each row keeps its line number."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")
    pos = ws.match(text, 0).end()
    try:
        if not text.startswith("[", pos):
            yield RawRow(name, text.count("\n", 0, pos) + 1, -1, decoder.decode(text))
            return
        pos = ws.match(text, pos + 1).end()
        if text.startswith("]", pos):
            return
        line, counted_to = 1, 0
        while True:
            line += text.count("\n", counted_to, pos)
            counted_to = pos
            value, pos = decoder.raw_decode(text, pos)
            yield RawRow(name, line, -1, value)
            pos = ws.match(text, pos).end()
            if text.startswith(",", pos):
                pos = ws.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                return
            else:
                raise json.JSONDecodeError("expected ',' or ']' after an element", text, pos)
    except json.JSONDecodeError as exc:
        # The rest of the file cannot be split into rows; report where decoding stopped.
        yield RawRow(name, exc.lineno, -1, error=f"broken JSON: {exc.msg} (column {exc.colno})")


def _csv_rows(path: Path, name: str) -> Iterator[RawRow]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        for record in reader:
            # count_rows counts every record after the header, blank ones too: a blank one keeps its index
            # (data None) and is then passed over
            if not record:
                yield RawRow(name, start, -1, None)
            elif len(record) != len(header):
                yield RawRow(
                    name, start, -1, error=f"{len(record)} CSV fields where the header has {len(header)}"
                )
            else:
                yield RawRow(name, start, -1, dict(zip(header, record, strict=True)))
            start = reader.line_num + 1


def _parquet_rows(path: Path, name: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for value in batch.to_pylist():
            row_no += 1
            yield RawRow(name, row_no, -1, value)


# ---- one function per format: row → conversation (or RowError) ------------------------------------
def _text(row: dict, key: str, *, required: bool = True, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing `{key}`")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"`{key}` must be a string, got {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise RowError(f"empty `{key}`")
    return value


def _object(data: Any) -> dict:
    if not isinstance(data, dict):
        raise RowError(f"expected a JSON object, got {type(data).__name__}")
    return data


def from_conversation(data: Any) -> Conversation:
    turns = _object(data).get("conversation")
    if turns is None:
        raise RowError("missing `conversation`")
    if not isinstance(turns, list) or not turns:
        raise RowError("`conversation` must be a non-empty list of {system?, input, output} objects")
    out = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise RowError(f"conversation turn {i}: expected an object, got {type(turn).__name__}")
        try:
            system = _text(turn, "system", required=False)
            new = {"input": _text(turn, "input"), "output": _text(turn, "output")}
        except RowError as exc:
            raise RowError(f"conversation turn {i}: {exc}") from None
        if system.strip():
            new = {"system": system, **new}
        out.append(new)
    return out


def from_alpaca(data: Any) -> Conversation:
    row = _object(data)
    output = _text(row, "output")
    if output == "<nooutput>":
        return []  # alpaca marks unanswerable rows this way; XTuner drops them too
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    # XTuner joins with "\n" even when `input` is empty; a dangling newline would then differ from what a
    # user types at inference, so it is only added when there is an input.
    text = f"{instruction}\n{extra}" if extra.strip() else instruction
    return [{"input": text, "output": output}]


def from_openai(data: Any) -> Conversation:
    messages = _object(data).get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError("`messages` must be a non-empty list of {role, content} objects")
    system, inputs, out = "", [], []
    seen_user = False
    for i, msg in enumerate(messages, 1):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise RowError(f"message {i}: expected an object with a string `role`")
        role, content = msg["role"], msg.get("content")
        if not isinstance(content, str):
            raise RowError(f"message {i} ({role}): `content` must be a string, got {type(content).__name__}")
        if role == "system":
            system = content
        elif role == "user":
            if not content.strip():
                raise RowError(f"message {i}: empty user `content`")
            inputs.append(content)
            seen_user = True
        elif role == "assistant":
            if not seen_user:
                continue  # an opening assistant greeting has no question to answer; XTuner skips it too
            if not inputs:
                raise RowError(f"message {i}: two assistant messages in a row")
            if not content.strip():
                raise RowError(f"message {i}: empty assistant `content`")
            turn = {"input": "\n".join(inputs), "output": content}
            out.append({"system": system, **turn} if system.strip() else turn)
            system, inputs = "", []
        else:
            raise RowError(f"message {i}: role {role!r} is not one of system, user, assistant")
    if not out:
        raise RowError("no assistant reply to learn from")
    return out


def from_oasst1(data: Any) -> Conversation:
    text = _text(_object(data), "text")
    parts = []
    for chunk in text.strip().split("###"):
        chunk = chunk.strip()
        if chunk.startswith("Human:"):
            parts.append(("human", chunk[6:].strip()))
        elif chunk.startswith("Assistant:"):
            parts.append(("assistant", chunk[10:].strip()))
    if parts and parts[-1][0] == "human":
        parts.pop()  # a trailing question without its answer carries no loss (XTuner drops it too)
    if not parts:
        raise RowError("`text` has no '### Human: … ### Assistant: …' turn")
    out = []
    for i in range(0, len(parts), 2):
        pair = parts[i : i + 2]
        if [p[0] for p in pair] != ["human", "assistant"]:
            raise RowError(f"turn {i // 2 + 1}: expected '### Human:' then '### Assistant:'")
        if not pair[0][1] or not pair[1][1]:
            raise RowError(f"turn {i // 2 + 1}: empty {'input' if not pair[0][1] else 'output'}")
        out.append({"input": pair[0][1], "output": pair[1][1]})
    return out


def from_colors(data: Any) -> Conversation:
    row = _object(data)
    description = _text(row, "description")
    color = _text(row, "color").strip()
    if not _HEX_COLOR.fullmatch(color):
        raise RowError(f"`color` {color!r} is not a #rrggbb hex colour")
    _, colon, desc = description.partition(":")
    if not colon or not desc.strip():
        raise RowError(f"`description` {description[:60]!r} has no text after its 'Name:' prefix")
    return [{"input": desc.strip(), "output": color}]


def from_pretrain(data: Any) -> Conversation:
    """A document: `{"text": ...}`, or XTuner's pretraining shape `{"conversation": [{"input": "", "output": ...}]}`."""
    row = _object(data)
    if "conversation" in row and _is_pretrain_conversation(row["conversation"]):
        return [{"input": "", "output": _text(row["conversation"][0], "output")}]
    return [{"input": "", "output": _text(row, "text")}]


def _is_pretrain_conversation(turns: Any) -> bool:
    """XTuner's pretrain_map_fn output: one turn, no prompt, no system, the document as the output."""
    return (
        isinstance(turns, list)
        and len(turns) == 1
        and isinstance(turns[0], dict)
        and turns[0].get("input", "") == ""
        and not turns[0].get("system")
    )


def _answer(row: dict, side: str) -> str:
    """One side of a pair: a string, or a list holding one assistant message (XTuner's shape)."""
    if side not in row or row[side] is None:
        raise RowError(f"missing `{side}`")
    value = row[side]
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise RowError(f"`{side}` must be a string or a list of one assistant message")
        value = value[0].get("content")
        if not isinstance(value, str):
            raise RowError(f"`{side}`: the assistant message's `content` must be a string")
    elif not isinstance(value, str):
        raise RowError(
            f"`{side}` must be a string or a list of one assistant message, got {type(value).__name__}"
        )
    if not value.strip():
        raise RowError(f"empty `{side}` answer")
    return value


def from_preference(data: Any) -> Conversation:
    """`{"prompt", "chosen", "rejected"}`: the prompt a string or OpenAI messages (system and earlier turns,
    ending with the user's message), each answer a string or one assistant message."""
    row = _object(data)
    chosen, rejected = _answer(row, "chosen"), _answer(row, "rejected")
    prompt = row.get("prompt")
    if prompt is None:
        raise RowError("missing `prompt`")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("empty `prompt`")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = list(prompt)
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "user":
            raise RowError("`prompt` must end with a user message")
    else:
        raise RowError("`prompt` must be a string or a non-empty list of {role, content} messages")
    try:  # the prompt with the chosen answer is an OpenAI conversation: one set of message rules
        conv = from_openai({"messages": [*messages, {"role": "assistant", "content": chosen}]})
    except RowError as exc:
        raise RowError(f"prompt: {exc}") from None
    *history, last_turn = conv
    return [*({**t, "masked": True} for t in history), {**last_turn, "rejected": rejected}]


def pair_conversations(conv: Conversation) -> tuple[Conversation, Conversation]:
    """A preference pair (see the module doc) → (chosen conversation, rejected conversation)."""
    *history, last = conv
    turn = {k: v for k, v in last.items() if k != "rejected"}
    return [*history, turn], [*history, {**turn, "output": last["rejected"]}]


CONVERTERS: dict[str, Callable[[Any], Conversation]] = {
    "conversation": from_conversation,
    "alpaca": from_alpaca,
    "openai": from_openai,
    "oasst1": from_oasst1,
    "colors": from_colors,
    "pretrain": from_pretrain,
    "preference": from_preference,
}


def detect_format(data: Any) -> str | None:
    """The format a row looks like, by its keys; None when nothing fits."""
    if not isinstance(data, dict):
        return None
    keys = data.keys()
    if "chosen" in keys and "rejected" in keys:
        return PREFERENCE_FORMAT
    if "conversation" in keys:
        return "pretrain" if _is_pretrain_conversation(data["conversation"]) else "conversation"
    if "messages" in keys:
        return "openai"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "description" in keys and "color" in keys:
        return "colors"
    if "text" in keys:
        text = data["text"]
        return "oasst1" if isinstance(text, str) and "### Human:" in text else "pretrain"
    return None


def default_system(fmt: str, dataset_cfg: dict[str, Any]) -> str | None:
    """The system prompt rows of format `fmt` get when they carry none: `dataset.system` if set, else the
    format's own (FORMAT_SYSTEM); None for none. Pretraining rows never get one."""
    if fmt == "pretrain":
        return None
    system = dataset_cfg.get("system")
    return (FORMAT_SYSTEM.get(fmt) if system is None else system) or None


def with_default_system(conv: Conversation, system: str | None) -> Conversation:
    """`conv` with `system` on its first turn, unless a turn already carries a system text of its own."""
    if not system or not conv or any(turn.get("system") for turn in conv):
        return conv
    return [{"system": system, **conv[0]}, *conv[1:]]


# ---- whole datasets -------------------------------------------------------------------------------
def _split(data_dir: Path) -> tuple[Path, dict]:
    if not (data_dir / SPLIT_FILE).is_file() and (data_dir / "data" / SPLIT_FILE).is_file():
        data_dir = data_dir / "data"  # the download entry itself was passed
    split_file = data_dir / SPLIT_FILE
    if not split_file.is_file():
        raise FtpipeError(f"{data_dir}: no {SPLIT_FILE}; is this the download stage's data/ folder?")
    return data_dir, json.loads(split_file.read_text())


def convert_rows(data_dir: Path, dataset_cfg: dict[str, Any]) -> Converted:
    """Convert every row, collecting (not raising) problems; `check` prints them, load_conversations judges."""
    data_dir, split = _split(data_dir)
    eval_rows = set(split.get("eval_rows", []))
    fmt = dataset_cfg.get("format") or "auto"
    rows = iter_raw_rows(data_dir / "raw", split["files"])
    pending: list[RawRow] = []
    detected = fmt == "auto"
    if detected:
        for row in rows:
            pending.append(row)
            if row.error is None and (guess := detect_format(row.data)):
                fmt = guess
                log.info("dataset.format=auto: detected %r from the keys of %s", fmt, row.where)
                break
        else:
            first = pending[0].where if pending else "(no rows)"
            raise FtpipeError(
                f"dataset.format=auto: no row looks like any of {list(FORMATS)} (first row: {first}); "
                "set dataset.format"
            )
    if fmt not in CONVERTERS:
        raise FtpipeError(f"dataset.format={fmt!r} is not one of {list(FORMATS)} or 'auto'")
    convert = CONVERTERS[fmt]
    system = default_system(fmt, dataset_cfg)
    char_level = bool(dataset_cfg.get("char_level_answers")) and fmt != "pretrain"
    result = Converted(fmt, detected)

    def rows_again() -> Iterator[RawRow]:
        yield from pending
        yield from rows

    looks_like: str | None = None
    for row in rows_again():
        if row.data is None and row.error is None:
            continue  # a blank CSV record
        result.rows += 1
        if looks_like is None and row.error is None:
            looks_like = detect_format(row.data) or ""
        if row.error is not None:
            result.problems.append(Problem(row.file, row.line, row.error))
            continue
        try:
            conv = convert(row.data)
        except RowError as exc:
            result.problems.append(Problem(row.file, row.line, f"{exc} (format {fmt})"))
            continue
        if not conv:
            result.dropped += 1
            continue
        conv = with_default_system(conv, system)
        if fmt == PREFERENCE_FORMAT and conv[-1]["output"].strip() == conv[-1]["rejected"].strip():
            result.warnings.append(Problem(row.file, row.line, "chosen and rejected are the same answer"))
        if char_level:
            conv = [{**turn, "char_level": True} for turn in conv]
        if row.index in eval_rows:
            result.eval.append(conv)
        else:
            result.train.append(conv)
            result.where.append(row.where)
    if result.problems and not result.train and not result.eval and looks_like and looks_like != fmt:
        result.hint = f"the rows look like format {looks_like!r}: set dataset.format={looks_like} (or auto)"
    return result


def problems_message(problems: list[Problem], limit: int = MAX_LISTED_PROBLEMS) -> str:
    shown = "\n".join(f"  {p}" for p in problems[:limit])
    more = f"\n  … and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} bad row(s):\n{shown}{more}"


def load_conversations(
    data_dir: Path, dataset_cfg: dict[str, Any]
) -> tuple[list[Conversation], list[Conversation], dict[str, Any]]:
    """(train conversations, held-out eval conversations, report) from the download stage's `data/` folder.

    Bad rows raise FtpipeError listing them as FILE:LINE unless `dataset.skip_bad_rows` is true, in which case
    they are left out and counted in the report's `rows_skipped`.
    """
    converted = convert_rows(Path(data_dir), dataset_cfg)
    if converted.problems and not dataset_cfg.get("skip_bad_rows"):
        raise FtpipeError(
            f"{problems_message(converted.problems)}\n"
            + (f"{converted.hint}\n" if converted.hint else "")
            + "fix them (`ftpipe check` lists every one) or set dataset.skip_bad_rows=true to leave them out"
        )
    for warning in converted.warnings[:MAX_LISTED_PROBLEMS]:
        log.warning("%s (the pair teaches nothing)", warning)
    if not converted.train:
        raise FtpipeError(f"dataset.path: no usable training rows among {converted.rows}")
    return converted.train, converted.eval, converted.report()
