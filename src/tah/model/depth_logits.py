"""How the passes of one forward become its logits: where the LM head runs, how each pass's logits
add up, and which rows the next pass's soft input reads.

The arithmetic is TaH's under every plan: a token's logits are the sum of the logits of the passes
it ran, and the soft input of its next pass is read from that sum. The plans differ only in what
they compute and keep, for speed; `TaHForCausalLM.forward` chooses one per call:

- `EveryTokenLogits`: the sums of every token, (B * T, V), as training and plain forwards return
  them. Depth 0's logits *are* the sum so far (no copy); deeper passes add into it in place.
- `TailLogits` (logits_to_keep = n < T): the last n columns' sums only, (B * n, V). When decisions
  come before each pass (`sparse`), the LM head runs only on the tail tokens and those that
  continue: a prefill for generation makes a few rows of logits, not (B * T, V).
- `SharedHeadLogits`: a two-pass training step with a plain linear head, whose two head products
  share their work in backward (kernels/shared_head.py).

A plan's contract (`LogitsPlan`): `run` runs the pass of the given tokens and adds its logits;
`soft_input` gives the soft inputs of the tokens that continue; `logits` holds the sums.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from tah.kernels.rows_grad import DepthZeroLogits, GatherRows, RowsGradient
from tah.kernels.shared_head import SharedHead
from tah.model.packing import PassTokens
from tah.model.soft_input import soft_embedding_of_top

if TYPE_CHECKING:
    from tah.model.tah_model import ForwardCall, TaHForCausalLM


class LogitsPlan(Protocol):
    logits: torch.Tensor | None  # (B * keep, V) the sums; row b * keep + t: column T - keep + t of row b

    def run(self, tokens: PassTokens, last: bool, go_on: torch.Tensor | None) -> tuple[torch.Tensor | None, tuple]:
        """Run the pass of `tokens` (at tokens.depth) and add its logits. go_on (B, A) bool: the
        tokens that continue, when decided before the pass. Returns the sums of the tokens the head
        ran on, as rows in packing order (None after the `last` pass, where nobody reads them), and
        the pass's hidden states that the decider reads (None when `last`)."""

    def soft_input(self, go_on_flat: torch.Tensor, index: torch.Tensor,
                   chosen: torch.Tensor | None = None) -> torch.Tensor:
        """(n, H) soft inputs of the n tokens that continue: go_on_flat (N,) bool over the pass's
        tokens in packing order; index (n,) their flat positions b * T + t in the input; chosen
        (n,), when given, the places of go_on_flat's True entries (no boolean selection then)."""


class EveryTokenLogits:
    """The sums of every token's logits, (B * T, V)."""

    def __init__(self, model: TaHForCausalLM, call: ForwardCall) -> None:
        self.model, self.call = model, call
        self.in_place = model._logits_in_place
        self.logits: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None  # the last pass's tokens' sums (packing order)
        self.carry: torch.Tensor | None = None  # the sums of the tokens now running a deeper pass
        self.rows_grad: RowsGradient | None = None

    def run(self, tokens, last, go_on):
        head_rows = None if tokens.packing.full else tokens.packing.flat_index()  # deeper tokens, all real: (N, V) at once
        with self.call.frozen():
            logits, hidden = self.model.run_pass(tokens, self.call.cache, need_hidden=not last, need=head_rows)
            if self.logits is None:  # depth 0 over every token: its logits are the sums so far
                self.rows = tokens.packing.unpack(logits)
                # 2-D, so that the loss reads it without a view (kernels/rows_grad.py)
                self.rows_grad = RowsGradient() if torch.is_grad_enabled() and self.in_place else None
                self.logits = logits.flatten(0, 1) if self.rows_grad is None else \
                    DepthZeroLogits.apply(logits, self.rows_grad)
            else:
                self.rows = None if last else self.carry + logits  # the last pass's sums: read by nobody
                index = tokens.packing.rows * self.call.length + tokens.packing.cols
                # in place, no (B * T, V) copy forward or backward; index_add: ~20x faster on CPU
                # than an accumulating index_put
                self.logits = self.logits.index_add_(0, index, logits) if self.in_place else \
                    self.logits.index_add(0, index, logits)
        return self.rows, hidden

    def soft_input(self, go_on_flat, index, chosen=None):
        if self.carry is None:  # after depth 0: rows of the sums themselves, whose gradient goes by rows_grad
            self.carry = self.logits.index_select(0, index) if self.rows_grad is None else \
                GatherRows.apply(self.logits, index, self.rows_grad)
        else:
            self.carry = self.rows[go_on_flat if chosen is None else chosen]
        with self.call.frozen():
            return self.model.soft_input(self.carry)


