"""The training loss, every way ftpipe computes it (`loss_mode`: which one a run uses):

- `answer_only` (fused_ce off: the CPU default): the model's own forward with its LM head applied only where a
  label is trained (`answer_only_loss`).
- `model` (fused_ce liger | torch): the model computes the loss itself, with the forward `patch_causal_lm`
  installs: the last linear layer and cross-entropy fused, chunk by chunk, on the trained positions only.

For Llama-3.2-1B a micro-batch of 8192 tokens would build 8192 x 128256 logits (2 GiB in bf16, 4 GiB once
upcast, and as much again for their gradient). Both implementations below compute the loss and its gradients
in the forward pass, one chunk of tokens at a time, so only a chunk's logits exist at once:

- `liger`: Liger-Kernel's `LigerFusedLinearCrossEntropyFunction` (Triton, CUDA).
- `torch`: `ChunkedLinearCrossEntropy` below (plain PyTorch, any device; the CPU path and the fallback).

`causal_lm_forward` replaces a `*ForCausalLM` instance's forward so that training steps use one of them; the
liger way falls back to Liger's own autograd function where the head trains or has a bias.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...data.boundaries import round_up_pow2, shifted_targets
from ...data.labels import IGNORE_INDEX

LOSS_MODES = ("answer_only", "model")


def answer_only_loss(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    num_items_in_batch: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, Any]:
    """Causal-LM loss with the LM head applied only where a label is trained.

    Most tokens of a chat example are prompt (label -100); the vocab projection and softmax over them are
    wasted work. `logits_to_keep` accepts an index tensor, so the model computes hidden states for all
    tokens but logits only at positions t whose next label labels[t+1] is trained (never across a document
    start: `boundaries.shifted_targets`, as the fused loss and the collator's count). Reduction matches
    transformers' ForCausalLMLoss: fp32 cross-entropy, summed and divided by `num_items_in_batch` (the
    trained-token count of the whole accumulated batch) or averaged when it is not given.
    """
    # targets[:, t]: the label position t predicts (labels[t + 1]), none across a document start
    targets = shifted_targets(inputs["labels"], inputs.get("position_ids"))[:, :-1]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    outputs = model(**model_inputs, logits_to_keep=keep)
    logits = outputs.logits  # [batch, len(keep), vocab]
    picked = targets[:, keep]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        picked.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, outputs


def training_loss(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    num_items_in_batch: torch.Tensor | int | None,
    mode: str,
) -> tuple[torch.Tensor, Any]:
    """(loss, outputs) of one micro-batch in `mode` (see the module doc)."""
    if mode == "answer_only":
        return answer_only_loss(model, inputs, num_items_in_batch)
    if mode != "model":
        raise ValueError(f"unknown loss mode {mode!r} (one of {LOSS_MODES})")
    outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
    return outputs.loss, outputs


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
            valid = yc != IGNORE_INDEX
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


# Rows per chunk of the sync-free Liger path: the chunk's logits take about LIGER_CHUNK_CONST x the hidden states'
# memory (Liger's own default is 1x, which gives Qwen2.5-7B's 152k vocabulary chunks of 128 rows: each chunk
# re-reads the whole 1.1 GB head, so the head GEMMs run memory-bound), between 256 and 1024 rows.
LIGER_CHUNK_CONST = 4
LIGER_CHUNK_ROWS = (256, 1024)


def _liger_chunk_rows(tokens: int, hidden: int, vocab: int) -> int:
    inc = max(1, -(-vocab // (LIGER_CHUNK_CONST * hidden)))
    rows = round_up_pow2(-(-tokens // inc))
    lo, hi = LIGER_CHUNK_ROWS
    return max(1, min(tokens, hi, max(lo, rows)))


class LigerLinearCrossEntropy(torch.autograd.Function):
    """Liger's fused linear + cross-entropy (its Triton CE kernel, chunk by chunk) for a frozen head without bias
    (LoRA, QLoRA), minus the two host syncs of `LigerFusedLinearCrossEntropyFunction`: its forward reads the
    number of trained targets back (`.item()`, only needed for reduction="mean"; we sum) and its backward
    compares the incoming gradient with 1.0 on the host (`torch.equal`). Each drained the GPU queue once per
    micro-batch. Loss in fp32; the input gradient is computed in forward and scaled in backward, as Liger does."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel

        tokens, vocab = x.shape[0], weight.shape[0]
        need_x = x.requires_grad
        grad_x = torch.empty_like(x) if need_x else None
        loss = torch.zeros(tokens, dtype=torch.float32, device=x.device)  # ignored rows are not written
        buf = torch.empty((min(chunk, tokens), vocab), dtype=x.dtype, device=x.device)
        block = min(32768, round_up_pow2(vocab))
        for start in range(0, tokens, chunk):
            end = min(start + chunk, tokens)
            logits = buf[: end - start]
            torch.mm(x[start:end], weight.t(), out=logits)
            # in place: logits -> d(sum CE)/d logits (rows with an ignored target zeroed)
            liger_cross_entropy_kernel[(end - start,)](
                X_ptr=logits,
                X_stride=logits.stride(-2),
                Y_ptr=targets[start:end],
                Y_stride=1,
                weight_ptr=None,
                loss_ptr=loss[start:end],
                z_loss_ptr=None,
                loss_stride=1,
                token_accuracy_ptr=None,
                token_accuracy_stride=0,
                predicted_tokens_ptr=None,
                predicted_tokens_stride=0,
                n_cols=vocab,
                n_non_ignore=2,  # read only for reduction="mean"
                sum_non_ignore_weight=2,
                weight_sum=0.0,
                ignore_index=IGNORE_INDEX,
                lse_square_scale=0.0,
                label_smoothing=0.0,
                reduction="sum",
                softcap=None,
                RETURN_Z_LOSS=False,
                RETURN_TOKEN_ACCURACY=False,
                RETURN_PREDICTED_TOKENS=False,
                HAS_WEIGHT=False,
                HAS_SOFTCAPPING=False,
                HAS_GRADIENTS=need_x,
                BLOCK_SIZE=block,
                num_warps=32,
            )
            if need_x:
                torch.mm(logits, weight, out=grad_x[start:end])
        ctx.save_for_backward(grad_x)
        return loss.sum()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        (grad_x,) = ctx.saved_tensors
        if grad_x is None:
            return None, None, None, None
        try:  # Liger's in-place row scaling, fp32 math (no host-side check for grad_out == 1)
            from liger_kernel.ops.utils import element_mul_kernel

            rows, cols = grad_x.shape
            element_mul_kernel[(rows,)](
                grad_x,
                grad_x.stride(-2),
                grad_out.float().contiguous(),
                cols,
                BLOCK_SIZE=min(32768, round_up_pow2(cols)),
                X_col_stride=grad_x.stride(-1),
                num_warps=32,
            )
        except (ImportError, TypeError):
            grad_x = (grad_x.float() * grad_out.float()).to(grad_x.dtype)
        return grad_x, None, None, None


