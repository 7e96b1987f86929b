"""The hard tokens' depth-0 logits, gathered out of the (N, V) accumulated logits so that backward
makes no full-size copy.

The accumulated logits `acc` (N, V) receive two gradients: a dense one from the loss, and one on the
few rows gathered as the soft input of the next pass. Plain indexing would build the rows' gradient
in a zero (N, V) tensor and add it to the dense one; a sparse gradient avoids the zeros, but
autograd still adds it out of place, copying the whole (N, V) gradient (hundreds of MB at a 150k
vocabulary: ~10% of a CPU training step). Here the gather hands its gradient to the function that
made `acc`, whose backward autograd runs after it, and which scatters the rows into the dense
gradient in place when nothing else can read that gradient.
"""

from __future__ import annotations

import functools

import torch


class RowsGradient:
    """The gathered rows' gradient on its way from `GatherRows`' backward to `DepthZeroLogits`'."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None  # (n,) rows of acc
        self.grad: torch.Tensor | None = None  # (n, V)


class DepthZeroLogits(torch.autograd.Function):
    """(B, T, V) logits -> (B * T, V) acc on the same memory (not a view, so that adding to acc in
    place stays cheap); backward adds the `RowsGradient` into acc's gradient. The caller makes sure
    nothing saved `logits` for backward (acc is written in place)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: RowsGradient) -> torch.Tensor:
        ctx.rows, ctx.shape = rows, logits.shape
        return torch.ops.aten._unsafe_view(logits, (-1, logits.shape[-1]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows: RowsGradient = ctx.rows
        if rows.grad is not None:
            index, values = rows.index, rows.grad.to(grad.dtype)
            grad = grad.index_add_(0, index, values) if _only_autograd_holds(grad) else grad.index_add(0, index, values)
            rows.index = rows.grad = None
        return grad.view(ctx.shape), None


class GatherRows(torch.autograd.Function):
    """acc[index] for acc (N, V) made by `DepthZeroLogits` with the same `rows`; the gradient goes
    to `rows`, not back to acc directly."""

    @staticmethod
    def forward(ctx, acc: torch.Tensor, index: torch.Tensor, rows: RowsGradient) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = rows
        return acc.index_select(0, index)  # 3x faster than acc[index] on CPU

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (index,) = ctx.saved_tensors
        ctx.rows.index, ctx.rows.grad = index, grad_rows
        return None, None, None


def _only_autograd_holds(grad: torch.Tensor) -> bool:
    """Is `grad` a tensor of its own (not a view, no other tensor on its memory)? Then only autograd's
    buffer for this node holds it: the loss's gradient reaches acc either fresh or through a view
    (the `logits` users get are a view of acc), and a view makes this False."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None or grad._base is not None or not grad.is_contiguous():
        return False
    return use_count(grad.untyped_storage()._cdata) == _use_count_alone()


@functools.cache
def _use_count_alone() -> int:
    """The storage use count of a tensor nobody else holds, read as `_only_autograd_holds` reads it:
    2 on torch 2.11 and 2.13 (the tensor and the storage object asked for), 1 on 2.9 (the storage
    object not counted)."""
    alone = torch.empty(1)  # held by a name while its count is read
    return torch._C._storage_Use_Count(alone.untyped_storage()._cdata)
