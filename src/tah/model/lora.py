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

import tah.kernels.choose as kernels
from tah.errors import ConfigError


class DepthState:
    """The depth of the pass being run: an int for the whole forward, or a (B, T) LongTensor."""

    def __init__(self) -> None:
        self.depth: int | torch.Tensor = 0
        # depth d >= 1 -> its queries: a column index when they are exactly one column, every row
        # (a fused decode step's deep queries), else a (B * T, 1) mask of the flattened queries.
        # With `rows` set, both index the packed real queries instead: one row, or an (N, 1) mask.
        self.selections: dict[int, int | torch.Tensor] = {}
        # (N,) flat indices of the real queries of a decode step that is mostly padding, else None:
        # the linears then run on those rows only (see DepthLoRALinear.forward)
        self.rows: torch.Tensor | None = None
        self.plain = True  # depth 0 for every query, no packing: the base model's own products
        # (column, depth) when one column of every row holds all the deeper queries, at one depth,
        # outside autograd and autocast (a fused decode step at batch 1): the linears' shortest path
        self.one_column: tuple[int, int] | None = None
        self.deepest = 1  # the deepest depth a pass may hold (max_iter - 1; the model sets it)
        # True while a static-shape engine runs (CUDA graphs may capture its passes): no host reads
        # of the tags, on any device
        self.device_only = False
        # (column, depth) when a static engine's mixed-depth passes hold every deeper query in that
        # column of every row (its fused step): the linears' one-column path, without reading tags
        self.column_hint: tuple[int, int] | None = None

    def set(self, depth: int | torch.Tensor, dtype: torch.dtype | None = None,
            real: torch.Tensor | None = None) -> None:
        """dtype: that of the activations, for the per-depth masks (a bool mask would be converted
        by every LoRA linear that reads it); None keeps them bool. Built once per forward, shared
        by every layer. real (B, T) bool, False for padding queries: a decode step on CPU (few
        queries, no autograd) with at most PACK_REAL_SHARE of them real packs those (`rows`). Not
        on GPUs, where a product's rows cost nothing extra and reading `real` would be a sync."""
        self.depth = depth
        self.selections = {}
        self.rows = None
        self.plain = False
        self.one_column = None
        tags = real if real is not None else depth if isinstance(depth, torch.Tensor) else None
        device_only = self.device_only or tags is not None and tags.device.type != "cpu"
        if real is not None and not device_only and 1 < real.numel() <= _FEW_TAGS and not torch.is_grad_enabled():
            flags = real.flatten().tolist()
            if 0 < sum(flags) <= PACK_REAL_SHARE * len(flags):
                self._set_packed(depth, [i for i, f in enumerate(flags) if f], real.device, dtype)
                return
        if isinstance(depth, int):
            self.plain = depth == 0
            return
        if device_only and self.column_hint is not None:
            column, deep = self.column_hint
            self.selections = {deep: column}
            self.one_column = self.column_hint
            return
        if device_only:  # no reads of the tags: a mask per depth, built on the device
            for d in range(1, self.deepest + 1):  # (a host sync each read would cost; CUDA graphs forbid it)
                self.selections[d] = _mask((depth == d).reshape(-1, 1), dtype)
            return
        if depth.numel() > _FEW_TAGS:
            for d in sorted(int(d) for d in torch.unique(depth).tolist()):
                if d > 0:
                    self.selections[d] = _mask((depth == d).reshape(-1, 1), dtype)
            return
        # Few tags (a decode step): read them once in Python instead of a tensor op per depth.
        tags = depth.tolist()
        for d in sorted({t for row in tags for t in row} - {0}):
            at = [[t == d for t in row] for row in tags]
            columns = {row.index(True) if row.count(True) == 1 else -1 for row in at}
            one_column = len(columns) == 1 and -1 not in columns
            self.selections[d] = columns.pop() if one_column else _mask(
                torch.tensor(at, device=depth.device).reshape(-1, 1), dtype)
        if len(self.selections) == 1 and not torch.is_grad_enabled() \
                and not torch.is_autocast_enabled(depth.device.type):
            (d, where), = self.selections.items()
            self.one_column = (where, d) if isinstance(where, int) else None

    @contextmanager
    def at(self, depth: int | torch.Tensor, dtype: torch.dtype | None = None,
           real: torch.Tensor | None = None) -> Iterator[DepthState]:
        """`set(depth, dtype, real)` for a `with` block, and depth 0 after it, also when the block
        raises: every LoRA linear reads this state, so a pass that fails half-way must not leave the
        wrapped model running its adapters in the next call."""
        self.set(depth, dtype, real)
        try:
            yield self
        finally:
            self.set(0)

    def set_each(self, depth: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Depths per query, depth (B, T): every adapter runs on all queries under a mask of those at
        its depth. The plain form of `set` (no packing of real queries, no column shortcuts), which
        `tah.model.reference` runs."""
        self.set(0)
        self.depth, self.plain = depth, False
        self.selections = {d: _mask((depth == d).reshape(-1, 1), dtype) for d in range(1, self.deepest + 1)}

    def _set_packed(self, depth: int | torch.Tensor, rows: list[int], device: torch.device,
                    dtype: torch.dtype | None) -> None:
        self.rows = torch.tensor(rows, device=device)
        if isinstance(depth, int):
            return
        flat = depth.flatten().tolist()
        tags = [flat[i] for i in rows]
        for d in sorted(set(tags) - {0}):
            at = [t == d for t in tags]
            self.selections[d] = at.index(True) if at.count(True) == 1 else _mask(
                torch.tensor(at, device=device)[:, None], dtype)


_FEW_TAGS = 256  # depth tensors up to this size are read in Python
# A decode step whose real queries are at most this share of its slots runs its linears on them only:
# at batch 8, a fused step has ~10 real queries in 16 slots (in-loop, 26.7 vs 29.0 ms a step at
# context 64, 52.0 vs 55.2 at 2048, bench_decode's model)
PACK_REAL_SHARE = 0.75


def _mask(mask: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return mask if dtype is None else mask.to(dtype)


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
        self._inference: list[tuple | None] = [None] * num_adapters  # see factors()
        self._plans: dict[torch.Size, tuple] = {}  # see _base_product

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "base_layer":  # its parameters, read per call without Module.__getattr__
            self.__dict__["_base_params"] = value._parameters

    def adapter_index(self, depth: int) -> int:
        return min(depth, len(self._keys)) - 1

    def factors(self, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T (in, r), B^T (r, out)) of the adapter for `depth`. Under autograd, views of the
        parameters. Without it (decoding), plain tensors kept between calls: a view of A (a (1, in)
        x (in, r) product is fastest against it) and a contiguous copy of B^T ((1, r) x (r, out)
        takes 1.5 us against it, 4.3 us against the view), remade when B changes in place. A
        fused decode step makes 56 such calls, and each Python step costs there, as the weights
        just read have pushed everything else out of the CPU caches (hence also the ParameterLists'
        own dicts: their indexing costs ~5 us a call). A's view follows A's in-place changes;
        moves and casts drop what is kept (see _apply)."""
        index = self.adapter_index(depth)
        plain_views = torch.is_grad_enabled() or self._state.device_only  # (a static engine's graph captures them)
        if not plain_views:
            kept = self._inference[index]
            if kept is not None and kept[0] == kept[3]._version:
                return kept[1], kept[2]
        key = self._keys[index]
        a, b = self.lora_A._parameters[key], self.lora_B._parameters[key]
        if plain_views:
            return a.t(), b.t()
        b_plain = b.detach()  # shares B's version counter: an in-place change shows
        self._inference[index] = (b_plain._version, a.detach().t(), b_plain.t().contiguous(), b_plain)
        return self._inference[index][1], self._inference[index][2]

    def _apply(self, fn, recurse=True):
        """Moves and casts (.to, .half, ...) may give the parameters new tensors: drop the kept ones."""
        self._inference = [None] * len(self._keys)
        self._plans = {}
        return super()._apply(fn, recurse)

    def add_adapter_(self, out: torch.Tensor, rows: torch.Tensor, depth: int,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """out += scaling * B(A(rows)) with the adapter of `depth` >= 1, in place; returns out.

        rows (N, in_features), out (N, out_features): 2-D, unit stride along features (views of a
        column of queries are fine); out is a linear's output nobody saved for backward. mask (N, 1)
        keeps the adapter to the rows at `depth`. One addmm_ scales and adds inside the matrix
        product: no (N, out_features) product, scaled copy or sum, forward or backward, and few
        tensor ops (each costs microseconds of dispatch in a decode step)."""
        a_t, b_t = self.factors(depth)
        low_rank = torch.mm(rows, a_t)
        if mask is not None:
            low_rank.mul_(mask)
        # Under autocast (bf16 training) mm and out are bf16 while B is not, and in-place ops are not
        # autocast. Compared first: a no-op cast still costs a call, 112 of them in a fused decode step.
        if low_rank.dtype != out.dtype or b_t.dtype != out.dtype:
            low_rank, b_t = low_rank.to(out.dtype), b_t.to(out.dtype)
        out.addmm_(low_rank, b_t, alpha=self.scaling)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._state
        if state.plain:  # depth 0 without packing: every plain decode step, in the fewest Python steps
            return self._base_product(x)
        one_column = state.one_column
        if one_column is not None and not self.training:
            # A fused decode step, in the fewest Python steps too: each one costs microseconds there (the
            # weights just read flush the CPU caches), and a step makes 56 such calls (bench_decode's model).
            column, depth = one_column
            out = self._base_product(x)
            self.add_adapter_(out.select(-2, column), x.select(-2, column), depth)
            return out
        rows = state.rows
        if rows is None:
            return self._forward(x)
        # A decode step that is mostly padding: the product runs on its real queries only. From a
        # few rows on, products cost more with each row on CPU (bench_decode's 56 linears, one-off:
        # 6.2 ms at 8 rows, 6.7 at 10, 10.2 at 16), so at batch 8 a fused step's 16 slots (~10 of
        # them real) cost more than the gather and scatter here (0.5 ms for the 56).
        flat = x.reshape(-1, x.shape[-1])
        packed = self._forward(flat.index_select(0, rows))
        out = packed.new_zeros(flat.shape[0], packed.shape[-1]).index_copy_(0, rows, packed)
        return out.view(*x.shape[:-1], -1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features), or (N, in_features) packed real queries when the state has rows."""
        depth = self._state.depth
        if isinstance(depth, int):
            if depth == 0:
                return self._base_product(x)
            index = self.adapter_index(depth)
            if index in self._merged:
                merged = self._merged[index]
                return kernels.linear_layouts(merged.device).linear(x, merged, self.base_layer.bias)
        out = self._base_product(x)
        if self.training:  # eval-mode dropout is the identity; skipping its module call saves time
            x = self.dropout(x)
        if isinstance(depth, int):
            self.add_adapter_(out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), depth)
            return out
        # Queries at several depths (a fused decode step, x (B, T, in) or its real queries (N, in)):
        # each adapter runs on its depth's column or packed query, or on every query under a mask.
        for d, where in self._state.selections.items():
            if isinstance(where, int):  # one column of every row, or one packed query
                self.add_adapter_(_queries_at(out, where), _queries_at(x, where), d)
            else:
                self.add_adapter_(out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), d, where)
        return out

    def _base_product(self, x: torch.Tensor) -> torch.Tensor:
        """base_layer(x) without its module call: at inference on CPU through the linear layouts
        (kernels/cpu/few_rows.py), under autograd plain F.linear. At inference the layout chosen for x's shape is kept here (with the tensors it was made for: a
        weight replaced by assignment is seen), so a decode step's linear makes no checks or lookups
        beyond this."""
        params = self._base_params
        weight, bias = params["weight"], params.get("bias")
        if not kernels.on_cpu(weight.device) or self._state.device_only:
            # the layouts are for CPUs' eager decoding; the module call runs its hooks (ZeRO-3's gathering)
            return self.base_layer(x)
        if torch.is_grad_enabled():  # training: plain F.linear (nothing here reads x's shape: a compiled pass keeps it symbolic)
            return F.linear(x, weight, bias)
        kept = self._plans.get(x.shape)
        if kept is not None and kept[1] is weight and kept[2] is bias and kept[3] == x.dtype:
            return kept[0](x)
        layouts = kernels.linear_layouts(weight.device)
        out = layouts.linear(x, weight, bias)
        product = layouts.plan(x, weight, bias)
        if product is not None:
            self._plans[x.shape] = (product, weight, bias, x.dtype)
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


def _queries_at(t: torch.Tensor, where: int) -> torch.Tensor:
    """Column `where` of (B, T, F) queries as (B, F), or packed query `where` of (N, F) as (1, F)."""
    return t.select(-2, where) if t.dim() == 3 else t.narrow(0, where, 1)


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
