"""Per-document causal attention for padding-free packed rows, registered in transformers' attention interface.

A packed row holds several documents, found from its `position_ids` by ftpipe/data/boundaries.py. Three
implementations attend causally inside each document only, without a dense (tokens x tokens) mask:

- `ftpipe_docs` (CPU default): the documents are found from the position_ids, grouped by length, and
  each group runs as one batched `is_causal` sdpa call: sum(L_i^2) work instead of T^2 (on CPU a 1,100-token
  micro-batch of ~38-token chat examples spent half its step in masked attention). Registered with sdpa's mask
  function, so anything that is not packed training (generation with a KV cache, padded batches, eval mode)
  falls back to plain sdpa with the mask transformers built.
- `ftpipe_varlen` (CUDA default): `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 varlen kernel
  inside PyTorch), reading the boundaries from `cu_seq_lens_q` (the collator's, or `PackedBoundaries`'); or
  flash-attn-4's kernel for the same boundaries (`ftpipe_varlen_fa4`, fa4.py).
- `ftpipe_flex`: `flex_attention` with a document-causal `BlockMask`.

The last two are not in transformers' mask interface, so the model passes `attention_mask=None` to them.
`install_packed_attention` switches a model to them and adds the per-forward boundary hook.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...data import boundaries
from . import checkpointing, fa4
from .policy import Levers
from .stack import decoder_stack

VARLEN = "ftpipe_varlen"
VARLEN_FA4 = "ftpipe_varlen_fa4"
FLEX = "ftpipe_flex"


_VARLEN: tuple[Callable[..., Any], dict[str, Any], bool] | None = None


def _varlen_fn() -> tuple[Callable[..., Any], dict[str, Any], bool]:
    """varlen_attn and the keyword that makes it causal, which changed between torch releases: 2.11 has only
    `window_size` (flash-attn's convention: (-1, 0) is causal), later releases add `is_causal` and `enable_gqa`.
    Found once, outside the compiled layers (`install_packed_attention`): dynamo ignores an lru_cache and would
    trace `inspect.signature` at every compilation, a warm start's too."""
    global _VARLEN
    if _VARLEN is None:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        _VARLEN = (varlen_attn, causal, "enable_gqa" in params)
    return _VARLEN


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    kernel: str = "fa2",
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, H, T, D], key/value [B, Hkv, T, D] -> [B, T, H, D]."""
    if attention_mask is not None:
        raise ValueError("ftpipe_varlen attention takes packed rows without an attention_mask (padding-free)")
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None:
        cu, max_len = boundaries.cu_seqlens(kwargs["position_ids"])
    b, h, t, d = query.shape
    if b == 1 and cu.shape[0] == 2 and t >= LONG_DOCUMENT:  # the row is one document (a shape: no sync)
        return _one_long_document(query, key, value, scaling, kernel), None
    hkv = key.shape[1]
    q = query.transpose(1, 2).reshape(b * t, h, d)
    k = key.transpose(1, 2).reshape(b * t, hkv, d)
    v = value.transpose(1, 2).reshape(b * t, hkv, d)
    dtype = q.dtype
    if dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # fp32 weights under bf16 autocast (full fine-tuning) can hand over fp32 q/k/v (RoPE computes in fp32);
        # the FlashAttention kernels take 16-bit inputs only, as autocast would give sdpa
        half = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(half), k.to(half), v.to(half)
    if kernel == "fa4":  # grouped K/V heads as they are
        return fa4.varlen_attention(q, k, v, cu, max_len, scaling).view(b, t, h, d).to(dtype), None
    fn, causal, has_gqa_flag = _varlen_fn()
    extra: dict[str, Any] = {}
    if hkv != h and has_gqa_flag:
        extra["enable_gqa"] = True
    elif hkv != h:
        # The wrapper would reject or mis-handle grouped heads: repeat K/V (costs memory, always correct).
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    out = fn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **causal, **extra)
    return out.view(b, t, h, d).to(dtype), None


# A row that is a single document at least this long takes a single-document kernel instead of the packed
# rows' varlen path: cuDNN's fused attention, on an H200 1.5x FlashAttention-2's speed at head dim 64 and 1.7x at
# 128, forward + backward, for 32k-128k tokens; flash-attn-4's where `train.speed.attention_kernel=fa4`, 1.27x
# cuDNN's at 128k tokens and reading grouped K/V heads without a repeat (scripts/bench_attention.py,
# docs/performance.md). Short rows stay on varlen (packed documents, no plan build).
LONG_DOCUMENT = 16384


def _one_long_document(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None, kernel: str
) -> torch.Tensor:
    """Causal attention over one document: query [1, H, T, D], key/value [1, Hkv, T, D] -> [1, T, H, D]."""
    if torch.is_autocast_enabled("cuda") and query.dtype == torch.float32:  # as the varlen path: 16-bit only
        half = torch.get_autocast_dtype("cuda")
        query, key, value = query.to(half), key.to(half), value.to(half)
    if key.shape[1] != query.shape[1] and kernel != "fa4":
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _long_document_attention(query, key, value, scale, kernel).transpose(1, 2)


@torch._dynamo.disable  # it hands tensors between a checkpoint's two forwards: host-side state, not a graph
def _long_document_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, kernel: str
) -> torch.Tensor:
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if not grad and not checkpointing.keeping():  # a plain no-grad forward: no log-sum-exp needed
        return _attention_kernel(query, key, value, scaling, kernel, with_lse=False)[0]
    kept = checkpointing.replayed_attention(query.device)
    return _LongDocument.apply(query, key, value, scaling, kernel, kept)


def _tokens_first(t: torch.Tensor) -> torch.Tensor:
    """[1, H, T, D] -> [T, H, D], flash-attn-4's varlen layout (a view where the memory order already is)."""
    return t[0].transpose(0, 1).reshape(t.shape[2], t.shape[1], t.shape[3])


