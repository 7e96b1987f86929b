"""`tah_sdpa`: HF's `sdpa` attention, with TaH's device kernels where they apply.

Registered with HF under NAME; wrapping a model that runs `sdpa` switches it here. Per call, the
kernels for the queries' device (`choose.attention_kernels`) take:
- a masked call, on CUDA: `cuda/attention.py` (KV groups packed as queries, memory-efficient kernel);
- a grouped-head call on CPU (masked, or a single query): `cpu/attention.py` (no KV-head copy);
- everything else (no grouping, plain causal prefill, extra arguments): HF's own function unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import tah.kernels.choose as choose
import tah.kernels.plain as plain

NAME = "tah_sdpa"


def tah_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, H, A, D), key/value (B, KV, S, D), attention_mask (B, 1, A, S) additive or None.
    Returns ((B, A, H, D), None) like HF's attention functions."""
    groups = getattr(module, "num_key_value_groups", 1)
    extras = (any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "cache"))
              or kwargs.get("output_attentions"))
    kernels = choose.attention_kernels(query.device)
    if kernels.masked is not None and attention_mask is not None and not extras:
        return kernels.masked(query, key, value, attention_mask, groups, dropout, scaling), None
    if kernels.grouped is None or groups == 1 or extras or attention_mask is None and query.shape[2] > 1:
        return plain.attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                               is_causal=is_causal, **kwargs)
    return kernels.grouped(query, key, value, attention_mask, groups, dropout, scaling), None


AttentionInterface.register(NAME, tah_sdpa_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_tah_sdpa(lm: torch.nn.Module) -> None:
    """Switch a model that runs HF's `sdpa` to `tah_sdpa`; any other implementation is left alone."""
    if getattr(lm.config, "_attn_implementation", None) == "sdpa":
        lm.set_attn_implementation(NAME)
