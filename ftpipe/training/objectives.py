"""Preference objectives on packed pairs: DPO (sigmoid, IPO, hinge) against a frozen reference, and ORPO.

A batch is PackedCollator's one row of documents; documents follow the one boundary rule
(data/boundaries.py: position_ids restart) and alternate chosen, rejected (map writes pairs so, pack keeps
them together), so document 2k is pair k's chosen answer and 2k+1 its rejected one. Each document's
log-probability is the sum over its trained tokens (labels not -100: the answer and its EOS) of
log p(token | everything before it in the same document).

Reductions divide by `num_items_in_batch`, the number of pairs in the whole accumulated batch (FtTrainer
counts them), so gradient accumulation equals one big batch, as for the token-weighted SFT loss.

The formulas are those of the papers as TRL implements them (trl.DPOTrainer: `sigmoid`, `ipo` on
length-averaged log-probs, `hinge`; trl ORPO: the odds ratio on length-averaged log-probs); the tests write
them out and compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data import boundaries
from ..data.labels import IGNORE_INDEX

PREFERENCE_OBJECTIVES = ("dpo", "orpo")
# inputs the collator adds for the fused SFT loss or the attention kernels; the model gets what it accepts
_NOT_MODEL_INPUTS = ("labels", "loss_tokens")


@dataclass
class PairLogps:
    """Per pair: summed log-prob of the chosen and rejected answers, and their trained-token counts."""

    chosen: torch.Tensor  # [pairs]
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def mean(self) -> PairLogps:
        """Length-averaged log-probs (IPO, ORPO)."""
        return PairLogps(
            self.chosen / self.chosen_tokens.clamp(min=1),
            self.rejected / self.rejected_tokens.clamp(min=1),
            self.chosen_tokens,
            self.rejected_tokens,
        )


def count_pairs(position_ids: torch.Tensor) -> int:
    """Pairs in a batch: half its documents."""
    return int(boundaries.starts(position_ids).sum()) // 2


def document_logps(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of the trained tokens, their count) per document of the flattened batch.

    The LM head runs only where a target is trained (logits_to_keep), as the SFT answer-only loss does: most
    of a pair's tokens are prompt."""
    labels, position_ids = inputs["labels"], inputs["position_ids"]
    targets = boundaries.shifted_targets(labels, position_ids)[:, :-1]  # [B, T-1]: position t predicts t+1
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    model_inputs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
    logits = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits  # [B, K, V]
    picked = targets[:, keep]  # [B, K]
    valid = picked != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(-1, picked.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    # document of each kept position, counted over the flattened batch (a target never crosses a document)
    doc = boundaries.starts(position_ids.expand_as(labels)).reshape(-1).cumsum(0) - 1
    doc = doc.view(labels.shape)[:, keep]
    n_docs = int(boundaries.starts(position_ids.expand_as(labels)).sum())
    sums = torch.zeros(n_docs, dtype=token_logp.dtype, device=token_logp.device)
    counts = torch.zeros(n_docs, dtype=torch.long, device=token_logp.device)
    sums.index_add_(0, doc.reshape(-1), token_logp.reshape(-1))
    counts.index_add_(0, doc.reshape(-1), valid.reshape(-1).long())
    return sums, counts


def pair_logps(model: torch.nn.Module, inputs: dict[str, Any]) -> PairLogps:
    sums, counts = document_logps(model, inputs)
    if sums.numel() % 2:
        raise ValueError(
            f"a preference batch holds {sums.numel()} documents: not chosen/rejected pairs (was the data "
            "packed with dataset.format=preference?)"
        )
    return PairLogps(sums[0::2], sums[1::2], counts[0::2], counts[1::2])


def dpo_losses(
    policy: PairLogps, reference: PairLogps, beta: float, loss_type: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, implicit reward of chosen, of rejected): reward = beta * log(pi / pi_ref)."""
    if loss_type == "ipo":  # IPO's loss is defined on length-averaged log-probs
        policy, reference = policy.mean(), reference.mean()
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    logits = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_losses(policy: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per pair, log odds ratio): NLL of the chosen answer (per token) - beta * log sigmoid(log odds)."""
    mean = policy.mean()
    # log odds(p) = log p - log(1 - p), with p the answer's per-token probability
    log_odds = (mean.chosen - mean.rejected) - (
        torch.log1p(-torch.exp(mean.chosen)) - torch.log1p(-torch.exp(mean.rejected))
    )
    return -mean.chosen - beta * F.logsigmoid(log_odds), log_odds.detach()


class PreferenceLoss:
    """The loss of one micro-batch for `train.objective` (dpo | orpo), and the scalars it logs."""

    def __init__(self, train_cfg: dict[str, Any], reference: torch.nn.Module | None = None) -> None:
        self.objective = train_cfg["objective"]
        self.dpo, self.orpo = train_cfg["dpo"], train_cfg["orpo"]
        self.reference = reference  # full fine-tuning: a frozen copy; LoRA: None (adapters disabled)
        self.logged: dict[str, list[torch.Tensor]] = {}

    def reference_logps(self, model: torch.nn.Module, inputs: dict[str, Any]) -> PairLogps:
        with torch.no_grad():
            if self.reference is not None:
                return pair_logps(self.reference, inputs)
            # LoRA / QLoRA: the base model is the policy with its adapters switched off, no second copy
            peft_model = getattr(model, "module", model)  # under DDP the PeftModel sits inside the wrapper
            with peft_model.disable_adapter():
                return pair_logps(peft_model, inputs)

    def __call__(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        policy = pair_logps(model, inputs)
        if self.objective == "dpo":
            reference = self.reference_logps(model, inputs)
            losses, chosen, rejected = dpo_losses(policy, reference, self.dpo["beta"], self.dpo["loss_type"])
            self._log(
                rewards_chosen=chosen,
                rewards_rejected=rejected,
                rewards_margin=chosen - rejected,
                rewards_accuracy=(chosen > rejected).float(),
            )
        elif self.objective == "orpo":
            losses, log_odds = orpo_losses(policy, self.orpo["beta"])
            self._log(log_odds_ratio=log_odds, odds_accuracy=(log_odds > 0).float())
        else:
            raise ValueError(f"not a preference objective: {self.objective!r}")
        self._log(logps_chosen=policy.chosen.detach(), logps_rejected=policy.rejected.detach())
        if num_items_in_batch is None:
            return losses.mean()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(losses.device)
        return losses.sum() / num_items_in_batch

    def _log(self, **values: torch.Tensor) -> None:
        # kept on the device until a log reads them: no host sync per step
        for key, value in values.items():
            self.logged.setdefault(key, []).append(value.detach().float())

    def pop_logs(self) -> dict[str, float]:
        """Means since the last call (over the pairs seen), for the training log."""
        out = {k: round(float(torch.cat(v).mean()), 4) for k, v in self.logged.items() if v}
        self.logged = {}
        return out


def reference_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Full fine-tuning's DPO reference: a frozen copy of the starting weights."""
    import copy

    reference = copy.deepcopy(model)
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference
