"""What map learns about the data that later stages need, written once as map's `data.json` output.

merge (the chat_template's default system prompt), evaluate-chat, the in-training sampler and `ftpipe chat`
read it instead of re-deriving anything from the raw rows.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DATA_INFO = "data.json"
SAMPLE_INPUTS = 3
# Baselines (e.g. the colorist's mean colour) need the training answers' distribution, not every answer.
MAX_ANSWERS = 10_000

Conversation = list[dict[str, Any]]


@dataclass
class DataInfo:
    format: str  # the format the rows were read in (after `auto` detection)
    system: str | None  # the system prompt training rows carry (the first row's), None if none
    held_out: list[Conversation]  # the rows split.json holds out, as conversations
    sample_inputs: list[str]  # the first training inputs: prompts to sample when nothing is held out
    answers: list[str]  # first-turn answers of (a seeded sample of) the training rows

    @classmethod
    def of(cls, fmt: str, train: list[Conversation], held_out: list[Conversation]) -> DataInfo:
        answers = [conv[0]["output"] for conv in train]
        if len(answers) > MAX_ANSWERS:
            answers = random.Random(0).sample(answers, MAX_ANSWERS)
        return cls(
            format=fmt,
            system=train[0][0].get("system") or None,
            held_out=held_out,
            sample_inputs=[conv[0]["input"] for conv in train[:SAMPLE_INPUTS]],
            answers=answers,
        )

    def write(self, folder: Path) -> None:
        (folder / DATA_INFO).write_text(json.dumps(asdict(self), ensure_ascii=False))

    @classmethod
    def read(cls, path: Path) -> DataInfo:
        return cls(**json.loads(Path(path).read_text()))

    def prompts(self, n: int) -> list[str]:
        """Up to n inputs to sample replies for: held-out ones if any, else training ones."""
        return [conv[0]["input"] for conv in self.held_out[:n]] or self.sample_inputs[:n]
