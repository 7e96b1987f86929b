"""Linear layers over a few rows on CPU (decode steps), asked of BLAS in the layout it runs fastest.

`F.linear` asks BLAS for x @ W^T. For the 1-16 rows of a decode step, BLAS libraries differ a lot
in how they run that product, and the same product asked as W @ x^T (then transposed back) may
take another kernel. On an AMD EPYC (AVX2) with PyTorch's MKL, bench_decode's 56 linears over 2
rows took 15.5 ms as x @ W^T and 8.9 ms as W @ x^T (1 row: 8.2 vs 9.6 ms), and its 32000 x 512 LM
head took 12.0 vs 4.0 ms at 2 rows, and 6.6 vs 3.4 ms at 1 row when the row is doubled so that BLAS
runs its matrix kernel, not its slower vector one (one-off timings, weights cold from memory as in
a real step). So a fused decode step, whose second query should be nearly free, cost almost two
steps there. On other machines x @ W^T is as fast or faster.

Hence no fixed rule: each (rows, weight shape, dtype) times the candidate layouts on its first
calls, in place (cold weights, real neighbours), and keeps the fastest. Results agree with
`F.linear` to float rounding (a different summation order). Only inference on CPU takes this path,
and only for weights big enough to matter (tiny test models keep `F.linear`, bit for bit).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

MAX_ROWS = 16  # products over more rows keep F.linear (0 turns this module off)
MIN_WEIGHT = 1 << 16  # elements: smaller weights keep F.linear
TRIALS = 5  # timed calls of each candidate before the choice


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): x (..., in) -> (..., out), contiguous; at inference on CPU with at
    most MAX_ROWS rows, computed the fastest way this process has measured for its shape."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 0 < rows <= MAX_ROWS or weight.numel() < MIN_WEIGHT or x.device.type != "cpu" \
            or torch.is_grad_enabled() or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    key = (rows, *weight.shape, weight.dtype)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _Choice(_candidates(rows))
    out = choice.run(x.reshape(rows, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def _x_weight_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _weight_x_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = torch.mm(weight, x.t()) if bias is None else torch.addmm(bias[:, None], weight, x.t())
    return out.t().contiguous()


def _weight_x_t_doubled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One row, run as two: a matrix kernel instead of the vector one."""
    out = _weight_x_t(torch.cat([x, x]), weight, bias)
    return out[:1]


def _candidates(rows: int) -> list:
    return [_x_weight_t, _weight_x_t] + ([_weight_x_t_doubled] if rows == 1 else [])


class _Choice:
    """The candidates of one shape: tried in turn TRIALS times each, then the fastest by median."""

    def __init__(self, candidates: list) -> None:
        self.candidates = candidates
        self.seconds: list[list[float]] = [[] for _ in candidates]
        self.best = None
        self.turn = 0

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.best is not None:
            return self.best(x, weight, bias)
        index = self.turn % len(self.candidates)
        self.turn += 1
        start = time.perf_counter()  # CPU ops are synchronous: the call's time is the product's
        out = self.candidates[index](x, weight, bias)
        self.seconds[index].append(time.perf_counter() - start)
        if all(len(s) >= TRIALS for s in self.seconds):
            medians = [statistics.median(s) for s in self.seconds]
            self.best = self.candidates[medians.index(min(medians))]
        return out


_choices: dict[tuple, _Choice] = {}


def chosen() -> dict[tuple, str]:
    """{(rows, out, in, dtype): the layout chosen} so far in this process (for benchmarks, logs)."""
    return {key: c.best.__name__.lstrip("_") for key, c in _choices.items() if c.best is not None}
