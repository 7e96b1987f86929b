"""The plain PyTorch fallbacks of the device kernels, as HF computes them, on any device. Each device
kernel is held against its fallback here by the tests (tests/test_kernels.py)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

attention = sdpa_attention_forward  # HF's own sdpa: (module, query, key, value, mask, ...) -> ((B, A, H, D), None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear: x (..., in) -> (..., out)."""
    return F.linear(x, weight, bias)


def plan(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """`linear` as a one-argument callable of x, to keep per layer and shape (None under autograd)."""
    return None if torch.is_grad_enabled() else partial(F.linear, weight=weight, bias=bias)


def handles(rows: int, weight: torch.Tensor) -> bool:
    """Does this layout do anything but F.linear? Never."""
    return False
