"""Packing the tokens that continue to a deeper pass into a dense (B, A) block, and back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tah.model.cache import KnownReal
from tah.model.step import Queries


@dataclass
class Packing:
    """Token (rows[i], cols[i]) of the (B, T) input sits at (rows[i], rank[i]) of the (B, A) block.

    Tokens keep their order within a row; rows with fewer tokens are padded on the right.
    """

    rows: torch.Tensor  # (N,)
    cols: torch.Tensor  # (N,)
    rank: torch.Tensor  # (N,)
    batch: int
    width: int  # A
    full: bool  # every token of the (B, T) input, in place: packing is the identity

    @classmethod
    def everything(cls, batch: int, length: int, device: torch.device) -> Packing:
        rows = torch.arange(batch, device=device).repeat_interleave(length)
        cols = torch.arange(length, device=device).repeat(batch)
        return cls(rows, cols, cols, batch, length, True)

    @classmethod
    def select(cls, rows: torch.Tensor, cols: torch.Tensor, batch: int, width: int | None = None) -> Packing:
        """rows/cols in row-major order (as `nonzero` and boolean selection return them); width: the
        most tokens of any row, when the caller knows it (else read from the device)."""
        # (bincount would read the largest row id on a GPU: a sync)
        counts = rows.new_zeros(batch).index_add_(0, rows, torch.ones_like(rows))
        starts = counts.cumsum(0) - counts
        rank = torch.arange(rows.numel(), device=rows.device) - starts[rows]
        if width is None:
            width = int(counts.max()) if rows.numel() else 0
        return cls(rows, cols, rank, batch, width, False)

    def flat_index(self) -> torch.Tensor:
        """(N,) where each token sits in the flattened (B * A) block: row-major, as a boolean
        selection of the block's tokens would order them."""
        return self.rows * self.width + self.rank

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        return x.flatten(0, 1) if self.full else x[self.rows, self.cols]

    def pack(self, flat: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """(N, ...) -> (B, A, ...), `fill` where a row has no token."""
        if self.full:
            return flat.unflatten(0, (self.batch, self.width))
        out = flat.new_full((self.batch, self.width, *flat.shape[1:]), fill)
        return out.index_put((self.rows, self.rank), flat)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(B, A, ...) -> (N, ...)."""
        return packed.flatten(0, 1) if self.full else packed[self.rows, self.rank]

    def scatter(self, dest: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """A copy of (B, T, ...) `dest` with the packed tokens replaced by `flat` (autograd-safe)."""
        if self.full:
            return flat.unflatten(0, dest.shape[:2])
        return dest.index_put((self.rows, self.cols), flat)


@dataclass(kw_only=True)
class PassTokens(Queries):
    """The queries of one pass of a forward: the tokens that reached its depth (an int), packed
    into a (B, A) block (`packing`: which tokens), with their inputs (B, A, H), positions (B, A),
    real (B, A) bool (False: padding of the block or of the input) and oracle pass counts (B, A)
    (-100 where none; None without iter_labels)."""

    packing: Packing
    labels: torch.Tensor | None

    @classmethod
    def of(cls, packing: Packing, depth: int, inputs: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
           iter_labels: torch.Tensor | None, known: KnownReal | None = None) -> PassTokens:
        """The packed tokens with their packed `inputs`, reading valid, positions and iter_labels
        (B, T) of the whole input; known: what the host knows of their padding (`LabelPlan`)."""
        real = packing.pack(packing.gather(valid), fill=False)
        packed_positions = packing.pack(packing.gather(positions))
        labels = None if iter_labels is None else packing.pack(packing.gather(iter_labels), fill=-100)
        return cls(inputs, packed_positions, depth, real, known=known, packing=packing, labels=labels)

    def count_pass(self, iter_count: torch.Tensor) -> torch.Tensor:
        """(B, T) pass counts with one more for each of these tokens."""
        where = (self.packing.rows, self.packing.cols)
        return iter_count.index_put(where, torch.ones_like(self.packing.rows), accumulate=True)


@dataclass
class LabelPlan:
    """What a forward's oracle pass counts (iter_labels) decide for all its passes, read from the
    device at once: its only host read (issue 26: a stage-1 step waited on a GPU 14 times; with
    the plan a training forward queues every pass without waiting). continuing[d][b]: the tokens of
    row b that run another pass after depth d."""

    continuing: list[list[int]]
    all_valid: bool  # no padding in the input
    right_padded: bool  # each row's padding, if any, after its tokens
    labelled: int  # real tokens with a label (not -100): stage 2's decider terms after depth 0

    @classmethod
    def read(cls, valid: torch.Tensor, iter_labels: torch.Tensor, max_iter: int) -> LabelPlan:
        """valid (B, T) bool, iter_labels (B, T) pass counts (-100 = none), as the forward has them."""
        lengths = valid.sum(1)
        leading = valid.int().cummin(1).values.sum(1)  # each row's first run of real tokens
        labelled = ((iter_labels != -100) & valid).sum(1)
        counts = [((iter_labels > depth + 1) & valid).sum(1) for depth in range(max_iter - 1)]
        lengths, leading, labelled, *counts = torch.stack([lengths, leading, labelled, *counts]).tolist()  # the one read
        return cls(counts, all(n == valid.shape[1] for n in lengths), leading == lengths, sum(labelled))

    def labelled_at(self, depth: int) -> int:
        """How many tokens of the pass at `depth` have a label (stage 2's decider terms after it):
        deeper passes hold only tokens whose label sent them there."""
        return self.labelled if depth == 0 else sum(self.continuing[depth - 1])

    def known(self, depth: int) -> KnownReal:
        """The padding of the pass at `depth`: the input's at depth 0; deeper, the packed tokens
        (all real, packed to the left of each row), whose rows hold as many as the widest only
        where every row holds that many."""
        if depth == 0:
            return KnownReal(self.all_valid, self.right_padded)
        counts = self.continuing[depth - 1]
        return KnownReal(all(n == max(counts) for n in counts), True)