@functools.lru_cache(maxsize=1)
def _liger_kernel_ok() -> bool:
    """Whether the installed Liger's CE kernel has the signature LigerLinearCrossEntropy calls."""
    try:
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel

        names = set(inspect.signature(liger_cross_entropy_kernel.fn).parameters)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    return {"RETURN_PREDICTED_TOKENS", "HAS_GRADIENTS", "token_accuracy_ptr", "n_non_ignore"} <= names


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
    if impl == "liger" and bias is None and not weight.requires_grad and x.is_cuda and _liger_kernel_ok():
        chunk = _liger_chunk_rows(x.shape[0], x.shape[1], weight.shape[0])
        return LigerLinearCrossEntropy.apply(x, weight, y.contiguous(), chunk)
    if impl == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        # Positional: input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
        # reduction, softcap, return_z_loss, accum_dtype (fp32 grads when the head trains: full fine-tuning).
        accum = torch.float32 if weight.requires_grad else None
        out = LigerFusedLinearCrossEntropyFunction.apply(
            x, weight, y, bias, None, IGNORE_INDEX, 0.0, 0.0, "sum", None, False, accum
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
            targets = targets.masked_fill(attention_mask == 0, IGNORE_INDEX)
        head = self.lm_head
        x, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if n_targets is not None and n_targets < 0.9 * y.numel():
            # Answer-only: the head runs on trained positions only (most of a chat row is prompt, label -100);
            # the count is known on the host, so picking them needs no sync.
            idx = _positions(y != IGNORE_INDEX, n_targets)
            x, y = x.index_select(0, idx), y.index_select(0, idx)
        if n_targets == 0:  # nothing to learn in this micro-batch: a zero that still reaches every adapter
            total = hidden.float().sum() * 0.0
        else:
            total = linear_cross_entropy_sum(x, head.weight, head.bias, y, impl)
        # A host number divides as a Python scalar: torch.tensor(n, device="cuda") would be a blocking copy
        # (a stream sync) every micro-batch.
        if num_items is not None and not torch.is_tensor(num_items):
            loss = total / float(num_items)
        elif num_items is not None:
            loss = total / num_items.to(device=total.device, dtype=total.dtype)
        elif n_targets is not None:
            loss = total / float(max(n_targets, 1))
        else:
            loss = total / (targets != IGNORE_INDEX).sum().clamp(min=1).to(total.dtype)
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
