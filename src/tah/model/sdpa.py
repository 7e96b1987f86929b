"""HF's `sdpa` attention, minus a copy: grouped KV heads with a mask on CPU.

TaH passes need a mask whenever they are not plain causal attention (every depth >= 1 pass, fused
decode steps, padding). With a mask, HF's `sdpa` repeats every KV head group into a new tensor
before calling `scaled_dot_product_attention`, because CUDA's fast kernels take grouped heads only
without a mask. CPU kernels take them with one (`enable_gqa=True`), so there the copy is pure cost:
of the whole cache, at every layer of every such pass. `tah_sdpa` skips it on CPU and hands every
other case to HF's own function unchanged, so results are HF's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "tah_sdpa"


def tah_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, H, A, D), key/value (B, KV, S, D), attention_mask (B, 1, A, S) additive or None.
    Returns ((B, A, H, D), None) like HF's attention functions."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = (attention_mask is None or groups == 1 or query.device.type != "cpu" or query.shape[2] == 1
             or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "cache"))
             or kwargs.get("output_attentions"))
    if plain:  # HF's path: no mask (is_causal), no groups, CUDA, single query (HF packs it), extras
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, tah_sdpa_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_tah_sdpa(lm: torch.nn.Module) -> None:
    """Switch a model that runs HF's `sdpa` to `tah_sdpa`; any other implementation is left alone."""
    if getattr(lm.config, "_attn_implementation", None) == "sdpa":
        lm.set_attn_implementation(NAME)
