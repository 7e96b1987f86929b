"""Depth-aware LoRA: one adapter per latent depth (or one shared), chosen per token.

Why not peft: peft switches adapters by walking every module, silently re-enables their
gradients, and cannot give tokens of one forward different adapters. Here every wrapped
linear reads the current depth from one shared `DepthState`, so switching depth is one
attribute write, and a forward may mix depths (fused generation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tah.errors import ConfigError


class DepthState:
    """The depth of the pass being run: an int for the whole forward, or a (B, T) LongTensor."""

    def __init__(self) -> None:
        self.depth: int | torch.Tensor = 0
        self.depth_masks: dict[int, torch.Tensor] = {}  # depth d >= 1 -> (B * T, 1): 1 where the token is at d

    def set(self, depth: int | torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """dtype: that of the activations, for the per-depth masks (a bool mask would be converted
        by every LoRA linear that reads it); None keeps them bool."""
        self.depth = depth
        self.depth_masks = {}
        if not isinstance(depth, int):  # built once per forward, shared by every layer
            for d in sorted(int(d) for d in torch.unique(depth).tolist()):
                if d > 0:
                    mask = (depth == d).reshape(-1, 1)
                    self.depth_masks[d] = mask if dtype is None else mask.to(dtype)


class DepthLoRALinear(nn.Module):
    """`base_layer(x) + scaling * B_a(A_a(dropout(x)))` with adapter a chosen by the token's depth.

    Depth 0 never runs an adapter. `num_adapters` is 1 (shared by all depths >= 1) or max_iter - 1
    (adapter d - 1 for depth d). Input (..., in_features) -> output (..., out_features).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float,
                 num_adapters: int, state: DepthState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.scaling = rank, alpha / rank
        dev, dt = base_layer.weight.device, base_layer.weight.dtype
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.empty(rank, base_layer.in_features, device=dev, dtype=dt)) for _ in range(num_adapters)
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(base_layer.out_features, rank, device=dev, dtype=dt)) for _ in range(num_adapters)
        )
        for a in self.lora_A:  # peft's init: A random, B zero, so a fresh adapter changes nothing
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._keys = [str(i) for i in range(num_adapters)]  # ParameterList's names of adapters 0, 1, ...
        self._state = state
        self._merged: dict[int, torch.Tensor] = {}

    def adapter_index(self, depth: int) -> int:
        return min(depth, len(self._keys)) - 1

    def adapter(self, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the adapter for `depth` >= 1. Reads the ParameterLists' own dicts: their
        indexing costs ~5 us a call, and a fused decode step makes ~100 such calls."""
        key = self._keys[self.adapter_index(depth)]
        return self.lora_A._parameters[key], self.lora_B._parameters[key]

    def add_adapter_(self, out: torch.Tensor, rows: torch.Tensor, depth: int,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """out += scaling * B(A(rows)) with the adapter of `depth` >= 1, in place; returns out.

        rows (N, in_features): the input flattened (after dropout); out (..., out_features) with N
        rows in all, a fresh contiguous tensor nobody saved for backward (a linear's output); mask
        (N, 1) keeps the adapter to the rows at `depth`. One addmm_ scales and adds inside the
        matrix product: no (N, out_features) product, scaled copy or sum, forward or backward, and
        few tensor ops (each costs microseconds of dispatch in a decode step)."""
        a, b = self.adapter(depth)
        low_rank = torch.mm(rows, a.t())
        if mask is not None:
            low_rank.mul_(mask)
        out.view(-1, out.shape[-1]).addmm_(low_rank, b.t(), alpha=self.scaling)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        depth = self._state.depth
        base = self.base_layer
        if isinstance(depth, int):
            if depth == 0:  # F.linear, not base(x): a module call per linear is measurable in decode
                return F.linear(x, base.weight, base.bias)
            index = self.adapter_index(depth)
            if index in self._merged:
                return F.linear(x, self._merged[index], base.bias)
        out = F.linear(x, base.weight, base.bias)
        # eval-mode dropout is the identity; skipping its module call saves time
        rows = (self.dropout(x) if self.training else x).reshape(-1, x.shape[-1])
        if isinstance(depth, int):
            return self.add_adapter_(out, rows, depth)
        # Tokens at several depths (fused decoding): each adapter runs on every row, masked to its depth's rows.
        for d, mask in self._state.depth_masks.items():
            self.add_adapter_(out, rows, d, mask)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Precompute W + scaling * B @ A per adapter: one matmul per depth >= 1 at inference.

        Costs one extra weight copy per adapter; gradients no longer reach the adapters.
        """
        w = self.base_layer.weight
        self._merged = {i: w + self.scaling * (b @ a) for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B, strict=True))}

    def unmerge(self) -> None:
        self._merged = {}


def target_linears(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    """The (path, module) of every nn.Linear whose last name is in `targets` ("all-linear" = every
    linear except the output embedding)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    everything = "all-linear" in targets
    found = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not output:
            if everything or path.rsplit(".", 1)[-1] in targets:
                found.append((path, module))
    return found


def add_depth_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float,
                   num_adapters: int, state: DepthState) -> dict[str, DepthLoRALinear]:
    """Replace the target linears of `model` in place; returns {module path: DepthLoRALinear}."""
    found = target_linears(model, targets)
    matched = {path.rsplit(".", 1)[-1] for path, _ in found}
    missing = sorted(set(targets) - matched - {"all-linear"})
    if not found or missing:
        raise ConfigError(
            f"lora_target_modules {missing or targets} match no nn.Linear in {type(model).__name__}; "
            "use names such as q_proj, v_proj, or 'all-linear'"
        )
    wrapped = {}
    for path, linear in found:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapped[path] = DepthLoRALinear(linear, rank, alpha, dropout, num_adapters, state)
        setattr(parent, name, wrapped[path])
    return wrapped


@contextmanager
def plain_linears(model: nn.Module, wrapped: dict[str, DepthLoRALinear]) -> Iterator[nn.Module]:
    """Temporarily put the original linears back, so `model` saves and loads as plain HF."""
    for path, module in wrapped.items():
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, module.base_layer)
    try:
        yield model
    finally:
        for path, module in wrapped.items():
            parent_path, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, name, module)
