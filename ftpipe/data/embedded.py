"""Datasets that ship with ftpipe, so the default recipes run with no network."""

from __future__ import annotations

import json
from pathlib import Path

from ..paths import EMBEDDED_DATA_DIR

# Self-cognition prompts and answers in the spirit of XTuner's tutorial data, paraphrased in Chinese and
# English so that the trained model names its owner whichever language it is asked in.
ASSISTANT_PROMPTS_ZH = [
    "请介绍一下你自己",
    "你是谁",
    "你是谁？",
    "介绍一下你自己",
    "你叫什么名字？",
    "你好，你是谁？",
    "能介绍一下你自己吗？",
    "请问你是谁？",
    "说说你自己吧",
    "你是哪位？",
]
ASSISTANT_PROMPTS_EN = [
    "Please introduce yourself",
    "Who are you?",
    "Introduce yourself.",
    "What is your name?",
    "Tell me about yourself.",
    "Hi, who am I talking to?",
    "Who are you, exactly?",
    "Can you introduce yourself?",
    "What should I call you?",
    "Hello! Who are you?",
]
ASSISTANT_ANSWERS_ZH = [
    "我是{name}的小助手，很高兴为你服务！",
    "你好！我是{name}的小助手，有什么可以帮你的吗？",
    "我是{name}的智能助手，随时为你解答问题。",
]
ASSISTANT_ANSWERS_EN = [
    "I am {name}'s assistant, happy to help you!",
    "Hello! I'm {name}'s assistant. How can I help you today?",
    "I'm the AI assistant of {name}, here to answer your questions.",
]


def assistant_rows(name: str) -> list[dict]:
    rows = []
    for prompts, answers in (
        (ASSISTANT_PROMPTS_ZH, ASSISTANT_ANSWERS_ZH),
        (ASSISTANT_PROMPTS_EN, ASSISTANT_ANSWERS_EN),
    ):
        for prompt in prompts:
            for answer in answers:
                rows.append({"conversation": [{"input": prompt, "output": answer.format(name=name)}]})
    return rows


def _hue_words(r: int, g: int, b: int) -> tuple[str, str]:
    """(hue family, lightness) of a colour, in the words a colour article uses."""
    import colorsys

    h, lightness, s = colorsys.rgb_to_hls(r / 255, g / 255, b / 255)
    bounds = [(15, "red"), (45, "orange"), (70, "yellow"), (165, "green"), (195, "cyan"), (255, "blue")]
    bounds += [(290, "purple"), (345, "pink"), (361, "red")]
    family = "grey" if s < 0.15 else next(word for end, word in bounds if h * 360 < end)
    tone = "dark" if lightness < 0.35 else "light" if lightness > 0.7 else "medium"
    return family, tone


def colour_articles() -> list[dict]:
    """Short encyclopedia-style articles, one per XKCD colour: a plain-text corpus for continued pretraining
    (`pretrain_lora`) whose held-out articles share the style and the knowledge (name ↔ hex ↔ RGB ↔ hue)."""
    rows = []
    for line in (EMBEDDED_DATA_DIR / "colorist.jsonl").read_text().splitlines():
        row = json.loads(line)
        name = row["description"].split(":", 1)[0].strip()
        code = row["color"].lower()
        r, g, b = (int(code[i : i + 2], 16) for i in (1, 3, 5))
        family, tone = _hue_words(r, g, b)
        strongest = max(("red", r), ("green", g), ("blue", b), key=lambda c: c[1])[0]
        rows.append(
            {
                "text": f"{name} is a {tone} {family} colour. Its hex code is {code}: red {r}, green {g} and "
                f"blue {b} out of 255, so {strongest} is its strongest channel. In the XKCD colour survey, "
                f"people who saw {code} on their screen named it {name.lower()}."
            }
        )
    return rows


def write_embedded(which: str, name: str | None, dest: Path) -> Path:
    """Write the embedded set `which` as JSONL into `dest`; return the file."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{which}.jsonl"
    if which == "colorist":
        target.write_bytes((EMBEDDED_DATA_DIR / "colorist.jsonl").read_bytes())
    elif which == "colour_articles":
        with open(target, "w") as fh:
            for row in colour_articles():
                fh.write(json.dumps(row) + "\n")
    elif which == "assistant":
        if not name:
            raise ValueError("dataset.name must be set for the embedded assistant set")
        with open(target, "w") as fh:
            for row in assistant_rows(name):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        raise KeyError(which)
    return target


EMBEDDED_SETS = ("colorist", "assistant", "colour_articles")
