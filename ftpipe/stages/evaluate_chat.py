"""evaluate-chat: answer the task's questions with the base and the fine-tuned model; the task's metrics.

The task (`eval.task`, ftpipe/tasks/) says what to ask and how to score: `colorist` (held-out colours:
valid-hex rate, RGB distance vs. mean/random baselines, answer loss), `assistant` (share of self-introductions
that name `dataset.name`), `pretrain` (held-out perplexity), `preference` (held-out pairs: preference accuracy
before/after, implicit rewards against the base; tasks/preference.py), `none` (replies to the held-out inputs
only). `eval.inputs` are asked too.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..data.info import DATA_INFO, DataInfo
from ..data.templates import prompt_ids, resolve_template, stop_words
from ..engine import Stage, StageContext
from ..evaluation.generate import generate_replies
from ..models.loading import load_for_inference
from ..tasks import Phase, Question, task_for, task_name

log = logging.getLogger("ftpipe")


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, evaluation = ctx.cfg, ctx.cfg["eval"]
    data = DataInfo.read(ctx.input("map", DATA_INFO))
    if evaluation["max_samples"]:
        data.held_out = data.held_out[: evaluation["max_samples"]]
    name = task_name(evaluation["task"], data.format, cfg["dataset"]["name"])
    task = task_for(name)
    questions: list[Question] = task.questions(data, cfg["dataset"])
    questions += [Question(q) for q in evaluation["inputs"]]
    if not questions:
        log.info("[evaluate-chat] nothing to ask: no held-out rows (dataset.eval_size=0) and no eval.inputs")

    metrics: dict[str, Any] = {"eval_task": name, "eval_questions": len(questions)}
    replies: dict[str, list[str]] = {}
    shared: dict[str, Any] = {}  # what the `before` phase leaves for `after` (tasks.Phase.shared)
    models = (("before", ctx.input("download-model", "model")), ("after", ctx.input("merge", "model")))
    for phase_name, model_dir in models:
        model, tokenizer = load_for_inference(model_dir)
        template = resolve_template(cfg["template"], tokenizer)
        prompts = [prompt_ids(tokenizer, template, [], q.input, data.system) for q in questions]
        replies[phase_name] = generate_replies(
            model,
            tokenizer,
            prompts,
            stop_words(template),
            evaluation["max_new_tokens"],
            evaluation["batch_size"],
        )
        if questions:
            log.info("[evaluate-chat] %s: %s → %r", phase_name, questions[0].input, replies[phase_name][0])
        phase = Phase(phase_name, model, tokenizer, template, shared)
        metrics.update(task.score(phase, questions, replies[phase_name], data, cfg["dataset"]))
        del model, phase
    metrics.update(task.baselines(data, questions))

    with open(ctx.out / "samples.jsonl", "w") as fh:
        for q, before, after in zip(questions, replies["before"], replies["after"], strict=True):
            row = {"input": q.input, "reference": q.reference, "before": before, "after": after}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return metrics


STAGE = Stage(
    name="evaluate-chat",
    version="4",
    reads=("eval", "template", "dataset.name", "dataset.max_length"),
    upstream=("download-model", "map", "merge"),
    outputs=("samples.jsonl",),
    run=run,
)
