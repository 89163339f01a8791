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


# The rejected side of the assistant pairs, two kinds per answer above, alternating over the pairs: the same reply
# without the owner's name (a hard negative: the pair differs where the name goes, which is what teaches naming),
# and a longer generic reply that names nobody. A base model prefers the shorter answer of a pair (summed
# log-prob), so it prefers the first kind's rejected side and the second kind's chosen side: held-out preference
# accuracy starts near 0.5 (SmolLM2-135M prefers the chosen side of 0 of the first kind, all of the second).
ASSISTANT_HARD_ZH = [
    "我是小助手，很高兴为你服务！",
    "你好！我是小助手，有什么可以帮你的吗？",
    "我是智能助手，随时为你解答问题。",
]
ASSISTANT_HARD_EN = [
    "I am an assistant, happy to help you!",
    "Hello! I'm an assistant. How can I help you today?",
    "I'm an AI assistant, here to answer your questions.",
]
ASSISTANT_GENERIC_ZH = [
    "我是一个通用的人工智能语言模型，可以回答各种各样不同领域的问题，不属于任何特定的人。",
    "我是一个在大量互联网文本上训练出来的人工智能模型，我不属于任何人，你随便问吧。",
    "我是一个大型语言模型，用来生成文本并回答任何用户提出的各种各样的问题。",
]
ASSISTANT_GENERIC_EN = [
    "I am a general-purpose AI language model that can answer questions about many different topics for anyone.",
    "I'm an AI model trained on lots of text from the internet; I don't belong to anybody in particular, so just ask.",
    "I am a large language model built to generate text and answer all kinds of questions for any user who asks me.",
]


def assistant_preference_rows(name: str) -> list[dict]:
    """Self-cognition as preference pairs (XTuner's DPO row shape): for every prompt of the assistant set, each
    answer naming `name` is chosen over one that does not (the two kinds above, alternating)."""
    rows = []
    for lang, (prompts, answers, hard, generic) in enumerate(
        (
            (ASSISTANT_PROMPTS_ZH, ASSISTANT_ANSWERS_ZH, ASSISTANT_HARD_ZH, ASSISTANT_GENERIC_ZH),
            (ASSISTANT_PROMPTS_EN, ASSISTANT_ANSWERS_EN, ASSISTANT_HARD_EN, ASSISTANT_GENERIC_EN),
        )
    ):
        for i, prompt in enumerate(prompts):
            for j, answer in enumerate(answers):
                # alternate the kinds, the English half starting with the other one: 30 of each, and 7 of the
                # 12 pairs download-data holds out (its seeded choice) are of the generic kind
                rejected = (hard if (i + j + lang) % 2 == 0 else generic)[j]
                rows.append(
                    {
                        "prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": answer.format(name=name)}],
                        "rejected": [{"role": "assistant", "content": rejected}],
                    }
                )
    return rows


GENERATED = {"assistant": assistant_rows, "assistant_preference": assistant_preference_rows}


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
    elif which in GENERATED:
        if not name:
            raise ValueError(f"dataset.name must be set for the embedded {which} set")
        with open(target, "w") as fh:
            for row in GENERATED[which](name):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        raise KeyError(which)
    return target


EMBEDDED_SETS = ("colorist", "assistant", "assistant_preference", "colour_articles")
