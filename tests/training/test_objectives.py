"""Preference objectives on tiny_llama: DPO (sigmoid, IPO, hinge) and ORPO on a fixed batch against the
formulas written out here from each document run alone; log 2 at step 0 with LoRA; packed pairs = unpacked;
a DPO run on the stand-in pairs raises the chosen answers' reward."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import train_helpers as h

from ftpipe.data.packing import pack
from ftpipe.training import speed
from ftpipe.training.collator import PackedCollator
from ftpipe.training.model import load_for_training
from ftpipe.training.objectives import PreferenceLoss, count_pairs

ANSWERS = [("#ff0000", "blue-ish"), ("a warm orange, #ffa500", "no"), ("#00ff00 grass", "#123456 is it")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return h.tiny_model_dir(tmp_path_factory.mktemp("objectives"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def pair_documents(tokenizer, n: int) -> list[tuple[list[int], list[int]]]:
    """chosen, rejected, chosen, ... : a prompt (no loss) + an answer (loss), as map writes pairs."""
    docs = []
    for i in range(n):
        prompt = tokenizer.encode(f"<|im_start|>user\ncolour {i}<|im_end|>\n<|im_start|>assistant\n")
        for answer in ANSWERS[i % len(ANSWERS)]:
            ids = tokenizer.encode(f"{answer}<|im_end|>\n")
            docs.append((prompt + ids, [-100] * len(prompt) + ids))
    return docs


def packed_rows(docs, max_length: int, pack_rows: bool) -> list[dict]:
    """The pack stage's rows for these documents (the real packing code, pairs kept together)."""
    ids = np.concatenate([d[0] for d in docs]).astype(np.int32)
    labels = np.concatenate([d[1] for d in docs]).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(d[0]) for d in docs])])
    p = pack(ids, labels, offsets, max_length, pack_rows, "truncate", pairs=True)
    rows = []
    for r in range(len(p.row_offsets) - 1):
        a, b = p.row_offsets[r], p.row_offsets[r + 1]
        rows.append(
            {"input_ids": p.input_ids[a:b], "labels": p.labels[a:b], "position_ids": p.position_ids[a:b]}
        )
    return rows


def pref_cfg(**train) -> dict:
    """The train stage's slice for the fast test settings on preference data."""
    from ftpipe.engine import slice_config
    from ftpipe.stages import train as train_stage

    return slice_config(train_stage.STAGE, h.composed("dataset=assistant_preference", **train))


def policy(model_dir, perturb: bool, method: str = "lora", **train):
    cfg = pref_cfg(method=method, **train)["train"]
    torch.manual_seed(0)
    model = load_for_training(model_dir, cfg, speed.resolve(cfg, "cpu"))
    if perturb:  # LoRA starts as the identity (B = 0): move it so that policy and reference differ
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
    return model, cfg