class TailLogits:
    """The sums of the last `call.keep` columns, (B * keep, V); `sparse`: the LM head runs only where
    logits are kept or read by the next soft input (decisions made before each pass)."""

    def __init__(self, model: TaHForCausalLM, call: ForwardCall, sparse: bool) -> None:
        self.model, self.call, self.sparse = model, call, sparse
        self.in_place = model._logits_in_place
        self.logits: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None  # the sums of the tokens the head ran on (packing order)
        self.carry: torch.Tensor | None = None  # the sums of the tokens now running a deeper pass
        self.need: torch.Tensor | None = None  # (N,) bool: the tokens the head ran on; None: all

    def run(self, tokens, last, go_on):
        packing, call = tokens.packing, self.call
        in_tail = packing.cols >= call.length - call.keep
        need = None
        if self.sparse:
            need = in_tail if go_on is None else in_tail | packing.unpack(go_on)
        head_rows = packing.pack(need) if need is not None else None if packing.full else tokens.real
        with call.frozen():
            logits, hidden = self.model.run_pass(tokens, call.cache, need_hidden=not last, need=head_rows)
            rows = packing.unpack(logits) if head_rows is None else logits
            if self.carry is not None:
                rows_sums = None if last else (self.carry if need is None else self.carry[need]) + rows
            else:
                rows_sums = rows
            self.logits = self._add_tail(rows, tokens, in_tail, need)
        self.rows, self.need = rows_sums, need
        return rows_sums, hidden

    def _add_tail(self, rows: torch.Tensor, tokens: PassTokens, in_tail: torch.Tensor,
                  need: torch.Tensor | None) -> torch.Tensor:
        """The sums with `rows` (the logits of the tokens the head ran on) added where in the tail."""
        packing, keep = tokens.packing, self.call.keep
        values = rows[in_tail if need is None else in_tail[need]]
        where = in_tail if need is None else need & in_tail
        index = packing.rows[where] * keep + packing.cols[where] - (self.call.length - keep)
        if self.logits is None:
            return values.new_zeros(self.call.batch * keep, values.shape[-1]).index_copy_(0, index, values)
        return self.logits.index_add_(0, index, values) if self.in_place else self.logits.index_add(0, index, values)

    def soft_input(self, go_on_flat, index, chosen=None):
        self.carry = self.rows[go_on_flat if self.need is None else go_on_flat[self.need]]
        with self.call.frozen():
            return self.model.soft_input(self.carry)


class SharedHeadLogits:
    """A two-pass training step's sums, (B * T, V), made by a `SharedHead` (never frozen: stage 1)."""

    def __init__(self, model: TaHForCausalLM, call: ForwardCall, shared: SharedHead) -> None:
        self.model, self.call, self.shared = model, call, shared
        self.logits: torch.Tensor | None = None

    def run(self, tokens, last, go_on):
        head_rows = None if tokens.packing.full else tokens.packing.flat_index()  # deeper tokens, all real
        # the pass returns final hidden states; the shared head makes their logits
        final, hidden = self.model.run_pass(tokens, self.call.cache, need_hidden=not last, need=head_rows,
                                            head=_unchanged)
        self.logits = self.shared.depth_zero(final) if self.logits is None else \
            self.shared.add_deep(self.logits, final)
        return self.logits, hidden

    def soft_input(self, go_on_flat, index, chosen=None):
        top = self.shared.top_k(self.logits, index, self.model.tah_config.input_topk)
        return soft_embedding_of_top(*top, self.model.embed.weight)


def _unchanged(states: torch.Tensor) -> torch.Tensor:
    return states
