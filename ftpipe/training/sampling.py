"""In-training sample replies every N steps (XTuner's EvaluateChatHook): watch the model learn the format."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..data.info import DataInfo

log = logging.getLogger("ftpipe")

N_PROMPTS = 3


def sample_prompts(
    data: DataInfo, template: dict[str, Any], tokenizer: Any
) -> tuple[list[str], list[list[int]], list[str]]:
    """(questions, prompt ids, stop words): held-out inputs if the recipe holds some out, else training ones,
    formatted exactly as training formats them (template, system prompt, BOS)."""
    from ..data.templates import prompt_ids, resolve_template, stop_words

    template = resolve_template(template, tokenizer)
    questions = data.prompts(N_PROMPTS)
    ids = [prompt_ids(tokenizer, template, [], q, data.system) for q in questions]
    return questions, ids, stop_words(template)


class SampleReplies(TrainerCallback):
    def __init__(
        self,
        every: int,
        tokenizer: Any,
        questions: list[str],
        prompt_ids: list[list[int]],
        stop_words: list[str],
        max_new_tokens: int,
        out_file: Path,
        autocast_dtype: torch.dtype | None,
    ):
        self.every, self.tokenizer, self.questions, self.prompt_ids = every, tokenizer, questions, prompt_ids
        self.stop_words, self.max_new_tokens, self.out_file = stop_words, max_new_tokens, out_file
        self.autocast_dtype = autocast_dtype

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every or not state.is_world_process_zero or model is None:
            return
        from ..evaluation.generate import generate_replies
        from .speed.attention import attention_for_generation

        device = next(model.parameters()).device
        was_training = model.training
        with (
            attention_for_generation(model),
            torch.autocast(
                device.type, dtype=self.autocast_dtype or torch.float32, enabled=bool(self.autocast_dtype)
            ),
        ):
            replies = generate_replies(
                model, self.tokenizer, self.prompt_ids, self.stop_words, self.max_new_tokens
            )
        model.train(was_training)
        with open(self.out_file, "a") as fh:
            for question, reply in zip(self.questions, replies, strict=True):
                log.info("[train] step %d  %r → %r", state.global_step, question, reply)
                fh.write(json.dumps({"step": state.global_step, "input": question, "reply": reply}) + "\n")
