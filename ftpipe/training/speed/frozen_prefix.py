"""The frozen prefix, run once: when the bottom decoder layers train nothing (`train.lora.last_layers`), their
output for a packed row is the same in every epoch, so it is computed once per row before training and the
layers are skipped in every step after. On a CPU the forward through the frozen layers is most of what is left
of a step once the backward stops above them (docs/bench/colorist/).

Exact, not an approximation: the base weights are frozen, nothing below the first adapted layer has dropout
(LoRA dropout lives in the adapted layers), and a packed row's hidden states do not depend on the rows it is
batched with (attention stays inside each document). `test_frozen_prefix.py` checks loss and gradients
against the plain model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("ftpipe")

ROW_INDEX = "row_index"  # the dataset column (and batch key) naming each packed row
MAX_CACHE_BYTES = 4 << 30  # beyond this the hidden states would crowd host memory: run the layers instead


class _Stop(Exception):
    pass


class Passthrough(nn.Module):
    """Stands in for a frozen decoder layer whose output the batch already carries."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def _decoder(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model  # *ForCausalLM → its decoder (LlamaModel, Qwen2Model, …), which holds `.layers`


def first_trained_layer(model: nn.Module) -> int:
    """Index of the lowest decoder layer with a trainable parameter (the layer count if none trains); 0 when
    anything below the layers (the embeddings) trains."""
    decoder = _decoder(model)
    if any(p.requires_grad for p in decoder.embed_tokens.parameters()):
        return 0
    for i, layer in enumerate(decoder.layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return len(decoder.layers)


class FrozenPrefix:
    """Hidden states entering layer `start` for every packed row, and the model with layers below it skipped."""

    def __init__(self, model: nn.Module, start: int, hidden: list[torch.Tensor]) -> None:
        self.model, self.start, self.hidden = model, start, hidden
        layers = _decoder(model).layers
        self._skipped = [layers[i] for i in range(start)]
        for i in range(start):
            layers[i] = Passthrough()

    @classmethod
    def build(
        cls,
        model: nn.Module,
        rows: Any,
        collate: Any,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
    ) -> FrozenPrefix | None:
        """Run the frozen layers once over `rows` (the packed dataset); None where nothing would be saved."""
        start = first_trained_layer(model)
        layers = _decoder(model).layers
        if start == 0 or start >= len(layers):
            return None
        width = model.config.hidden_size
        tokens = sum(len(ids) for ids in rows["input_ids"])
        if tokens * width * 4 > MAX_CACHE_BYTES:
            log.info(
                "[train] frozen prefix: %d tokens' hidden states would not fit in memory; not kept", tokens
            )
            return None
        captured: list[torch.Tensor] = []

        def stop_after(_module: nn.Module, _args: Any, output: Any) -> None:
            captured.append((output[0] if isinstance(output, tuple) else output).detach())
            raise _Stop

        hook = layers[start - 1].register_forward_hook(stop_after)
        hidden, was_training = [], model.training
        model.train()  # the attention path of a training step (per document), not the eval one
        try:
            with (
                torch.no_grad(),
                torch.autocast(
                    device.type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)
                ),
            ):
                for i in range(len(rows)):
                    batch = collate([rows[i]])
                    try:
                        model(
                            input_ids=batch["input_ids"].to(device),
                            position_ids=batch["position_ids"].to(device),
                        )
                    except _Stop:
                        pass
                    hidden.append(captured.pop()[0])
        finally:
            hook.remove()
            model.train(was_training)
        log.info(
            "[train] frozen prefix: layers 0-%d run once for %d rows (%d tokens); each step starts at layer %d",
            start - 1,
            len(rows),
            tokens,
            start,
        )
        return cls(model, start, hidden)

    def inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch as the skipping model takes it: the cached hidden states in place of the token ids."""
        rows = batch[ROW_INDEX].reshape(-1).tolist()
        out = {k: v for k, v in batch.items() if k not in ("input_ids", ROW_INDEX)}
        out["inputs_embeds"] = torch.cat([self.hidden[i] for i in rows])[None]
        return out

    def restore(self) -> None:
        """Put the frozen layers back (before saving or generating with the model)."""
        layers = _decoder(self.model).layers
        for i, layer in enumerate(self._skipped):
            layers[i] = layer