def logp_alone(model, ids: list[int], labels: list[int]) -> float:
    """A document run by itself: sum over its answer tokens of log p(token | the tokens before it)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return float(logp[torch.tensor(labels[1:]) != -100].sum())


def alone(model, docs, adapters: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen logps, rejected logps, answer token counts [pairs, 2]) from each document run alone."""
    if adapters:
        values = [logp_alone(model, *d) for d in docs]
    else:
        with model.disable_adapter():
            values = [logp_alone(model, *d) for d in docs]
    counts = torch.tensor([sum(x != -100 for x in lab[1:]) for _, lab in docs], dtype=torch.float64)
    v = torch.tensor(values, dtype=torch.float64)
    return v[0::2], v[1::2], counts.view(-1, 2)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_on_a_fixed_batch_is_the_formula(model_dir, tokenizer, loss_type):
    model, cfg = policy(model_dir, perturb=True, objective="dpo", **{"dpo.loss_type": loss_type})
    beta = cfg["dpo"]["beta"]
    docs = pair_documents(tokenizer, 3)
    rows = packed_rows(docs, 512, pack_rows=True)
    assert len(rows) == 1  # all three pairs in one packed row
    batch = PackedCollator()(rows)
    got = PreferenceLoss(cfg)(model, batch)

    pc, pr, n = alone(model, docs)
    rc, rr, _ = alone(model, docs, adapters=False)
    if loss_type == "ipo":  # IPO compares length-averaged log-probs (as TRL's DPOTrainer does)
        pc, pr, rc, rr = pc / n[:, 0], pr / n[:, 1], rc / n[:, 0], rr / n[:, 1]
    logits = (pc - pr) - (rc - rr)
    want = {
        "sigmoid": -F.logsigmoid(beta * logits),
        "hinge": torch.relu(1 - beta * logits),
        "ipo": (logits - 1 / (2 * beta)) ** 2,
    }[loss_type].mean()
    assert abs(float(got) - float(want)) < 1e-5, (float(got), float(want))
    assert float(want) != pytest.approx(math.log(2), abs=1e-3)  # the batch really separates the two models


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_dpo_loss_is_log_2_at_step_0_with_lora(model_dir, tokenizer, method):
    model, cfg = policy(model_dir, perturb=False, method=method, objective="dpo")
    batch = PackedCollator()(packed_rows(pair_documents(tokenizer, 3), 512, pack_rows=True))
    loss = PreferenceLoss(cfg)(model, batch)
    # QLoRA's 4-bit path with zero adapters adds exact zeros after a dtype round trip: a 1e-6 difference
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6 if method == "lora" else 1e-5)
    loss.backward()  # and it still has a gradient for the adapters
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n
    )


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_packed_pairs_give_the_loss_of_unpacked_ones(model_dir, tokenizer, objective):
    model, cfg = policy(model_dir, perturb=True, objective=objective)
    docs = pair_documents(tokenizer, 5)
    packed = packed_rows(docs, 96, pack_rows=True)
    one_pair_a_row = packed_rows(docs, 96, pack_rows=False)
    assert len(one_pair_a_row) == 5 and len(packed) < 5
    loss = PreferenceLoss(cfg)
    # pairs come out in another order once packed: compare the per-pair mean, which does not depend on it
    a, b = loss(model, PackedCollator()(packed)), loss(model, PackedCollator()(one_pair_a_row))
    assert abs(float(a) - float(b)) < 1e-5
    # the sum over micro-batches divided by the pairs of all of them (grad accumulation) is the same mean
    parts = [
        loss(model, PackedCollator()([row]), num_items_in_batch=torch.tensor(5)) for row in one_pair_a_row
    ]
    assert abs(float(sum(parts)) - float(b)) < 1e-5
    assert count_pairs(PackedCollator()(packed)["position_ids"]) == 5


def test_orpo_loss_on_a_fixed_batch_is_the_formula(model_dir, tokenizer):
    model, cfg = policy(model_dir, perturb=True, objective="orpo", **{"orpo.beta": 0.25})
    docs = pair_documents(tokenizer, 3)
    got = PreferenceLoss(cfg)(model, PackedCollator()(packed_rows(docs, 512, pack_rows=True)))
    pc, pr, n = alone(model, docs)
    mc, mr = pc / n[:, 0], pr / n[:, 1]  # per-token mean log-probs
    log_odds = (mc - mr) - (torch.log(1 - torch.exp(mc)) - torch.log(1 - torch.exp(mr)))
    want = (-mc - 0.25 * torch.log(torch.sigmoid(log_odds))).mean()
    assert abs(float(got) - float(want)) < 1e-5, (float(got), float(want))


