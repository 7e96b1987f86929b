"""Attention with grouped KV heads on CPU, minus two costs of HF's `sdpa`.

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
Every other case on CPU goes to HF's own function unchanged (see `tah.kernels.sdpa`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tah.kernels.masks import packed_mask

PACKED_QUERIES = 64  # from this many masked queries a row on (any batch, with or without autograd), packed
DECODE_QUERIES = 3  # a decode step's queries a row (a deep one, two draft candidates): packed, any batch;
# greedy's batch-1 default (two candidates) makes 3; four (three candidates) take enable_gqa: in-loop one-off,
# 144 vs 153 us packed a layer, within noise


def grouped_attention_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                          groups: int, dropout: float = 0.0, scaling: float | None = None) -> torch.Tensor:
    """query (B, H, A, D), key/value (B, KV, S, D) with H = KV * groups > KV, mask (B, 1, A, S)
    additive, or None for a single query (A = 1) -> (B, A, H, D), with no KV head copied."""
    batch, heads, queries, dim = query.shape
    if queries == 1:  # the group's heads as its queries; a (B, 1, 1, S) mask broadcasts over them
        out = F.scaled_dot_product_attention(query.reshape(batch, heads // groups, groups, dim), key, value,
                                             attn_mask=mask, dropout_p=dropout, scale=scaling)
        return out.reshape(batch, 1, heads, dim)
    if mask.shape[1] == 1 and _packs(queries, query.requires_grad):
        # (B, KV, groups * A, D) queries under the (B, 1, groups * A, S) mask repeated per head of a group
        out = F.scaled_dot_product_attention(query.reshape(batch, heads // groups, groups * queries, dim), key, value,
                                             attn_mask=packed_mask(mask, groups), dropout_p=dropout, scale=scaling)
        return out.view(batch, heads, queries, dim).transpose(1, 2).contiguous()
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous()


def _packs(queries: int, grad: bool) -> bool:
    """Run a masked pass with a KV group's queries packed as one (see the module docstring)?"""
    return queries >= PACKED_QUERIES or queries <= DECODE_QUERIES and not grad
