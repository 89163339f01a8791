"""Batched greedy generation that stops at the template's stop words, and teacher-forced answer loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.labels import IGNORE_INDEX


@torch.no_grad()
def generate_replies(
    model,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    stop_words: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy replies for already-encoded prompts (left-padded batches), cut at the first stop word."""
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = [tokenizer.convert_tokens_to_ids(w) for w in stop_words]
    eos_ids = sorted(
        {i for i in stop_ids if isinstance(i, int) and i != tokenizer.unk_token_id} | {tokenizer.eos_token_id}
    )
    device = next(model.parameters()).device
    replies: list[str] = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            stop_strings=[w for w in stop_words if w] or None,
            tokenizer=tokenizer,
        )
        for row in out[:, width:]:
            replies.append(
                cut_at_stop_words(tokenizer.decode(row, skip_special_tokens=False), stop_words, tokenizer)
            )
    return replies


def cut_at_stop_words(text: str, stop_words: Sequence[str], tokenizer) -> str:
    ends = [
        text.find(w)
        for w in [*stop_words, tokenizer.eos_token or "", tokenizer.pad_token or ""]
        if w and w in text
    ]
    text = text[: min(ends)] if ends else text
    return text.strip()


@torch.no_grad()
def answer_loss(model, samples: Sequence[tuple[list[int], list[int]]]) -> float:
    """Token-weighted mean cross-entropy on the label-carrying (answer) tokens of each sample."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for input_ids, labels in samples:
        ids = torch.tensor([input_ids], device=device)
        lab = torch.tensor([labels], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        target = lab[:, 1:]
        keep = target != IGNORE_INDEX
        if keep.any():
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count if count else float("nan")
