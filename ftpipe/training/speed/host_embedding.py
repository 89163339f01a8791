"""A frozen input embedding table in host memory (`train.speed.cpu_embeddings`, QLoRA's default on CUDA)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .stack import decoder_stack


class HostEmbedding(nn.Module):
    """A frozen input embedding kept in (pinned) host memory: the rows of a micro-batch are gathered on the CPU
    and copied over, instead of holding the whole table on the GPU (1 GiB for Qwen2.5-7B's 152k x 3584)."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.weight_host = emb.weight.detach().to("cpu")  # a plain attribute: model.to(device) leaves it
        self.padding_idx = emb.padding_idx
        self.embedding_dim = emb.embedding_dim
        self.num_embeddings = emb.num_embeddings
        self.device = emb.weight.device
        self.pending: torch.Tensor | None = None  # host copy of the next call's ids (see stash_host_ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        host, self.pending = self.pending, None
        # ids from the collator's host copy; else read back from the GPU (a sync)
        flat = (
            host.reshape(-1)
            if host is not None and host.numel() == ids.numel()
            else ids.reshape(-1).to("cpu")
        )
        pin = torch.cuda.is_available()  # pinned: the copy below runs asynchronously
        buf = torch.empty((flat.numel(), self.embedding_dim), dtype=self.weight_host.dtype, pin_memory=pin)
        torch.index_select(self.weight_host, 0, flat, out=buf)
        return buf.to(self.device, non_blocking=True).view(*ids.shape, self.embedding_dim)


def host_embeddings(model: nn.Module) -> bool:
    """Move a frozen, untied input embedding to host memory (`HostEmbedding`); False where it is tied to the
    output head (Llama-3.2-1B: the same matrix is the LM head's) or trains."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if type(emb) is not nn.Embedding or emb.weight.requires_grad or emb.weight.device.type != "cuda":
        return False
    if head is not None and getattr(head, "weight", None) is emb.weight:
        return False
    host = HostEmbedding(emb)
    base.set_input_embeddings(host)

    def stash_host_ids(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        held = kwargs.pop("host_input_ids", None)
        if held is not None:
            host.pending = getattr(held, "tensor", held)
        return args, kwargs

    decoder_stack(model).register_forward_pre_hook(stash_host_ids, with_kwargs=True)
    return True
