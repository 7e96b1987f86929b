"""Linear layers over a few rows on CPU (decode steps), asked of BLAS in the layout it runs fastest.

`F.linear` asks BLAS for x @ W^T. For the 1-16 rows of a decode step, BLAS libraries differ a lot
in how they run that product, and the same product asked as W @ x^T (then transposed back) may
take another kernel. On an AMD EPYC (AVX2) with PyTorch's MKL, bench_decode's 56 linears over 2
rows took 15.5 ms as x @ W^T and 8.9 ms as W @ x^T (1 row: 8.2 vs 9.6 ms), and its 32000 x 512 LM
head took 12.0 vs 4.0 ms at 2 rows, and 6.6 vs 3.4 ms at 1 row when a zero row is added so that BLAS
runs its matrix kernel, not its slower vector one (one-off timings, weights cold from memory as in
a real step). So a fused decode step, whose second query should be nearly free, cost almost two
steps there. Any odd count of rows may take a zero row too (the head over 3 rows: 6.3 ms, over 4:
4.4 ms), which makes a third query (greedy's second draft) cheap. On other machines x @ W^T is as
fast or faster.

Hence no fixed rule: each (rows, weight shape, dtype) times the candidate layouts on its first
calls, in place (cold weights, real neighbours), and keeps the fastest. Results agree with
`F.linear` to float rounding (a different summation order). Only inference on CPU takes this path,
and only for weights big enough to matter (tiny test models keep `F.linear`, bit for bit).
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

MAX_ROWS = 16  # products over more rows keep F.linear (0 turns this module off)
MIN_WEIGHT = 1 << 16  # elements: smaller weights keep F.linear
TRIALS = 5  # timed calls of each candidate before the choice
ROW_COPY_FEATURES = 8192  # from this many output features on, results are transposed a row at a time


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): x (..., in) -> (..., out), contiguous; at inference on CPU with at
    most MAX_ROWS rows, computed the fastest way this process has measured for its shape."""
    key = _shape_key(x, weight)
    if key is None:
        return F.linear(x, weight, bias)
    best = _best.get(key)
    if best is not None:
        return best(x, weight, bias)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _Choice(_candidates(key[0]))
    out, best = choice.run(x, weight, bias)
    if best is not None:  # decided: off trial
        _best[key] = best
        del _choices[key]
    return out


def plan(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """`linear(x, weight, bias)` as a one-argument callable of x for inputs of x's shape and dtype,
    once the layout for that shape is decided (None while its trials run, or under autograd).
    Callers keep it per layer and shape: a decode step makes ~60 products, and on a CPU whose caches
    the weights just read have flushed, each Python step before the product costs microseconds
    (through `linear`, a plain step at batch 1 took 3.4-3.8% longer: bench_decode's model, steps
    alternating between the two ways within runs, one-off)."""
    if torch.is_grad_enabled():
        return None
    key = _shape_key(x, weight)
    best = F.linear if key is None else _best.get(key)
    return None if best is None else partial(best, weight=weight, bias=bias)


def _shape_key(x: torch.Tensor, weight: torch.Tensor) -> tuple | None:
    """(rows, weight shape, dtype): the key of x @ weight^T's layout choice, or None when it is
    plain F.linear (autograd, large or small products, GPUs, mixed dtypes)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not handles(rows, weight) or x.dtype != weight.dtype:
        return None
    return rows, weight.shape, weight.dtype


def handles(rows: int, weight: torch.Tensor) -> bool:
    """Does `linear` choose a layout for `rows` rows times `weight` (else it is plain F.linear)?"""
    return 0 < rows <= MAX_ROWS and not torch.is_grad_enabled() and weight.numel() >= MIN_WEIGHT \
        and weight.device.type == "cpu"


def _x_weight_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _weight_x_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _rows_first(_product_t(x.reshape(-1, x.shape[-1]), weight, bias)).view(*x.shape[:-1], -1)


def _product_t(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(rows, in) -> (out_features, rows): the product asked of BLAS as W @ x^T."""
    return torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias[:, None], weight, flat.t())


def _rows_first(out: torch.Tensor) -> torch.Tensor:
    """(out_features, rows) -> the contiguous (rows, out_features). PyTorch's transposing copy is
    slow for a long, thin matrix; a copy per row is faster there (one-off timings on the AMD
    machine: 32000 x 2: 185 vs 56 us, x 4: 242 vs 110; 151936 x 2: 1034 vs 226; 9728 x 2: 59 vs 25;
    even at 4096-4864; 1536 x 2: 6 vs 14), and an LM head's output is that shape in every decode step."""
    features, rows = out.shape
    if features < ROW_COPY_FEATURES or rows > 4:
        return out.t().contiguous()
    result = out.new_empty(rows, features)
    for row in range(rows):
        result[row].copy_(out[:, row])
    return result


def _weight_x_t_even(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """An odd number of rows, run as one more (a zero row): MKL on AVX2 runs 1 and 3 columns in
    slower kernels than 2 and 4 (one-off timings: the LM head over 3 rows 6.3 ms, over 4 4.4 ms)."""
    flat = x.reshape(-1, x.shape[-1])
    out = _product_t(torch.cat([flat, flat.new_zeros(1, flat.shape[1])]), weight, bias)
    return _rows_first(out[:, :-1]).view(*x.shape[:-1], -1)  # the zero row's results are not copied


def _candidates(rows: int) -> list:
    return [_x_weight_t, _weight_x_t] + ([_weight_x_t_even] if rows % 2 else [])


class _Choice:
    """The candidates of one shape: tried in turn TRIALS times each, then the fastest by median."""

    def __init__(self, candidates: list) -> None:
        self.candidates = candidates
        self.seconds: list[list[float]] = [[] for _ in candidates]
        self.turn = 0

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, object]:
        """(this call's result, the fastest candidate once every one had its trials, else None)."""
        index = self.turn % len(self.candidates)
        self.turn += 1
        start = time.perf_counter()  # CPU ops are synchronous: the call's time is the product's
        out = self.candidates[index](x, weight, bias)
        self.seconds[index].append(time.perf_counter() - start)
        if not all(len(s) >= TRIALS for s in self.seconds):
            return out, None
        medians = [statistics.median(s) for s in self.seconds]
        return out, self.candidates[medians.index(min(medians))]


_choices: dict[tuple, _Choice] = {}  # shapes still on trial
_best: dict[tuple, object] = {}  # decided shapes -> their candidate


def chosen() -> dict[tuple, str]:
    """{(rows, out, in, dtype): the layout chosen} so far in this process (for benchmarks, logs)."""
    return {(rows, *shape, dtype): best.__name__.lstrip("_") for (rows, shape, dtype), best in _best.items()}
