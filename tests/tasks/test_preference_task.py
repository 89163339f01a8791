"""The preference task on tiny_llama: each held-out pair's log-probs (its two answers packed in one row, as in
training, on the inference model's attention) equal each answer run alone; accuracy and implicit rewards follow."""

from __future__ import annotations

import pytest
import torch
import train_helpers as h

from ftpipe.config import compose, validate
from ftpipe.data.formats import pair_conversations
from ftpipe.data.info import DataInfo
from ftpipe.data.labels import IGNORE_INDEX
from ftpipe.data.templates import encode_conversation, resolve_template
from ftpipe.models.loading import load_for_inference
from ftpipe.tasks import Phase, preference

PAIRS = [
    [{"input": "Who are you?", "output": "Ada's assistant.", "rejected": "Nobody at all, really."}],
    [
        {"input": "Hi", "output": "Hello!", "masked": True},
        {"input": "Name?", "output": "I am Ada's helper.", "rejected": "No."},
    ],
]


def alone(model, ids: list[int], labels: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return float(logp[torch.tensor(labels[1:]) != IGNORE_INDEX].sum())


def test_pair_logps_equal_each_answer_alone_and_score_follows(tmp_path):
    model, tokenizer = load_for_inference(h.tiny_model_dir(tmp_path))
    template = resolve_template(validate(compose(["template=chatml"]))["template"], tokenizer)
    data = DataInfo("preference", None, PAIRS, [], [])
    got = preference.pair_logps(Phase("before", model, tokenizer, template), data)
    want = [
        [alone(model, *encode_conversation(tokenizer, template, side)) for side in pair_conversations(conv)]
        for conv in PAIRS
    ]
    assert torch.allclose(got, torch.tensor(want), atol=1e-4), (got, want)

    shared: dict = {}
    before = preference.score(
        Phase("before", model, tokenizer, template, shared), [], [], data, {"name": None}
    )
    accuracy = float(sum(c > r for c, r in want) / len(want))
    assert before["preference_accuracy_before"] == pytest.approx(accuracy) and "reward_margin" not in before
    after = preference.score(Phase("after", model, tokenizer, template, shared), [], [], data, {"name": None})
    assert after["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # the same model: no implicit reward
