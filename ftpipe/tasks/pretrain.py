"""The `pretrain` task (continued pretraining, XTuner's 增量预训练): perplexity on the held-out documents.

Metrics: `perplexity_before` / `perplexity_after`, exp of the mean next-token loss over every token of the
held-out documents (encoded as training encodes them: BOS + text + EOS, cut to `dataset.max_length`).
"""

from __future__ import annotations

import math
from typing import Any

from ..data.info import DataInfo


def questions(data: DataInfo, dataset_cfg: dict[str, Any]) -> list:
    return []  # nothing to answer: a document has no prompt; the score is its likelihood


def score(phase: Any, questions: list, replies: list[str], data: DataInfo, dataset_cfg: dict) -> dict:
    from ..data.templates import encode_pretrain
    from ..evaluation.generate import answer_loss

    texts = [conv[0]["output"] for conv in data.held_out]
    if not texts:
        return {}
    limit = int(dataset_cfg["max_length"])
    ids, labels = encode_pretrain(phase.tokenizer, texts)
    loss = answer_loss(phase.model, [(i[:limit], lab[:limit]) for i, lab in zip(ids, labels, strict=True)])
    return {f"heldout_loss_{phase.name}": loss, f"perplexity_{phase.name}": math.exp(loss)}


def baselines(data: DataInfo, questions: list) -> dict[str, float]:
    return {}
