"""The `preference` task: held-out pairs (prompt, chosen, rejected), scored by the model's log-probs.

Metrics per phase (`before` = the base model, `after` = the merged one):
- `preference_accuracy_<phase>`: share of pairs whose chosen answer the model gives a higher log-prob
  (summed over the answer's tokens, as the objectives do) than the rejected one; about 0.5 for a model
  that has no view, and what a reward model's accuracy means on these pairs.
- after training, the implicit rewards against the base (DPO's reference): `reward_chosen` /
  `reward_rejected` = mean log(pi / pi_base) of each side, `reward_margin` = their mean difference,
  `reward_accuracy` = share of pairs whose chosen answer gained more than the rejected one. They are not
  scaled by train.dpo.beta, so runs of a beta sweep (and ORPO runs) compare on one scale.
With `dataset.name` set (the embedded assistant pairs) the replies to the assistant task's self-introduction
prompts are scored too (`name_rate_<phase>`): whether the generated replies moved towards the chosen side.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.info import DataInfo
from . import assistant


def _pairs(data: DataInfo) -> list[list[dict[str, Any]]]:
    return [conv for conv in data.held_out if "rejected" in conv[-1]]


def questions(data: DataInfo, dataset_cfg: dict[str, Any]) -> list:
    from . import Question

    seen: dict[str, Question] = {}
    for conv in _pairs(data):  # several pairs may share a prompt: ask it once
        seen.setdefault(conv[-1]["input"], Question(conv[-1]["input"], conv[-1]["output"]))
    asked = list(seen.values())
    if dataset_cfg.get("name"):
        asked += assistant.questions(data, dataset_cfg)
    return asked


@torch.no_grad()
def pair_logps(phase: Any, data: DataInfo) -> torch.Tensor:
    """[pairs, 2] summed answer log-probs (chosen, rejected) of the held-out pairs under `phase.model`: each
    pair as one packed row, two documents, as in training."""
    from ..data.formats import pair_conversations
    from ..data.templates import encode_conversation
    from ..training.objectives import document_logps

    phase.model.eval()
    device = next(phase.model.parameters()).device
    out = []
    for conv in _pairs(data):
        ids, labels, positions = [], [], []
        for side in pair_conversations(conv):
            side_ids, side_labels = encode_conversation(phase.tokenizer, phase.template, side)
            ids += side_ids
            labels += [-100, *side_labels[1:]]
            positions += range(len(side_ids))
        batch = {
            name: torch.tensor([values], device=device)
            for name, values in (("input_ids", ids), ("labels", labels), ("position_ids", positions))
        }
        sums, _ = document_logps(phase.model, batch)
        out.append(sums)
    return torch.stack(out) if out else torch.zeros(0, 2)


def score(phase: Any, questions: list, replies: list[str], data: DataInfo, dataset_cfg: dict) -> dict:
    logps = pair_logps(phase, data)
    metrics: dict[str, Any] = {"preference_pairs": len(logps)}
    if len(logps):
        metrics[f"preference_accuracy_{phase.name}"] = float((logps[:, 0] > logps[:, 1]).float().mean())
        metrics[f"logp_chosen_{phase.name}"] = float(logps[:, 0].mean())
        metrics[f"logp_rejected_{phase.name}"] = float(logps[:, 1].mean())
        base = phase.shared.setdefault("base_logps", logps)  # the first phase is the base model
        if base is not logps:
            ratio = logps - base
            margin = ratio[:, 0] - ratio[:, 1]
            metrics.update(
                reward_chosen=float(ratio[:, 0].mean()),
                reward_rejected=float(ratio[:, 1].mean()),
                reward_margin=float(margin.mean()),
                reward_accuracy=float((margin > 0).float().mean()),
            )
    if dataset_cfg.get("name"):
        metrics.update(assistant.score(phase, questions, replies, data, dataset_cfg))
    return metrics


def baselines(data: DataInfo, questions: list) -> dict[str, float]:
    return {}
