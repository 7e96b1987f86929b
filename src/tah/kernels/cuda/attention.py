"""Masked attention for CUDA, with no KV-head copy and no per-shape planning.

A masked call (every depth >= 1 pass, fused decode steps, padding) takes `masked_attention`: the KV
group's heads packed as its queries (no KV-head copy), on the memory-efficient kernel. Left to
itself, SDPA sends masked calls to cuDNN, which plans anew for every shape: 22.8 ms of CPU a forward
call and 18.6 ms a backward call on an H200, where a training step's kernels all took 133 ms (issue
26). Unmasked calls (depth 0: causal prefill and training, a plain decode step) stay on HF's path
(flash), the plain fallback in `tah.kernels.plain`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tah.kernels.masks import packed_mask

# The kernels a masked call may take on CUDA: memory-efficient (arbitrary additive masks, forward and
# backward, no per-shape planning), else math. Not cuDNN (plans per shape, see above), not flash (no masks).
GPU_MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
