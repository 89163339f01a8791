"""Document boundaries (ftpipe/data/boundaries.py): one rule, a document starts where positions do not continue
by +1, read the same by the collator, every attention path and the loss, also where a document does not
start at position 0 (a continuation at position 256, or positions [0, 1, 2, 5, 6, 7])."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftpipe.data import boundaries
from ftpipe.data.labels import IGNORE_INDEX
from ftpipe.training.collator import PackedCollator
from ftpipe.training.speed import attention as attn
from ftpipe.training.speed.loss import answer_only_loss, patch_causal_lm

# Two packed rows. Row 0: documents of 3, 3, 2 tokens, the second starting at position 5 (not 0, and not
# following the first); row 1: 4 tokens, then a document continuing at position 256 (a split document).
ROWS = [[0, 1, 2, 5, 6, 7, 0, 1], [0, 1, 2, 3, 256, 257, 258, 259]]
STARTS, LENGTHS = [0, 3, 6, 8, 12], [3, 3, 2, 4, 4]  # over the flattened batch


def _rows() -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    out = []
    for pos in ROWS:
        ids = torch.randint(0, 64, (len(pos),))
        labels = ids.clone()
        labels[2] = IGNORE_INDEX  # a prompt token inside the first document
        out.append({"input_ids": ids, "labels": labels, "position_ids": torch.tensor(pos)})
    return out


def _docs(t: torch.Tensor) -> list[torch.Tensor]:
    """The documents of a flattened [1, T, ...] tensor, cut by hand at STARTS."""
    return [t[:, s : s + n] for s, n in zip(STARTS, LENGTHS, strict=True)]


def test_the_rule_is_positions_not_continuing_by_one() -> None:
    pos = torch.tensor([ROWS[0]])
    assert boundaries.starts(pos).tolist() == [[True, False, False, True, False, False, True, False]]
    assert boundaries.spans(torch.tensor(ROWS)) == (STARTS, LENGTHS)  # each row starts a document
    cu, longest = boundaries.cu_seqlens(torch.tensor(ROWS))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 6, 8, 12, 16] and longest == 4
    assert boundaries.document_ids(torch.tensor(ROWS)).tolist() == [
        [0, 0, 0, 1, 1, 1, 2, 2],
        [0] * 4 + [1] * 4,
    ]
    assert boundaries.spans(torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])) == ([0, 3, 5, 6], [3, 2, 1, 4])


def test_power_of_two_bound() -> None:
    assert [boundaries.round_up_pow2(n) for n in (1, 2, 3, 255, 256, 257)] == [1, 2, 4, 256, 256, 512]
    assert boundaries.length_bound(4, 16) == 16  # never above the batch's tokens
    assert boundaries.length_bound(300, 10_000) == 512 and boundaries.length_bound(3, 10_000) == 256


def test_shifted_targets_stop_at_every_document_start() -> None:
    labels = torch.arange(8)[None]
    targets = boundaries.shifted_targets(labels, torch.tensor([ROWS[0]]))
    assert targets.tolist() == [[1, 2, -100, 4, 5, -100, 7, -100]]
    assert boundaries.shifted_targets(labels, torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])).tolist() == [
        [1, 2, -100, 4, -100, 6, 7, -100]
    ]


def test_collator_attention_and_loss_see_the_same_documents() -> None:
    batch = PackedCollator(boundaries=True)(_rows())
    pos, labels = batch["position_ids"], batch["labels"]
    assert pos.shape == (1, 16)

    # varlen: the collator's boundaries, and those the per-forward hook computes without it
    assert batch["cu_seq_lens_q"].tolist() == [0, *[s + n for s, n in zip(STARTS, LENGTHS, strict=True)]]
    assert batch["max_length_q"] == boundaries.length_bound(4, 16) == 16
    _, hooked = attn.PackedBoundaries(attn.VARLEN)(None, (), {"position_ids": pos})
    assert torch.equal(hooked["cu_seq_lens_q"], batch["cu_seq_lens_q"])
    assert hooked["max_length_q"] == batch["max_length_q"]

    # loss: targets never cross a document start; the collator's count is theirs
    targets = boundaries.shifted_targets(labels, pos)
    for doc_targets in _docs(targets):
        assert doc_targets[0, -1] == IGNORE_INDEX  # a document's last token predicts nothing
    by_hand = sum(int((doc[0, 1:] != IGNORE_INDEX).sum()) for doc in _docs(labels))
    assert batch["loss_tokens"] == by_hand == int((targets != IGNORE_INDEX).sum())

    # attention (ftpipe_docs, flex): each document attends to itself alone, causally
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    outs = []
    for start, n in zip(STARTS, LENGTHS, strict=True):
        sl = slice(start, start + n)
        kd, vd = (t[:, :, sl].repeat_interleave(2, 1) for t in (k, v))
        outs.append(F.scaled_dot_product_attention(q[:, :, sl], kd, vd, is_causal=True).transpose(1, 2))
    ref = torch.cat(outs, dim=1)  # [1, T, heads, dim], each document alone
    module = torch.nn.Module().train()
    docs_out, _ = attn.doc_attention_forward(module, q, k, v, None, position_ids=pos)
    torch.testing.assert_close(docs_out, ref, atol=1e-5, rtol=1e-4)
    flex_out, _ = attn.flex_attention_forward(None, q, k, v, None, scaling=8**-0.5, position_ids=pos)
    torch.testing.assert_close(flex_out, ref, atol=1e-5, rtol=1e-4)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn.register())
    model.config.use_cache = False
    return model.train()


@pytest.mark.parametrize("mode", ["answer_only", "model"])
def test_packed_loss_equals_the_documents_run_alone(mode: str) -> None:
    """On a tiny Llama: the packed batch's loss (answer-only head, or the fused loss with the collator's
    boundaries) is the token-weighted loss of its documents, each run alone at its own positions."""
    model = _tiny_llama()
    batch = PackedCollator(boundaries=mode == "model")(_rows())
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    with torch.no_grad():
        total, count = 0.0, 0
        for d_ids, d_labels, d_pos in zip(_docs(ids), _docs(labels), _docs(pos), strict=True):
            logits = model(input_ids=d_ids, position_ids=d_pos).logits[0, :-1]
            target = d_labels[0, 1:]
            total += F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((target != IGNORE_INDEX).sum())
        if mode == "model":
            assert patch_causal_lm(model, "torch")
            with torch.enable_grad():
                packed = model(**batch).loss.item()
        else:
            packed = answer_only_loss(model, batch)[0].item()
    assert count == boundaries.loss_tokens(labels, pos)
    assert packed == pytest.approx(total / count, rel=1e-5)
