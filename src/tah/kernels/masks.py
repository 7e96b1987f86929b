"""Mask layouts shared by the CPU and CUDA attention paths."""

from __future__ import annotations

import torch


def packed_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, 1, A, S) -> (B, 1, groups * A, S): the mask repeated for each head of a KV group. Made once
    per mask and kept on it: every layer of a pass gets the same mask object, and each copy would
    otherwise be remade per layer and, under autograd, saved per layer for backward (~60 MB a layer
    in float32 at batch 4 x 4096 tokens, 10% hard, KV groups of 2)."""
    packed = getattr(mask, "_tah_packed", None)
    if packed is None or packed.shape[2] != groups * mask.shape[2]:
        batch, _, queries, keys = mask.shape
        packed = mask.expand(batch, groups, queries, keys).reshape(batch, 1, groups * queries, keys)
        mask._tah_packed = packed
    return packed
