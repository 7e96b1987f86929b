"""The duo-causal rule, in one place.

A query at (position p, depth d) sees the KV entry (p', d') iff p' <= p, d' <= d and the entry is
valid (not padding). Depth 0 is therefore exactly the base model's causal attention, and a deeper
query sees the whole shallower prefix plus the deeper entries of earlier hard tokens and its own.
"""

from __future__ import annotations

import torch

from tah.errors import ConfigError
from tah.kernels.sdpa import NAME as TAH_SDPA


def duo_causal_visible(q_pos: torch.Tensor, q_depth: int | torch.Tensor, k_pos: torch.Tensor,
                       k_depth: torch.Tensor, k_valid: torch.Tensor) -> torch.Tensor:
    """Bool (B, Tq, S): may query i see key j. q_pos (B, Tq); q_depth int or (B, Tq); k_* (B, S)."""
    if isinstance(q_depth, int):
        depth_ok = (k_depth <= q_depth)[:, None, :]
    else:
        depth_ok = k_depth[:, None, :] <= q_depth[:, :, None]
    return (k_pos[:, None, :] <= q_pos[:, :, None]) & depth_ok & k_valid[:, None, :]


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Tq, S) bool -> (B, 1, Tq, S) additive float mask, as HF's eager and SDPA paths take it.

    A float mask (not bool) keeps a query that sees nothing (a fully padded row) finite: it
    averages the values instead of returning NaN, and its output is never read.
    """
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


# HF attention implementations that apply a 4D additive mask as given (ours is `sdpa`'s, see kernels/sdpa.py).
# Flash kernels take padding masks only, paged ones their own cache, and flex_attention crashed on
# CPU with such a mask (torch 2.13).
TAKES_ADDITIVE_MASK = ("sdpa", "eager", TAH_SDPA)


def check_attn_implementation(config) -> None:
    """Raise `ConfigError` when the model's HF config selects an attention implementation that cannot
    take the duo-causal mask (which TaH passes as a ready (B, 1, A, S) additive tensor)."""
    implementation = getattr(config, "_attn_implementation", None)
    if implementation is not None and implementation not in TAKES_ADDITIVE_MASK:
        raise ConfigError(
            f"attn_implementation={implementation!r} cannot apply TaH's duo-causal attention mask (an additive "
            "(batch, 1, queries, keys) tensor); load the base model with attn_implementation=\"sdpa\" (HF's default; "
            "on CUDA its flash kernel still runs the unmasked depth-0 passes) or \"eager\""
        )
