"""Per-document causal attention for packed rows, registered in transformers' attention interface.

A packed row holds several documents; `position_ids` restart at 0 at each document. The functions here read the
document boundaries (`cu_seq_lens_q`, computed once per forward by `PackedBoundaries`, or from `position_ids`)
and attend causally inside each document only, without building a dense (tokens x tokens) mask:

- `varlen`: `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 varlen kernel inside PyTorch, CUDA only).
- `flex`: `torch.nn.attention.flex_attention` with a document-causal `BlockMask` (CUDA, or eager on CPU).

Names registered: `ftpipe_varlen`, `ftpipe_flex`. Neither is in transformers' mask interface, so the model
passes `attention_mask=None` and leaves the masking to us.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch

VARLEN = "ftpipe_varlen"
FLEX = "ftpipe_flex"


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask (same shape as `position_ids`, [B, T]): True where a new document begins.

    A document begins at the start of each row and wherever the position does not follow its predecessor
    (packing restarts positions at 0), the rule transformers uses to detect packed rows."""
    pos = position_ids.view(-1, position_ids.shape[-1])
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return starts


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths over the flattened batch (int32, [n_docs + 1]) and the longest document.

    Reads back one scalar (a device sync): call once per forward, not once per layer."""
    starts = document_starts(position_ids).reshape(-1)
    idx = torch.nonzero(starts).flatten().to(torch.int32)
    total = torch.tensor([starts.numel()], dtype=torch.int32, device=idx.device)
    cu = torch.cat([idx, total])
    max_len = int((cu[1:] - cu[:-1]).max().item())
    return cu, max_len


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of each token ([B, T], int32), counted over each row."""
    return document_starts(position_ids).to(torch.int32).cumsum(-1) - 1


@lru_cache(maxsize=1)
def _varlen_fn() -> tuple[Callable[..., Any], dict[str, Any], bool]:
    """varlen_attn and the keyword that makes it causal, which changed between torch releases: 2.11 has only
    `window_size` (flash-attn's convention: (-1, 0) is causal), later releases add `is_causal` and `enable_gqa`."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, causal, "enable_gqa" in params


# Set by the bench/probe after checking against a reference: whether the kernel accepts fewer KV heads than
# query heads without an explicit flag (flash-attn's kernels do; the PyTorch wrapper may not pass them through).
VARLEN_NATIVE_GQA: bool | None = None


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, H, T, D], key/value [B, Hkv, T, D] -> [B, T, H, D]."""
    if attention_mask is not None:
        raise ValueError("ftpipe_varlen attention takes packed rows without an attention_mask (padding-free)")
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None:
        cu, max_len = cu_seqlens_from_position_ids(kwargs["position_ids"])
    b, h, t, d = query.shape
    hkv = key.shape[1]
    fn, causal, has_gqa_flag = _varlen_fn()
    q = query.transpose(1, 2).reshape(b * t, h, d)
    k = key.transpose(1, 2).reshape(b * t, hkv, d)
    v = value.transpose(1, 2).reshape(b * t, hkv, d)
    extra: dict[str, Any] = {}
    if hkv != h:
        if has_gqa_flag:
            extra["enable_gqa"] = True
        elif not VARLEN_NATIVE_GQA:
            # The wrapper would reject or mis-handle grouped heads: repeat K/V (costs memory, always correct).
            k = k.repeat_interleave(h // hkv, dim=1)
            v = v.repeat_interleave(h // hkv, dim=1)
    out = fn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **causal, **extra)
    return out.view(b, t, h, d), None


_FLEX_COMPILED: Callable[..., Any] | None = None


def _flex_attention() -> Callable[..., Any]:
    """flex_attention compiled once (eager flex materialises the scores; compiled it is a fused kernel)."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = (
            torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
        )
    return _FLEX_COMPILED


def document_block_mask(position_ids: torch.Tensor, device: torch.device | None = None) -> Any:
    """A flex `BlockMask`: token q sees token kv iff same document and kv <= q (per row)."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = document_ids(position_ids)
    b, t = docs.shape

    def doc_causal(b_idx: Any, h_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (docs[b_idx, q_idx] == docs[b_idx, kv_idx]) & (kv_idx <= q_idx)

    dev = device or position_ids.device
    return create_block_mask(doc_causal, b, None, t, t, device=dev, _compile=dev.type == "cuda")


def flex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, H, T, D], key/value [B, Hkv, T, D] -> [B, T, H, D]."""
    block_mask = kwargs.get("ftpipe_block_mask")
    if block_mask is None:
        block_mask = document_block_mask(kwargs["position_ids"], query.device)
    out = _flex_attention()(
        query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register both functions with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionInterface.register(FLEX, flex_attention_forward)


class PackedBoundaries:
    """Forward pre-hook (with kwargs) on the decoder stack: computes the document boundaries once per forward
    and passes them down to every layer's attention as kwargs, so layers do no host syncs of their own.

    The longest document is rounded up to a power of two (an upper bound is all the kernel needs), so compiled
    layers see few distinct values; after the first change dynamo treats it as a symbolic int anyway."""

    def __init__(self, attention: str) -> None:
        self.attention = attention

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        position_ids = kwargs.get("position_ids")
        if position_ids is None or kwargs.get("past_key_values") is not None:
            return args, kwargs
        if self.attention == VARLEN:
            cu = kwargs.get("cu_seq_lens_q")
            if cu is None:  # not given by the collator: one host sync here, once per forward
                cu, max_len = cu_seqlens_from_position_ids(position_ids)
                max_len = min(max(256, 1 << (max_len - 1).bit_length()), position_ids.numel())
                kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
            torch._dynamo.maybe_mark_dynamic(cu, 0)  # the number of documents varies from step to step
        elif self.attention == FLEX and kwargs.get("ftpipe_block_mask") is None:
            kwargs["ftpipe_block_mask"] = document_block_mask(position_ids)
        return args, kwargs
