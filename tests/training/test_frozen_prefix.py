"""The frozen prefix run once (speed/frozen_prefix.py) gives the plain model's loss and LoRA gradients."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ftpipe.data.labels import IGNORE_INDEX
from ftpipe.training.collator import PackedCollator
from ftpipe.training.model import lora_config
from ftpipe.training.speed.attention import register_docs
from ftpipe.training.speed.frozen_prefix import ROW_INDEX, FrozenPrefix, Passthrough
from ftpipe.training.speed.loss import training_loss


def _model(last_layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4
    )
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "last_layers": last_layers}
    base = LlamaForCausalLM(config)
    base.set_attn_implementation(register_docs())  # per-document attention, as CPU training runs it
    model = get_peft_model(base, lora_config({"lora": lora}, base)).train()
    for name, p in model.named_parameters():  # non-zero B: the adapters change the output from step 0
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _rows() -> Dataset:
    torch.manual_seed(1)
    rows = []
    for lengths in ([5, 7, 4], [9, 6]):  # two packed rows of several documents
        ids = torch.randint(0, 64, (sum(lengths),))
        pos = torch.cat([torch.arange(n) for n in lengths])
        labels = ids.clone()
        labels[pos < 2] = IGNORE_INDEX  # a prompt-like start in each document
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "position_ids": pos.tolist()})
    return Dataset.from_list(rows).add_column(ROW_INDEX, [0, 1])


def _loss_and_grads(model, batch):
    loss, _ = training_loss(model, batch, None, "answer_only")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def test_frozen_prefix_gives_the_plain_loss_and_lora_gradients_and_restores_the_layers():
    rows = _rows()
    collate = PackedCollator(row_index=True)
    batch = collate([rows[1], rows[0]])  # a micro-batch in another order than the rows were cached
    plain = _model(last_layers=2)
    ref_loss, ref_grads = _loss_and_grads(plain, {k: v for k, v in batch.items() if k != ROW_INDEX})

    model = _model(last_layers=2)
    originals = list(model.base_model.model.model.layers)
    prefix = FrozenPrefix.build(model, rows, collate, torch.device("cpu"), None)
    assert prefix is not None and prefix.start == 2
    assert [isinstance(layer, Passthrough) for layer in model.base_model.model.model.layers] == [1, 1, 0, 0]
    loss, grads = _loss_and_grads(model, prefix.inputs(batch))
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert set(grads) == set(ref_grads) and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    prefix.restore()
    assert list(model.base_model.model.model.layers) == originals


def test_nothing_is_cached_when_every_layer_trains():
    model = _model(last_layers=4)
    assert (
        FrozenPrefix.build(model, _rows(), PackedCollator(row_index=True), torch.device("cpu"), None) is None
    )
