"""evaluate-chat: answer the recipe's evaluation inputs with the base and the fine-tuned model; task metrics.

Tasks: `colorist` (held-out colours: valid-hex rate, RGB distance vs. mean/random baselines, answer loss),
`assistant` (share of self-introductions that name `dataset.name`), `none` (replies only).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..data.embedded import ASSISTANT_EVAL_PROMPTS
from ..data.formats import load_conversations
from ..data.templates import encode_conversation, prompt_ids, resolve_template, stop_words
from ..engine import Stage, StageContext
from ..evaluation.generate import answer_loss, generate_replies
from ..evaluation.metrics import colour_baselines, colour_metrics, name_rate

log = logging.getLogger("ftpipe")


def task_of(cfg: dict[str, Any]) -> str:
    task = cfg["eval"]["task"]
    if task != "auto":
        return task
    dataset = cfg["dataset"]
    if dataset["format"] == "colors":
        return "colorist"
    if dataset["name"]:  # only self-cognition data has an owner's name
        return "assistant"
    return "none"


def _load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return model, AutoTokenizer.from_pretrained(model_dir)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, evaluation = ctx.cfg, ctx.cfg["eval"]
    task = task_of(cfg)
    download = ctx.inputs["download"]
    train, held_out, _ = load_conversations(download / "data", cfg["dataset"])
    if evaluation["max_samples"]:
        held_out = held_out[: evaluation["max_samples"]]
    system = train[0][0].get("system") or None  # the recipe's system prompt, as training saw it

    if task == "colorist":
        if not held_out:
            raise ValueError("eval.task=colorist needs held-out rows: set dataset.eval_size > 0")
        questions = [conv[0]["input"] for conv in held_out]
        references: list[str | None] = [conv[0]["output"] for conv in held_out]
    elif task == "assistant":
        languages = [lang for lang, prompts in ASSISTANT_EVAL_PROMPTS.items() for _ in prompts]
        questions = [q for prompts in ASSISTANT_EVAL_PROMPTS.values() for q in prompts]
        references = [None] * len(questions)
    else:
        questions = [conv[0]["input"] for conv in held_out]
        references = [conv[0]["output"] for conv in held_out]
    questions += list(evaluation["inputs"])
    references += [None] * len(evaluation["inputs"])

    metrics: dict[str, Any] = {"eval_task": task, "eval_questions": len(questions)}
    replies: dict[str, list[str]] = {}
    for phase, model_dir in (("before", download / "model"), ("after", ctx.inputs["merge"] / "model")):
        model, tokenizer = _load(model_dir)
        template = resolve_template(cfg["template"], tokenizer)
        prompts = [prompt_ids(tokenizer, template, [], q, system) for q in questions]
        replies[phase] = generate_replies(
            model,
            tokenizer,
            prompts,
            stop_words(template),
            evaluation["max_new_tokens"],
            evaluation["batch_size"],
        )
        log.info("[evaluate-chat] %s: %s → %r", phase, questions[0], replies[phase][0])
        if task == "colorist":
            n = len(held_out)
            metrics.update(colour_metrics(replies[phase][:n], references[:n], phase))  # type: ignore[arg-type]
            samples = [encode_conversation(tokenizer, template, conv) for conv in held_out]
            metrics[f"answer_loss_{phase}"] = answer_loss(model, samples)
        elif task == "assistant":
            # per language too: a user's Chinese-only file should still name its owner in Chinese
            asked = list(zip(languages, replies[phase][: len(languages)], strict=True))
            metrics[f"name_rate_{phase}"] = name_rate([r for _, r in asked], cfg["dataset"]["name"])
            for lang in ASSISTANT_EVAL_PROMPTS:
                metrics[f"name_rate_{lang}_{phase}"] = name_rate(
                    [r for q_lang, r in asked if q_lang == lang], cfg["dataset"]["name"]
                )
        del model
    if task == "colorist":
        metrics.update(colour_baselines([conv[0]["output"] for conv in train], references[: len(held_out)]))  # type: ignore[arg-type]

    with open(ctx.out / "samples.jsonl", "w") as fh:
        for q, ref, before, after in zip(
            questions, references, replies["before"], replies["after"], strict=True
        ):
            fh.write(
                json.dumps(
                    {"input": q, "reference": ref, "before": before, "after": after}, ensure_ascii=False
                )
                + "\n"
            )
    return metrics


STAGE = Stage(
    name="evaluate-chat",
    version="2",
    reads=(
        "eval",
        "template",
        "dataset.format",
        "dataset.name",
        "dataset.system",
        "dataset.skip_bad_rows",
        "dataset.char_level_answers",
    ),
    upstream=("download", "merge"),
    run=run,
)
