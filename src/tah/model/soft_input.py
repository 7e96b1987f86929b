"""The input of a latent iteration: a soft embedding of the current prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_embedding(logits: torch.Tensor, table: torch.Tensor, topk: int) -> torch.Tensor:
    """softmax over the top-k of `logits` (N, V), times those rows of `table` (V, H), summed: (N, H)."""
    top = torch.topk(logits, k=min(topk, logits.shape[-1]), dim=-1)
    return soft_embedding_of_top(top.values, top.indices, table)


def soft_embedding_of_top(values: torch.Tensor, indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The same from the top-k already taken: values and indices (N, k)."""
    probs = torch.softmax(values, dim=-1).to(table.dtype)
    # embedding_bag sums the weighted rows without materialising an (N, k, H) gather.
    return F.embedding_bag(indices, table, per_sample_weights=probs, mode="sum")
