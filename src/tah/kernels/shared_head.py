"""The LM head of a two-pass training step, with its products shared between the depths.

In a stage-1 step with max_iter 2, the LM head W (V, H) runs twice: on every token's final hidden
state h0 (N, H) at depth 0, and on the hard tokens' h1 (n, H) at depth 1, whose logits are added
to rows `index` of depth 0's. The loss's gradient G (N, V) reaches both; depth 0's logits also get
the soft input's gradient S, which is nonzero only at each hard row's top-k entries. Plain
autograd runs two more products over the n hard rows (G[index] @ W and G[index]^T h1, with
n ~ N / 10 and V = 150k on Qwen3) at a lower FLOP rate than the big ones. The same sums, grouped:

    dL/dh0 = G @ W + scatter_index(S @ W)       dL/dh1 = (G @ W)[index]
    dL/dW  = G^T (h0 + scatter_index(h1)) + S^T h0[index]

G @ W is computed once, in the depth-1 head's backward (which autograd runs first), and shared;
the depth-1 rows fold into depth 0's weight product; S stays sparse (n, k) and its two products
are embedding-bag sums. On the 41M benchmark model the head alone took 76-100 ms less (one-off
timing, 2026-11-24), of a ~5 s CPU step whose noise hides it (benchmarks/RESULTS.md). Exact up to
float summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SharedHead:
    """What the depth-1 head and the soft input's top-k leave, in backward, for depth 0's head."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # (V, H), the LM head's weight
        self.clear()

    def clear(self) -> None:
        self.index: torch.Tensor | None = None  # (n,) rows of the accumulated logits that iterate (top_k's)
        self.top: torch.Tensor | None = None  # (n, k) the soft input's top-k vocabulary entries
        self.top_grad: torch.Tensor | None = None  # (n, k) the loss's gradient at those entries
        self.deep_grad: torch.Tensor | None = None  # (N, V) G, as the deep rows' head got it
        self.hidden_grad: torch.Tensor | None = None  # (N, H) G @ W
        self.deep_hidden: torch.Tensor | None = None  # (n, H) h1

    def depth_zero(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) final hidden states -> (B * T, V) logits, the accumulated logits of depth 0."""
        return _DepthZeroHead.apply(hidden.flatten(0, 1), self.weight, self)

    def top_k(self, acc: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k (values (n, k), indices (n, k)) of rows `index` of acc (N, V), whose gradient
        goes to depth 0's head sparse, not back into acc. These rows are the ones add_deep fills."""
        self.index = index
        return _TopKRows.apply(acc, index, min(k, acc.shape[-1]), self)

    def add_deep(self, acc: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """acc (N, V) with hidden (n, H) @ W^T added into the rows top_k took, in place."""
        return _DeepRowsHead.apply(acc, hidden, self.weight, self.index, self)


class _DepthZeroHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, shared: SharedHead) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        ctx.shared = shared
        return F.linear(hidden, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        shared: SharedHead = ctx.shared
        dtype = grad.dtype  # bf16 under autocast, where hidden and weight stay float32
        table = weight.to(dtype)
        deep_grad, shared.deep_grad = shared.deep_grad, None
        if deep_grad is None:  # no deep rows
            grad_hidden, reads, extra = grad @ table, hidden, None
        elif deep_grad is grad:  # the G both heads got: share its products
            grad_hidden = shared.hidden_grad
            reads, extra = hidden.index_add(0, shared.index, shared.deep_hidden), None
        else:  # something else added to acc's gradient (nothing in our forward does): apart
            grad_hidden, reads = grad @ table, hidden
            extra = deep_grad.index_select(0, shared.index).t() @ shared.deep_hidden.to(dtype)
        if shared.top_grad is None:
            grad_weight = grad.t() @ reads.to(dtype)
        else:
            top, top_grad = shared.top, shared.top_grad.to(dtype)
            grad_hidden = grad_hidden.index_add(0, shared.index, F.embedding_bag(
                top, table, per_sample_weights=top_grad, mode="sum"))
            grad_weight = _bag_weight_grad(top, top_grad, hidden.index_select(0, shared.index).to(dtype), table)
            grad_weight.addmm_(grad.t(), reads.to(dtype))  # in place: no second (V, H) tensor for the sum
        if extra is not None:
            grad_weight += extra
        shared.clear()
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None


def _bag_weight_grad(top: torch.Tensor, top_grad: torch.Tensor, rows: torch.Tensor,
                     weight: torch.Tensor) -> torch.Tensor:
    """S^T rows as a (V, H) tensor, S (n, V) being top_grad at columns `top`: the weight gradient of
    an embedding-bag sum, which PyTorch scatters faster than `index_add_` (~5 vs ~60 ms here)."""
    with torch.enable_grad():
        table = weight.detach().requires_grad_()
        bags = F.embedding_bag(top, table, per_sample_weights=top_grad, mode="sum")
        (grad,) = torch.autograd.grad(bags, table, rows)
    return grad


class _TopKRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acc: torch.Tensor, index: torch.Tensor, k: int, shared: SharedHead):
        top = acc.index_select(0, index).topk(k, dim=-1)
        ctx.top, ctx.shared = top.indices, shared
        ctx.mark_non_differentiable(top.indices)
        return top.values, top.indices

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor, _):
        shared: SharedHead = ctx.shared
        shared.top, shared.top_grad = ctx.top, grad_values
        return None, None, None, None


class _DeepRowsHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acc: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                shared: SharedHead) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        ctx.index, ctx.shared = index, shared
        acc.index_add_(0, index, F.linear(hidden, weight))
        ctx.mark_dirty(acc)
        return acc

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        shared, index = ctx.shared, ctx.index
        shared.hidden_grad = grad @ weight.to(grad.dtype)  # depth 0's input gradient too: G reaches both heads whole
        shared.deep_grad, shared.deep_hidden = grad, hidden
        # W's gradient of both depths: in depth 0's backward, one product
        return grad, shared.hidden_grad.index_select(0, index).to(hidden.dtype), None, None, None
