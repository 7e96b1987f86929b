"""Deciders: after a pass, which tokens continue to the next depth.

Every decider maps the pass just run to `(continue_mask, logits)`: a (B, A) bool tensor and, for
learned deciders, the (B, A) pre-sigmoid scores (None otherwise). The model, not the decider,
enforces `max_iter` and padding.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from tah.config import TaHConfig
from tah.errors import ConfigError, InputError


class Decider(nn.Module):
    needs_hidden: tuple[int, ...] = ()  # indices into HF's hidden_states the decider reads
    reads_logits: bool = False  # False: it may decide before the pass runs (acc_logits=None)
    # True: decisions depend on (position, depth) only, and `decide_positions` gives them in Python
    position_only: bool = False

    def forward(self, acc_logits: torch.Tensor, hidden_states: tuple | None, positions: torch.Tensor,
                depth: int, iter_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """acc_logits (B, A, V); positions (B, A); depth: index of the pass just run (0-based), an int
        or a (B, A) tensor (queries at different depths)."""
        raise NotImplementedError

    def decide_positions(self, positions: list[int], depth: int) -> list[bool]:
        """`forward`'s decisions for queries at these positions after the pass of index `depth`, as
        Python bools, for deciders that are `position_only`: a decode step then makes no tensor op
        to decide (each costs microseconds there)."""
        raise NotImplementedError(f"{type(self).__name__} decides from the pass, not from positions alone")


class ConstantDecider(Decider):
    """`always` (every token continues up to max_iter) or `never` (the base model alone)."""

    def __init__(self, value: bool) -> None:
        super().__init__()
        self.value = value

    def forward(self, acc_logits, hidden_states, positions, depth, iter_labels=None):
        return torch.full(positions.shape, self.value, dtype=torch.bool, device=positions.device), None


class OracleDecider(Decider):
    """Follow oracle pass counts: continue iff iter_labels > passes done; -100 always stops."""

    def forward(self, acc_logits, hidden_states, positions, depth, iter_labels=None):
        if iter_labels is None:
            raise InputError("decider 'oracle' needs iter_labels (oracle pass counts per token); "
                             "pass iter_labels=... or choose another decider")
        return iter_labels > depth + 1, None


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer hash (degski's); int64 arithmetic never overflows with the masks.
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


class RandomDecider(Decider):
    """Continue with probability `rate`, as a pure function of (seed, position, depth).

    The same token therefore gets the same decision in prefill, decode, any batch and any padding,
    which keeps ablations and speed benchmarks reproducible. Decisions are hashed once into a
    (depths, positions) table that grows by doubling; a call is a lookup (decode calls it per token).
    """

    position_only = True

    def __init__(self, rate: float, seed: int) -> None:
        super().__init__()
        self.rate, self.seed = rate, seed
        self._table = torch.zeros(0, 0, dtype=torch.bool)
        self._rows: list[list[bool]] = []  # the table's rows as Python lists (decide_positions)

    def draw(self, positions: torch.Tensor, depth: int | torch.Tensor) -> torch.Tensor:
        """The decision itself: bool, the broadcast shape of positions and depth."""
        return self.score(positions, depth) < self.rate

    def score(self, positions: torch.Tensor, depth: int | torch.Tensor) -> torch.Tensor:
        """A uniform draw in [0, 1) (float64) per (seed, position, depth): the broadcast shape."""
        key = _mix32(_mix32(torch.full_like(positions, self.seed) * 1000003 + depth) + positions)
        return key.to(torch.float64) / 2**32

    def forward(self, acc_logits, hidden_states, positions, depth, iter_labels=None):
        if positions.numel() == 0:
            return torch.zeros(positions.shape, dtype=torch.bool, device=positions.device), None
        depths = depth + 1 if isinstance(depth, int) else int(depth.max()) + 1
        table = self._decisions(depths, int(positions.max()) + 1, positions.device)
        return table[depth, positions], None  # one lookup for an int or a tensor depth

    def decide_positions(self, positions: list[int], depth: int) -> list[bool]:
        rows = self._rows
        if not positions:
            return []
        if len(rows) <= depth or len(rows[0]) <= max(positions):
            table = self._decisions(depth + 1, max(positions) + 1, self._table.device)
            rows = self._rows = table.tolist()
        return [rows[depth][p] for p in positions]

    def _decisions(self, depths: int, positions: int, device: torch.device) -> torch.Tensor:
        """The (>= depths, >= positions) table of decisions on `device`."""
        table = self._table
        if table.shape[0] < depths or table.shape[1] < positions or table.device != device:
            size = table.shape[1] if table.shape[1] >= positions else max(2 * table.shape[1], positions, 1024)
            grid = torch.arange(size, device=device)[None].expand(max(depths, table.shape[0]), size)
            table = self._table = self.draw(grid, torch.arange(grid.shape[0], device=device)[:, None])
        return table


class ClassifierBlock(nn.Module):
    """Pre-norm residual MLP block (the original TaH classifier block; names kept for its checkpoints)."""

    def __init__(self, input_dim: int, output_dim: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(input_dim)
        self.mlp = nn.Sequential(
            nn.Linear(input_dim, input_dim * expansion), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(input_dim * expansion, output_dim), nn.Dropout(dropout),
        )
        self.dim_change = nn.Linear(input_dim, output_dim) if input_dim != output_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dim_change(x) + self.mlp(self.layer_norm(x))


class ClassifierBackbone(nn.Module):
    def __init__(self, hidden_dims: list[int], expansion: int, dropout: float) -> None:
        super().__init__()
        self.input_projection = nn.Linear(hidden_dims[0], hidden_dims[0])
        dims = hidden_dims + [hidden_dims[-1]]
        self.blocks = nn.ModuleList(ClassifierBlock(a, b, expansion, dropout) for a, b in pairwise(dims))
        self.output_layer = nn.Sequential(nn.LayerNorm(hidden_dims[-1]), nn.Linear(hidden_dims[-1], 1))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_projection(x)
        for block in self.blocks:
            x = block(x)
        return self.output_layer(x)


class MLPDecider(Decider):
    """The paper's decider: hidden states of chosen layers + a projection of the top-k accumulated
    logits -> residual MLP -> sigmoid; continue iff the probability exceeds `threshold`."""

    reads_logits = True

    def __init__(self, hidden_size: int, layers: list[int], hidden_dims: list[int], topk: int,
                 expansion: int, dropout: float, threshold: float) -> None:
        super().__init__()
        self.needs_hidden = tuple(layers)
        self.topk, self.threshold = topk, threshold
        self.logits_projection = nn.Linear(topk, hidden_size)
        self.combined_projection = nn.Linear(hidden_size * (len(layers) + 1), hidden_dims[0])
        self.backbone = ClassifierBackbone(hidden_dims, expansion, dropout)

    def scores(self, acc_logits: torch.Tensor, hidden_states: tuple) -> torch.Tensor:
        """(B, A, V) logits + hidden states -> (B, A) pre-sigmoid continue scores."""
        chosen = [hidden_states[i] for i in self.needs_hidden]
        top = torch.topk(acc_logits, k=min(self.topk, acc_logits.shape[-1]), dim=-1).values
        dtype = self.logits_projection.weight.dtype
        features = torch.cat([*(h.to(dtype) for h in chosen), self.logits_projection(top.to(dtype))], dim=-1)
        return self.backbone(self.combined_projection(features)).squeeze(-1)

    def forward(self, acc_logits, hidden_states, positions, depth, iter_labels=None):
        logits = self.scores(acc_logits, hidden_states)
        return torch.sigmoid(logits) > self.threshold, logits


def default_decider_layers(num_layers: int) -> list[int]:
    """Five evenly spread hidden-state indices from 0 (embeddings) to num_layers (final norm)."""
    return sorted({round(i * num_layers / 4) for i in range(5)})


def build_decider(config: TaHConfig, hidden_size: int, num_layers: int) -> Decider:
    """The decider `config.decider` names; checks MLP layer indices against the model."""
    if config.decider == "always":
        return ConstantDecider(True)
    if config.decider == "never":
        return ConstantDecider(False)
    if config.decider == "oracle":
        return OracleDecider()
    if config.decider == "random":
        return RandomDecider(config.random_rate, config.seed)
    layers = config.decider_layers if config.decider_layers is not None else default_decider_layers(num_layers)
    bad = [i for i in layers if i > num_layers]
    if bad:
        raise ConfigError(
            f"decider_layers {bad} are out of range: the base model has {num_layers} layers, so hidden-state "
            f"indices run from 0 (embeddings) to {num_layers} (final norm)"
        )
    return MLPDecider(hidden_size, layers, config.decider_hidden_dims, config.decider_topk,
                      config.decider_expansion, config.decider_dropout, config.threshold)