def _attention_kernel(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, kernel: str, with_lse: bool
) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(output [1, H, T, D], log-sum-exp, what else the backward takes): flash-attn-4's kernel (`kernel` fa4), or
    cuDNN's fused attention on the GPU, PyTorch's flash kernel on the CPU."""
    if kernel == "fa4":  # one document: the varlen kernel with a single span
        tokens = query.shape[2]
        # [0, T] made on the device: a list copied to it would wait for the stream (a host sync a layer)
        cu = torch.arange(0, 2 * tokens, tokens, dtype=torch.int32, device=query.device)
        out, lse = fa4.varlen_forward(*map(_tokens_first, (query, key, value)), cu, tokens, scaling)
        return out.transpose(0, 1)[None], lse, (cu, tokens)
    if query.device.type == "cuda":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, with_lse, 0.0, True, False, scale=scaling
        )
        return r[0], r[1], (r[6], r[7], r[2], r[3], r[4], r[5])  # philox seed/offset, cum_seq q/k, max q/k
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, True, scale=scaling
    )
    return out, lse, ()


def _attention_kernel_backward(
    grad: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    scaling: float,
    kernel: str,
    aux: tuple,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped as the inputs, for the output gradient `grad` of `_attention_kernel`'s output."""
    query, key, value, out, lse = saved
    if kernel == "fa4":
        cu, tokens = aux
        flat = map(_tokens_first, (grad, query, key, value, out))
        grads = fa4.varlen_backward(*flat, lse, cu, tokens, scaling)
        return tuple(g.transpose(0, 1)[None] for g in grads)
    if query.device.type == "cuda":
        seed, offset, cum_q, cum_k, max_q, max_k = aux
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad,
            query,
            key,
            value,
            out,
            lse,
            seed,
            offset,
            None,
            cum_q,
            cum_k,
            max_q,
            max_k,
            0.0,
            True,
            scale=scaling,
        )[:3]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, query, key, value, out, lse, 0.0, True, scale=scaling
    )


class _LongDocument(torch.autograd.Function):
    """The kernel's forward (or the output kept from a checkpoint's first forward: `kept`) and its backward."""

    @staticmethod
    def forward(ctx: Any, query, key, value, scaling: float, kernel: str, kept: tuple | None) -> torch.Tensor:
        out, lse, aux = (
            kept if kept is not None else _attention_kernel(query, key, value, scaling, kernel, True)
        )
        checkpointing.keep_attention(out, lse, aux)  # only inside an offloaded checkpoint's first forward
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scaling, ctx.kernel, ctx.aux = scaling, kernel, aux
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        grads = _attention_kernel_backward(grad, ctx.saved_tensors, ctx.scaling, ctx.kernel, ctx.aux)
        return (*grads, None, None, None)


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

    docs = boundaries.document_ids(position_ids)
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


def register() -> str:
    """Register the three implementations with transformers (idempotent); returns `ftpipe_docs`' name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionInterface.register(VARLEN_FA4, functools.partial(varlen_attention_forward, kernel="fa4"))
    AttentionInterface.register(FLEX, flex_attention_forward)
    return register_docs()


@contextmanager
def attention_for_generation(model: torch.nn.Module) -> Iterator[None]:
    """varlen and flex assume packed training rows (as many keys as queries, no KV cache, no padding mask), so a
    model set to them cannot decode; generation in the middle of a training run (sample replies) swaps in sdpa
    for its duration. Other implementations already handle decoding themselves (ftpipe_docs falls back)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = base.config._attn_implementation
    if impl not in (VARLEN, VARLEN_FA4, FLEX):
        yield
        return
    base.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        base.set_attn_implementation(impl)