def test_full_fine_tuning_dpo_uses_a_frozen_copy_as_reference(model_dir, tokenizer):
    from ftpipe.training.objectives import reference_copy

    model, cfg = policy(model_dir, perturb=False, method="full", objective="dpo")
    reference = reference_copy(model)
    batch = PackedCollator()(packed_rows(pair_documents(tokenizer, 3), 512, pack_rows=True))
    loss = PreferenceLoss(cfg, reference)
    assert float(loss(model, batch)) == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert abs(float(loss(model, batch)) - math.log(2)) > 1e-4  # the copy did not move with the policy
    assert not any(p.requires_grad for p in reference.parameters())


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_a_short_run_prefers_the_chosen_answers(tmp_path, model_dir, tokenizer, objective):
    from datasets import Dataset

    from ftpipe.data.info import DataInfo
    from ftpipe.training.fit import fit

    random.seed(0)
    pack_dir = tmp_path / "pack"
    rows = packed_rows(pair_documents(tokenizer, 24), 128, pack_rows=True)
    Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows]).save_to_disk(
        str(pack_dir / "dataset")
    )
    (tmp_path / "map").mkdir()
    DataInfo("preference", None, [], ["colour 1"], []).write(tmp_path / "map")
    cfg = pref_cfg(objective=objective, max_steps=8)
    job = h.job(cfg, tmp_path / "train", model_dir, pack_dir)
    job.data_info = tmp_path / "map" / "data.json"
    metrics = fit(job)
    history = [r for r in json.loads((tmp_path / "train" / "log_history.json").read_text()) if "loss" in r]
    assert metrics["train_steps"] == 8 and history[-1]["loss"] < history[0]["loss"], history
    if objective == "dpo":
        assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at step 0
        assert history[-1]["rewards_margin"] > 0 and history[-1]["rewards_accuracy"] > 0.5, history[-1]
    else:
        assert history[-1]["log_odds_ratio"] > history[0]["log_odds_ratio"], history


def test_grad_accumulation_equals_one_big_batch(tmp_path, model_dir, tokenizer):
    """The train key ignores how a step's rows are split (train.key_view): the pair count of the whole
    accumulated batch divides the loss, so 2 x 2 rows give the step 1 x 4 rows give."""
    from datasets import Dataset
    from safetensors.torch import load_file

    from ftpipe.data.info import DataInfo
    from ftpipe.training.fit import fit

    pack_dir = tmp_path / "pack"
    # rows of 1 pair and one of 5: whatever the shuffle, one step splits into micro-batches of unequal pairs
    docs, rows, start = pair_documents(tokenizer, 12), [], 0
    for size in [1] * 7 + [5]:
        rows += packed_rows(docs[2 * start : 2 * (start + size)], 512, pack_rows=True)
        start += size
    assert len(rows) == 8
    Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows]).save_to_disk(
        str(pack_dir / "dataset")
    )
    (tmp_path / "map").mkdir()
    DataInfo("preference", None, [], ["colour 1"], []).write(tmp_path / "map")
    weights, logs = [], []
    for mbs, ga in ((4, 1), (2, 2)):
        cfg = pref_cfg(objective="dpo", max_steps=2, micro_batch_size=mbs, grad_accum=ga)
        job = h.job(cfg, tmp_path / f"train-{mbs}x{ga}", model_dir, pack_dir)
        job.data_info = tmp_path / "map" / "data.json"
        fit(job)
        weights.append(load_file(str(job.out / "final" / "adapter_model.safetensors")))
        logs.append([r for r in json.loads((job.out / "log_history.json").read_text()) if "loss" in r])
    # loss and gradient norm (before clipping) of each step: Adam's update alone would hide a scale error
    for one, two in zip(*logs, strict=True):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-4)
        assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-3)
    assert logs[0][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    moved = max(float(w.abs().max()) for k, w in weights[0].items() if "lora_B" in k)
    assert moved > 1e-4  # the two steps changed the adapters
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key], atol=1e-5), key


def test_the_fused_cross_entropy_is_off_for_preference_objectives_only():
    for device in ("cpu", "cuda"):
        for objective in ("dpo", "orpo"):
            assert (
                speed.resolve({"method": "lora", "objective": objective, "speed": {}}, device).fused_ce
                == "off"
            )
    cuda_sft = speed.resolve({"method": "lora", "objective": "sft", "precision": "bf16", "speed": {}}, "cuda")
    assert cuda_sft.fused_ce != "off"
    cuda_dpo = speed.resolve({"method": "lora", "objective": "dpo", "precision": "bf16", "speed": {}}, "cuda")
    assert (cuda_dpo.attention, cuda_dpo.fused_lora, cuda_dpo.compile) == (
        cuda_sft.attention,
        cuda_sft.fused_lora,
        cuda_sft.compile,
    )  # the other levers stay
