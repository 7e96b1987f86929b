"""HF's `sdpa` attention, minus two costs of grouped KV heads on CPU.

TaH passes need a mask whenever they are not plain causal attention (every depth >= 1 pass, fused
decode steps, padding). With a mask, HF's `sdpa` repeats every KV head group into a new tensor
before calling `scaled_dot_product_attention`, because CUDA's fast kernels take grouped heads only
without a mask. CPU kernels take them with one (`enable_gqa=True`), so there the copy is pure cost:
of the whole cache, at every layer of every such pass.

A single query (a decode step) goes further: the heads of one KV group become that group's queries,
(B, H, 1, D) -> (B, KV, H / KV, D), the trick HF itself uses for a single query under a mask. On CPU
it runs in about half the time of `enable_gqa` (measured 11 vs 22 us per layer at 300 keys, 78 vs 136
us at 2300), so we use it without a mask too, where HF takes `enable_gqa`. Several masked queries are
packed the same way, the mask repeated for each head of a group (built once per pass, shared by its
layers), where that measured faster:
- decode steps (2-3 queries a row, no autograd): per masked call inside bench_decode's loop on the
  AMD EPYC machine, 3.6-3.7 vs 5.2-6.3 ms at batch 8 and 2048 keys, 450 vs 535 us at batch 8 and
  64, 481 vs 518 at batch 4 and 300, equal at batch 2. At batch 1 a fused step with two draft
  candidates (greedy's default until 03c3b8e, 3 queries) took 0.4-0.9 ms less in all (its extra over a plain step,
  median of 6-8 runs: 7.6 vs 8.0 ms at context 64, 9.6 vs 10.5 at 2048; isolated calls at 2400 keys:
  292 vs 624 us). Passes of 4 to PACKED_QUERIES - 1 queries a row (prefill with padding) keep
  `enable_gqa`: its sums round as HF's own do, so depth 0 stays the base model to the bit there (a
  padded prefill of 2-3 tokens a row differs in float rounding);
- under autograd (training's deeper pass) from ~64 queries a row: 10.5 vs 11.9 ms forward +
  backward a layer at 115 x 1139, but 3.5 vs 3.0 ms at 4 queries.
Every other case on CPU goes to HF's own function unchanged.

On CUDA, a masked call takes `masked_attention_gpu`: the KV group's heads packed as its queries
(no KV-head copy), on the memory-efficient kernel. Left to itself, SDPA sends masked calls to cuDNN,
which plans anew for every shape: 22.8 ms of CPU a forward call and 18.6 ms a backward call on an
H200, where a training step's kernels all took 133 ms (issue 26). Unmasked calls (depth 0: causal
prefill and training, a plain decode step) stay on HF's path (flash).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "tah_sdpa"
PACKED_QUERIES = 64  # from this many masked queries a row on (any batch, with or without autograd), packed
DECODE_QUERIES = 3  # a decode step's queries a row (a deep one, two draft candidates): packed, any batch;
# greedy's batch-1 default now makes 4 (three candidates), which take enable_gqa: in-loop one-off, 144 vs
# 153 us packed a layer, within noise


def tah_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, H, A, D), key/value (B, KV, S, D), attention_mask (B, 1, A, S) additive or None.
    Returns ((B, A, H, D), None) like HF's attention functions."""
    groups = getattr(module, "num_key_value_groups", 1)
    extras = (any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "cache"))
              or kwargs.get("output_attentions"))
    batch, heads, queries, dim = query.shape
    if (query.device.type != "cpu" or GPU_PATH_ON_CPU) and attention_mask is not None and not extras:
        return masked_attention_gpu(query, key, value, attention_mask, groups, dropout, scaling), None
    if groups == 1 or query.device.type != "cpu" or extras or attention_mask is None and queries > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if queries == 1:  # the group's heads as its queries; a (B, 1, 1, S) mask broadcasts over them
        out = F.scaled_dot_product_attention(query.reshape(batch, heads // groups, groups, dim), key, value,
                                             attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
        return out.reshape(batch, 1, heads, dim), None
    if attention_mask.shape[1] == 1 and _packs(queries, query.requires_grad):
        # (B, KV, groups * A, D) queries under the (B, 1, groups * A, S) mask repeated per head of a group
        out = F.scaled_dot_product_attention(query.reshape(batch, heads // groups, groups * queries, dim), key, value,
                                             attn_mask=packed_mask(attention_mask, groups), dropout_p=dropout,
                                             scale=scaling)
        return out.view(batch, heads, queries, dim).transpose(1, 2).contiguous(), None
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


# The kernels a masked call may take on CUDA: memory-efficient (arbitrary additive masks, forward and
# backward, no per-shape planning), else math. Not cuDNN (plans per shape, see above), not flash (no masks).
GPU_MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
GPU_PATH_ON_CPU = False  # True: masked calls on CPU take the CUDA path too (how tests hold it to the rule)


def masked_attention_gpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                         groups: int, dropout: float = 0.0, scaling: float | None = None) -> torch.Tensor:
    """Duo-causal (any masked) attention for CUDA: query (B, H, A, D), key/value (B, KV, S, D) with
    H = KV * groups, mask (B, 1, A, S) additive -> (B, A, H, D). Each KV group's heads become that
    group's queries, (B, KV, groups * A, D), so no head of the cache is copied; one query a row needs
    no mask copy either (it broadcasts). No host sync and no data-dependent shape: CUDA graphs may
    capture it. Runs on any device (the CPU case is what tests hold against HF's sdpa)."""
    batch, heads, queries, dim = query.shape
    packed = query.reshape(batch, heads // groups, groups * queries, dim)
    bias = _in_dtype(mask, query.dtype)
    if queries > 1 and groups > 1:
        bias = packed_mask(bias, groups)
    with sdpa_kernel(GPU_MASKED_BACKENDS):
        out = F.scaled_dot_product_attention(packed, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling)
    # reshape, not view: CUDA's kernels may return the (B, KV, groups * A, D) output in another layout
    return out.reshape(batch, heads, queries, dim).transpose(1, 2).contiguous()


def _in_dtype(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask in the queries' dtype (SDPA's kernels take no other), made once per mask
    object: under autocast the mask is built in float32 while the queries are bf16. Clamped to the
    dtype's lowest finite value, so that a query that sees nothing (padding) averages the values
    instead of producing NaN, forward and backward."""
    if mask.dtype == dtype:
        return mask
    cast = getattr(mask, "_tah_cast", None)
    if cast is None or cast.dtype != dtype:
        cast = mask.clamp(min=torch.finfo(dtype).min).to(dtype)
        mask._tah_cast = cast
    return cast


def _packs(queries: int, grad: bool) -> bool:
    """Run a masked pass with a KV group's queries packed as one (see the module docstring)?"""
    return queries >= PACKED_QUERIES or queries <= DECODE_QUERIES and not grad


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


AttentionInterface.register(NAME, tah_sdpa_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_tah_sdpa(lm: torch.nn.Module) -> None:
    """Switch a model that runs HF's `sdpa` to `tah_sdpa`; any other implementation is left alone."""
    if getattr(lm.config, "_attn_implementation", None) == "sdpa":
        lm.set_attn_implementation(NAME)