class PackedBoundaries:
    """Forward pre-hook (with kwargs) on the decoder stack: computes the document boundaries once per forward
    and passes them down to every layer's attention as kwargs, so layers do no host syncs of their own.

    The longest document is rounded up (`boundaries.length_bound`), so compiled layers see few distinct values;
    after the first change dynamo treats it as a symbolic int anyway."""

    def __init__(self, attention: str) -> None:
        self.attention = attention

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        position_ids = kwargs.get("position_ids")
        if position_ids is None or kwargs.get("past_key_values") is not None:
            return args, kwargs
        if self.attention in (VARLEN, VARLEN_FA4):
            cu = kwargs.get("cu_seq_lens_q")
            if cu is None:  # not given by the collator: one host sync here, once per forward
                cu, longest = boundaries.cu_seqlens(position_ids)
                max_len = boundaries.length_bound(longest, position_ids.numel())
                kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
            torch._dynamo.maybe_mark_dynamic(cu, 0)  # the number of documents varies from step to step
        elif self.attention == FLEX and kwargs.get("ftpipe_block_mask") is None:
            kwargs["ftpipe_block_mask"] = document_block_mask(position_ids)
        return args, kwargs


# ------------------------------------------------------------------------------ ftpipe_docs (CPU)


DOCS = NAME = "ftpipe_docs"


# Up to this length a document's attention runs as plain matmul + softmax: CPU's flash kernel spends ~10 ms per
# call in its backward on short documents, where the [L, L] scores are tiny anyway.
MATH_MAX_LEN = 256


def _causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, scale: float | None
) -> torch.Tensor:
    length = q.shape[-2]
    if length > MATH_MAX_LEN or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1).to(v.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v)


def _packed_training(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> bool:
    position_ids = kwargs.get("position_ids")
    return (
        module.training
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
        and position_ids is not None
        and position_ids.shape[-1] == query.shape[2]
        and kwargs.get("sliding_window") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
    )


def doc_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, T, dim]
    key: torch.Tensor,  # [1, kv_heads, T, dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if not _packed_training(module, query, key, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    heads, kv_heads = query.shape[1], key.shape[1]
    q, k, v = query[0], key[0], value[0]  # [heads, T, dim]
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=0)
        v = v.repeat_interleave(heads // kv_heads, dim=0)
    starts, lengths = boundaries.spans(kwargs["position_ids"])
    by_length: dict[int, list[int]] = {}
    for start, length in zip(starts, lengths, strict=True):
        by_length.setdefault(length, []).append(start)

    order, outputs = [], []
    for length, group in by_length.items():
        idx = (torch.tensor(group, device=q.device)[:, None] + torch.arange(length, device=q.device)).view(-1)
        n = len(group)
        # [heads, n*L, dim] -> [n, heads, L, dim]
        q_g, k_g, v_g = (
            t.index_select(1, idx).view(t.shape[0], n, length, -1).transpose(0, 1) for t in (q, k, v)
        )
        out = _causal(q_g, k_g, v_g, dropout if module.training else 0.0, scaling)
        outputs.append(out.transpose(0, 1).reshape(heads, n * length, -1))
        order.append(idx)
    inverse = torch.empty_like(torch.cat(order))
    inverse[torch.cat(order)] = torch.arange(inverse.numel(), device=inverse.device)
    attn = torch.cat(outputs, dim=1).index_select(1, inverse)  # [heads, T, dim] in token order
    return attn.transpose(0, 1).unsqueeze(
        0
    ).contiguous(), None  # [1, T, heads, dim] like sdpa_attention_forward


def register_docs() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, doc_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


# ------------------------------------------------------------------------------ the attention lever


def attn_implementation(levers: Levers) -> str:
    """transformers' `attn_implementation` name for the resolved `train.speed.attention`."""
    if levers.attention == "varlen" and levers.attention_kernel == "fa4":
        return VARLEN_FA4
    return {"varlen": VARLEN, "flex": FLEX, "docs": DOCS}.get(levers.attention, "sdpa")


def install_packed_attention(model: nn.Module, levers: Levers) -> None:
    """Switch the model to varlen / flex and add the per-forward boundary hook (other choices: nothing to do)."""
    if levers.attention not in ("varlen", "flex"):
        return
    register()
    if levers.attention == "varlen":
        _varlen_fn()
    name = attn_implementation(levers)
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError):  # older transformers: the config field is what the layers read
        model.config._attn_implementation = name
    stack = decoder_stack(model)
    if not getattr(stack, "_ftpipe_boundaries", False):
        stack.register_forward_pre_hook(PackedBoundaries(name), with_kwargs=True)
        stack._ftpipe_boundaries = True
