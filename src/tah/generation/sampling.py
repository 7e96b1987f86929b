"""Turning logits into tokens: greedy, sampling with temperature / top-k / top-p / min-p, and the
speculative acceptance rule that keeps fused decoding exact."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from tah.errors import InputError


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) -> (N,) argmax, the first index among ties as `argmax` gives; `max` computes it in
    a third of argmax's time on CPU (measured: 17 vs 46 us over 32000 logits), once per token."""
    return logits.max(-1).indices


@dataclass
class Sampler:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy); got {self.temperature!r}")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (1 = off); got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off); got {self.top_k!r}")
        if not isinstance(self.min_p, int | float) or not 0 <= self.min_p < 1:
            raise InputError(f"min_p must be in [0, 1) (0 = off); got {self.min_p!r}")
        self.greedy = not self.do_sample or self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, V) logits -> (N, V) float32 distribution after temperature, top-k, top-p and min-p."""
        scores = logits.float() / max(self.temperature, 1e-6)
        if self.top_k > 0:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p  # keep the token that crosses top_p
            probs = probs.masked_fill(outside.scatter(-1, order, outside), 0)
        if self.min_p > 0:
            probs = probs.masked_fill(probs < self.min_p * probs.amax(-1, keepdim=True), 0)
        return probs / probs.sum(-1, keepdim=True)

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, V) logits -> (N,) tokens and the (N, V) distribution they were drawn from (None if greedy)."""
        if self.greedy:
            return greedy_tokens(logits), None
        probs = self.probs(logits)
        return draw(probs, self.noise_like(probs)), probs

    def noise_like(self, probs: torch.Tensor) -> torch.Tensor:
        """Exp(1) noise of probs' shape from this sampler's generator: what `draw` takes."""
        return torch.empty_like(probs, dtype=torch.float32).exponential_(generator=self.generator)

    def accept(self, target_logits: torch.Tensor, drafts: torch.Tensor,
               draft_probs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Speculative acceptance of drafted tokens against the target distribution.

        Greedy: keep the draft iff it is the target's argmax. Sampling: `accept_drawn` with its
        uniform and Exp(1) noise drawn here. Returns (accepted (N,) bool, tokens (N,)).
        """
        if self.greedy:
            tokens = greedy_tokens(target_logits)
            return tokens == drafts, tokens
        p = self.probs(target_logits)
        uniform = torch.rand(drafts.shape, generator=self.generator, device=p.device)
        return accept_drawn(p, drafts, draft_probs, uniform, self.noise_like(p))


def draw(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(N, V) distributions and (N, V) Exp(1) noise -> (N,) tokens, token v with probability
    probs[v]: the exponential race, argmax(probs / noise). It is what `torch.multinomial(probs, 1)`
    computes (its one-sample path draws the same noise from the same generator, so the tokens are
    equal), without multinomial's checks of the values, which read them on the host (a device
    sync each). With the noise drawn beforehand, a captured decode step reads it from a buffer."""
    return (probs / noise).argmax(-1)


def accept_drawn(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, uniform: torch.Tensor,
                 noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative acceptance with its randomness given: p, q (N, V) the target's and the drafts'
    distributions, drafts (N,) drawn from q, uniform (N,) in [0, 1), noise (N, V) Exp(1). Keeps a
    draft x with probability min(1, p(x)/q(x)), else draws from normalise(max(0, p - q)); the
    result is distributed exactly as p. Returns (accepted (N,) bool, tokens (N,)). Device ops
    only: no host read, no data-dependent shape."""
    p_x = p.gather(-1, drafts[:, None])[:, 0]
    q_x = q.gather(-1, drafts[:, None])[:, 0]
    accepted = uniform * q_x < p_x  # u < p/q without dividing by a tiny q
    residual = (p - q).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)  # p == q: never rejected anyway
    return accepted, torch.where(accepted, drafts, draw(residual, noise))


class RowSampling:
    """Each row's sampling settings as (B, 1) tensors on the device: what a static-shape decode step
    reads, so that rows with different settings (a server's requests) share one captured step, and
    changing a row's settings is a copy between steps, not a new capture. `set_row` from a Sampler;
    `probs` gives each row its Sampler's distribution (up to rounding: the sums run in another
    order; a greedy row's is that of temperature 1e-6 and is not used); `greedy` (B,) marks the
    rows that take the argmax."""

    def __init__(self, batch: int, device: torch.device) -> None:
        floats = dict(dtype=torch.float32, device=device)
        self.temperature = torch.ones(batch, 1, **floats)
        self.top_k = torch.zeros(batch, 1, dtype=torch.long, device=device)  # 0: off
        self.top_p = torch.ones(batch, 1, **floats)  # 1: off
        self.min_p = torch.zeros(batch, 1, **floats)  # 0: off
        self.greedy = torch.ones(batch, dtype=torch.bool, device=device)

    def set_row(self, row: int | slice, sampler: Sampler) -> None:
        """Row `row` (or every row of a slice) samples as `sampler` from the next step on."""
        self.temperature[row] = max(sampler.temperature, 1e-6)
        self.top_k[row] = sampler.top_k
        self.top_p[row] = sampler.top_p
        self.min_p[row] = sampler.min_p
        self.greedy[row] = sampler.greedy

    SETTINGS = ("temperature", "top_k", "top_p", "min_p", "greedy")

    def leading_rows(self, rows: int) -> RowSampling:
        """The settings of the first `rows` rows, as views (a change to either shows in the other)."""
        view = copy.copy(self)
        for name in self.SETTINGS:
            setattr(view, name, getattr(self, name)[:rows])
        return view

    def move_row(self, source: int, target: int) -> None:
        """Row `target` samples as row `source` does."""
        for name in self.SETTINGS:
            getattr(self, name)[target] = getattr(self, name)[source]

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B, V) float32 distributions, row b after row b's temperature, top-k (ties
        with the k-th kept, as `Sampler`), top-p and min-p. One sort serves every filter (a GPU
        decode step at batch 32 sorts 32 x 152k scores; `Sampler.probs` sorts for top-p only, after
        a top-k). No host reads, no data-dependent shapes."""
        scores = logits.float() / self.temperature
        ranked, order = scores.sort(dim=-1, descending=True, stable=True)
        vocab = ranked.shape[-1]
        kth = ranked.gather(-1, torch.where(self.top_k > 0, self.top_k.clamp(max=vocab), vocab) - 1)
        ranked = torch.softmax(ranked.masked_fill(ranked < kth, float("-inf")), dim=-1)
        outside = (ranked.cumsum(-1) - ranked >= self.top_p) & (self.top_p < 1)  # keep the token that crosses top_p
        ranked = ranked.masked_fill(outside, 0)
        ranked = ranked.masked_fill(ranked < self.min_p * ranked[:, :1], 0)
        return torch.zeros_like(ranked).scatter_(-1, order, ranked / ranked.sum(-1, keepdim=True))
