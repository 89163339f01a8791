"""Causal-LM loss without the full logits: the last linear layer and cross-entropy fused, chunk by chunk.

For Llama-3.2-1B a micro-batch of 8192 tokens would build 8192 x 128256 logits (2 GiB in bf16, 4 GiB once
upcast, and as much again for their gradient). Both implementations below compute the loss and its gradients
in the forward pass, one chunk of tokens at a time, so only a chunk's logits exist at once:

- `liger`: Liger-Kernel's `LigerFusedLinearCrossEntropyFunction` (Triton, CUDA).
- `torch`: `ChunkedLinearCrossEntropy` below (plain PyTorch, any device; the CPU path and the fallback).

`causal_lm_forward` replaces a `*ForCausalLM` instance's forward so that training steps use one of them.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

IGNORE = -100


def shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets: token t predicts labels[t + 1]; never across a document boundary of a packed row
    (the last token of one document does not predict the first of the next), nor past the row's end."""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        pos = position_ids.expand_as(labels)
        targets[:, :-1].masked_fill_(pos[:, 1:] != pos[:, :-1] + 1, IGNORE)
    return targets


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over valid tokens of CE(x @ W.T + b, y); gradients for x (and W, b if they need them) are computed
    in forward, chunk by chunk, and scaled by the incoming gradient in backward (as Liger does)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
    ) -> torch.Tensor:
        need_x, need_w = x.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_x = torch.zeros_like(x) if need_x else None
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 math for bf16 inputs
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        total = torch.zeros((), dtype=acc, device=x.device)
        for start in range(0, x.shape[0], chunk):
            xc, yc = x[start : start + chunk], targets[start : start + chunk]
            logits = (xc @ weight.T).to(acc)
            if bias is not None:
                logits += bias.to(acc)
            valid = yc != IGNORE
            safe_y = torch.where(valid, yc, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_y[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if need_x or need_w or need_b:
                # d(sum CE)/d logits = softmax - onehot, on valid rows only
                g = torch.exp(logits - lse[:, None])
                g.scatter_add_(1, safe_y[:, None], -torch.ones_like(g[:, :1]))
                g *= valid[:, None]
                if need_x:
                    grad_x[start : start + chunk] = (g.to(x.dtype) @ weight).to(x.dtype)
                if need_w:
                    grad_w += g.T @ xc.to(acc)
                if need_b:
                    grad_b += g.sum(0)
        ctx.save_for_backward(
            grad_x if need_x else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        grad_x, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out
        return (
            None if grad_x is None else grad_x * scale.to(grad_x.dtype),
            None if grad_w is None else grad_w * scale.to(grad_w.dtype),
            None if grad_b is None else grad_b * scale.to(grad_b.dtype),
            None,
            None,
        )


def _chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    # Keep each chunk's fp32 logits at about 4x the hidden states' size (Liger's rule with a larger budget).
    return max(64, min(tokens, (4 * tokens * hidden) // max(vocab, 1) // 64 * 64 or 64))


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    impl: str,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets` (-100 ignored), in fp32."""
    x = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    if impl == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        # Positional: input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
        # reduction, softcap, return_z_loss, accum_dtype (fp32 grads when the head trains: full fine-tuning).
        accum = torch.float32 if weight.requires_grad else None
        out = LigerFusedLinearCrossEntropyFunction.apply(
            x, weight, y, bias, None, IGNORE, 0.0, 0.0, "sum", None, False, accum
        )
        return out[0] if isinstance(out, tuple) else out
    if impl == "torch":
        return ChunkedLinearCrossEntropy.apply(x, weight, bias, y, _chunk_size(*x.shape, weight.shape[0]))
    raise ValueError(f"unknown fused cross-entropy implementation {impl!r}")


def _positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the True entries of a 1-D mask whose count is known: nonzero_static does not sync."""
    try:
        return torch.nonzero_static(mask, size=count).squeeze(1)
    except (RuntimeError, NotImplementedError, AttributeError):
        return torch.nonzero(mask).squeeze(1)


def causal_lm_forward(impl: str) -> Any:
    """A forward for `*ForCausalLM` models (Llama, Qwen2, Mistral, ... : `.model` + `.lm_head`) that uses the
    fused loss whenever labels are given and gradients are on; otherwise the model's own forward runs."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(
        self: nn.Module,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        if labels is None or not torch.is_grad_enabled():
            return type(self).forward(
                self,
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        num_items = kwargs.pop("num_items_in_batch", None)
        n_targets = kwargs.pop("loss_tokens", None)  # from PackedCollator(boundaries=True): a CPU int
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        targets = shifted_targets(labels.to(hidden.device), position_ids)
        if attention_mask is not None and attention_mask.dim() == 2:
            targets = targets.masked_fill(attention_mask == 0, IGNORE)
        head = self.lm_head
        x, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if n_targets is not None and n_targets < 0.9 * y.numel():
            # Answer-only: the head runs on trained positions only (most of a chat row is prompt, label -100);
            # the count is known on the host, so picking them needs no sync.
            idx = _positions(y != IGNORE, n_targets)
            x, y = x.index_select(0, idx), y.index_select(0, idx)
        if n_targets == 0:  # nothing to learn in this micro-batch: a zero that still reaches every adapter
            total = hidden.float().sum() * 0.0
        else:
            total = linear_cross_entropy_sum(x, head.weight, head.bias, y, impl)
        if num_items is not None:
            denom = torch.as_tensor(num_items, device=total.device)
        elif n_targets is not None:
            denom = torch.tensor(max(n_targets, 1), device=total.device)
        else:
            denom = (targets != IGNORE).sum().clamp(min=1)
        loss = total / denom.to(total.dtype)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    return forward


def patch_causal_lm(model: nn.Module, impl: str) -> bool:
    """Install the fused-loss forward on a `*ForCausalLM` instance; False where the head is not a plain Linear
    (a LoRA-wrapped or quantized lm_head), in which case the model keeps its own forward."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or not hasattr(model, "model"):
        return False
    model.forward = types.MethodType(causal_lm_forward(impl), model)
    return True
