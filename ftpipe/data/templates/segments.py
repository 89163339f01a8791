"""Segments: the one description of a formatted conversation, and their layout as ids + labels.

    turn 1: [BOS] system.format(system) + instruction.format(input, round) | output + suffix | [EOS] sep
    turn 2: [BOS]                        instruction.format(input, round) | output + suffix | [EOS] sep …

Only the part after `|` carries loss (unless train_on_inputs). As in XTuner's encode_fn the tokenizer's EOS
follows each answer (with loss) when `suffix_as_eos` is false, and then the next turn starts with BOS again;
`sep` (no loss) goes between turns, not after the last. One deliberate difference: BOS is not added in front
of a turn whose text already starts with the BOS token (SmolLM2's BOS is `<|im_start|>`, which ChatML turns
begin with anyway — XTuner would double it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...errors import FtpipeError
from ..labels import IGNORE_INDEX
from .tokenize import special_id, tokenize

# segment kinds: text to tokenise, text tokenised one token per character, the BOS id, the EOS id
TEXT, CHARS, BOS, EOS = range(4)
Segment = tuple[int, str, bool]  # (kind, text, carries loss)


def _system_text(template: dict[str, Any], system: str | None) -> str:
    if not system or not template.get("system"):
        return ""
    return template["system"].format(system=system)


def segments(
    template: dict[str, Any], conversation: Sequence[dict[str, Any]], train_on_inputs: bool = False
) -> list[Segment]:
    """The conversation as (kind, text, loss) segments; a last turn with output None stops at its prompt.
    A turn with ``"char_level": True`` has its answer tokenised one token per character; one with
    ``"masked": True`` (a preference prompt's history) carries no loss on its answer."""
    segs: list[Segment] = []
    suffix, sep = template.get("suffix") or "", template.get("sep") or ""
    suffix_as_eos = bool(template.get("suffix_as_eos"))
    need_bos = True
    last = len(conversation) - 1
    for i, turn in enumerate(conversation):
        if need_bos:
            segs.append((BOS, "", False))
        prompt = _system_text(template, turn.get("system"))
        prompt += template["instruction"].format(input=turn.get("input") or "", round=i + 1)
        segs.append((TEXT, prompt, train_on_inputs))
        output = turn.get("output")
        if output is None:
            break
        # a preference prompt's earlier answers are context: no loss (formats.from_preference marks them)
        loss = train_on_inputs or not turn.get("masked")
        if turn.get("char_level"):
            segs.append((CHARS, output, loss))
            if suffix:
                segs.append((TEXT, suffix, loss))
        else:
            segs.append((TEXT, output + suffix, loss))
        need_bos = False
        if not suffix_as_eos:
            segs.append((EOS, "", loss))
            need_bos = True
        if sep and i < last:
            segs.append((TEXT, sep, train_on_inputs))
    return segs


def with_system(
    history: Sequence[dict[str, Any]], new_input: str, system: str | None
) -> list[dict[str, Any]]:
    """Earlier {input, output} turns + the new input (no answer yet), the system prompt on the first turn."""
    turns = [{k: v for k, v in t.items() if k != "system"} for t in history]
    turns.append({"input": new_input, "output": None})
    if system:
        turns[0] = {"system": system, **turns[0]}
    return turns


def assemble_flat(
    tokenizer: Any, all_segments: list[list[Segment]]
) -> tuple[list[int], list[int], list[int]]:
    """Tokenise the text of every segment of every conversation in one batch, then lay out ids and labels:
    all conversations end to end, with each one's length."""
    texts: list[str] = []
    for segs in all_segments:
        for kind, text, _ in segs:
            if kind == TEXT:
                texts.append(text)
            elif kind == CHARS:
                texts.extend(text)
    encoded = tokenize(tokenizer, texts) if texts else []
    bos_id, eos_id = special_id(tokenizer, "bos"), special_id(tokenizer, "eos")
    pos = 0
    ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    for segs in all_segments:
        before = len(ids)
        pieces: list[tuple[int, list[int], bool]] = []
        for kind, text, loss in segs:
            if kind == TEXT:
                pieces.append((kind, encoded[pos], loss))
                pos += 1
            elif kind == CHARS:
                chars = encoded[pos : pos + len(text)]
                pos += len(text)
                for ch, char_ids in zip(text, chars, strict=True):
                    if len(char_ids) != 1:
                        raise FtpipeError(
                            f"dataset.char_level_answers: character {ch!r} of answer {text[:40]!r} is "
                            f"{len(char_ids)} tokens in this tokenizer, not one"
                        )
                pieces.append((kind, [c[0] for c in chars], loss))
            elif kind == EOS:
                if eos_id is None:
                    raise FtpipeError(
                        "template: suffix_as_eos is false, so answers end with the tokenizer's EOS, "
                        "but this tokenizer has no eos_token"
                    )
                pieces.append((kind, [eos_id], loss))
            else:
                pieces.append((kind, [bos_id] if bos_id is not None else [], loss))
        for j, (kind, piece, loss) in enumerate(pieces):
            if kind == BOS and piece:
                following = next((p for _, p, _ in pieces[j + 1 :] if p), None)
                if following and following[0] == piece[0]:
                    continue  # the turn already opens with the BOS token
                loss = False
            ids.extend(piece)
            labels.extend(piece if loss else [IGNORE_INDEX] * len(piece))
        lengths.append(len(ids) - before)
    return ids, labels, lengths


def assemble(tokenizer: Any, all_segments: list[list[Segment]]) -> tuple[list[list[int]], list[list[int]]]:
    ids, labels, lengths = assemble_flat(tokenizer, all_segments)
    all_ids, all_labels, start = [], [], 0
    for n in lengths:
        all_ids.append(ids[start : start + n])
        all_labels.append(labels[start : start + n])
        start += n
    return all_ids, all_labels


def segments_text(segs: list[Segment], bos_token: str, eos_token: str) -> str:
    """The text the segments stand for, with BOS/EOS strings where assemble puts their ids."""
    text = ""
    for j, (kind, piece, _) in enumerate(segs):
        if kind == BOS:
            # where assemble puts BOS: in front of a turn, unless the turn's text already starts with it
            following = next((p for k, p, _ in segs[j + 1 :] if k in (TEXT, CHARS) and p), "")
            if bos_token and not following.startswith(bos_token):
                text += bos_token
        elif kind == EOS:
            text += eos_token
        else:
            text += piece
    return text
