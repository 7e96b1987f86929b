"""`StaticTaHCache`: KV slots of fixed capacity, tagged (position, depth, valid), kept on the device.

The cache of static-shape decoding (`tah.generation.static`): every pass reads all `capacity + 1`
slots of every row under the duo-causal mask, and every piece of bookkeeping is a tensor op on
the device, so a decode step has no host sync and no data-dependent shape and a CUDA graph can
capture it. Each row fills its slots left to right, one per (token, depth it reached), as
`TaHCache` does: memory in use is (1 + iterated share) x the base model's KV. The last slot is a
trash slot, always invalid, where padding queries (rows without a pending hard token, finished
rows) write.
"""

from __future__ import annotations

import copy

import torch

from tah.model.attention import additive_mask, duo_causal_visible


class StaticTaHCache:
    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        """capacity: live slots per row (the trash slot comes on top)."""
        self.capacity = capacity
        slots = capacity + 1
        self.keys = [torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.pos = torch.zeros(batch, slots, dtype=torch.long, device=device)
        self.depth = torch.zeros(batch, slots, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
        self.fill = torch.zeros(batch, dtype=torch.long, device=device)  # live slots per row
        self._slots: torch.Tensor | None = None  # (B, A) where the current pass writes

    def take_entries(self, cache, slots: int) -> None:
        """Hold the first `slots` slots of every row of `cache` (a prefilled one-run `TaHCache`, or a
        smaller `StaticTaHCache`): its keys, values, tags and fills; every later slot invalid."""
        if getattr(cache, "deep_capacity", None) is not None:
            raise ValueError("a static cache takes a TaHCache with one run of slots (deep_capacity=None)")
        if slots > self.capacity:
            raise ValueError(f"{slots} slots a row do not fit a static cache of {self.capacity}")
        for mine, theirs in zip(self.keys + self.values, cache.keys + cache.values, strict=True):
            mine[:, :, :slots] = theirs[:, :, :slots]
        for mine, theirs in ((self.pos, cache.pos), (self.depth, cache.depth), (self.valid, cache.valid)):
            mine.zero_()
            mine[:, :slots] = theirs[:, :slots]
        self.fill.copy_(cache.fill)

    def take_row(self, row: int, cache) -> None:
        """Row `row` holds the entries of one-row `cache` (a request's own prefill, `TaHCache` with one
        run of slots), every later slot invalid; the other rows are left as they are."""
        slots = int(cache.fill[0])
        if getattr(cache, "deep_capacity", None) is not None or cache.fill.shape[0] != 1:
            raise ValueError("take_row takes a one-row TaHCache with one run of slots (deep_capacity=None)")
        if slots > self.capacity:
            raise ValueError(f"{slots} slots do not fit a static cache of {self.capacity}")
        for mine, theirs in zip(self.keys + self.values, cache.keys + cache.values, strict=True):
            mine[row, :, :slots] = theirs[0, :, :slots]
        for mine, theirs in ((self.pos, cache.pos), (self.depth, cache.depth), (self.valid, cache.valid)):
            mine[row].zero_()
            mine[row, :slots] = theirs[0, :slots]
        self.fill[row] = slots

    def leading_rows(self, rows: int) -> StaticTaHCache:
        """The first `rows` rows, as views (entries written through either show in the other)."""
        view = copy.copy(self)
        view.keys, view.values = [k[:rows] for k in self.keys], [v[:rows] for v in self.values]
        view.pos, view.depth, view.valid, view.fill = self.pos[:rows], self.depth[:rows], self.valid[:rows], self.fill[:rows]
        view._slots = None
        return view

    def move_row(self, source: int, target: int) -> None:
        """Row `target` holds row `source`'s entries, tags and fill (every slot of every layer)."""
        for buffer in (*self.keys, *self.values, self.pos, self.depth, self.valid, self.fill):
            buffer[target] = buffer[source]

    def grown(self, capacity: int) -> StaticTaHCache:
        """A copy with more slots a row (the same entries in the same slots)."""
        batch, kv_heads, _, head_dim = self.keys[0].shape
        bigger = StaticTaHCache(len(self.keys), batch, kv_heads, head_dim, capacity, self.keys[0].dtype,
                                self.keys[0].device)
        bigger.take_entries(self, self.capacity)  # the trash slot stays behind
        return bigger

    # -- a pass --------------------------------------------------------------------------------
    def begin_pass(self, positions: torch.Tensor, depth: int | torch.Tensor, real: torch.Tensor,
                   dtype: torch.dtype, branches: None = None, known=None) -> torch.Tensor:
        """Reserve slots for a pass of (B, A) queries (real ones take the row's next slots, in column
        order; padding ones the trash slot), tag them, and return the (B, 1, A, capacity + 1)
        additive duo-causal mask. positions (B, A); depth int or (B, A); real (B, A) bool. No
        branches (`TaHCache.begin_pass`): a pass here holds no alternatives. `known` is not needed
        (this cache reads nothing on the host) and is ignored."""
        if branches is not None:
            raise ValueError("StaticTaHCache takes no branches: run alternatives through a TaHCache")
        depth = torch.full_like(positions, depth) if isinstance(depth, int) else depth
        slots = torch.where(real, self.fill[:, None] + real.long().cumsum(1) - 1, self.capacity)
        self._slots = slots
        self.pos.scatter_(1, slots, positions)
        self.depth.scatter_(1, slots, depth)
        self.valid.scatter_(1, slots, real)
        self.fill.add_(real.sum(1))
        visible = duo_causal_visible(positions, depth, self.pos, self.depth, self.valid)
        return additive_mask(visible, dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *_: object, **__: object) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's `Cache.update`: write this pass's (B, KV, A, D) keys/values to their slots; return
        the whole (B, KV, capacity + 1, D) buffers (the mask hides what a query may not see)."""
        index = self._slots[:, None, :, None].expand_as(key_states)
        self.keys[layer_idx].scatter_(2, index, key_states)
        self.values[layer_idx].scatter_(2, index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def drop_last(self, rows: torch.Tensor) -> None:
        """Remove the last entry of each row where `rows` (B,) bool is set: invalid from now on, its
        slot the next to be written."""
        last = (self.fill - 1).clamp(min=0)[:, None]
        self.valid.scatter_(1, last, self.valid.gather(1, last) & ~rows[:, None])
        self.fill.sub_(rows.long())

    # HF asks these only when it builds a mask itself, which it never does here (ours is 4-D).
    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError("StaticTaHCache takes positions and a ready mask; it does not count tokens")

    def entries(self) -> torch.Tensor:
        """(B,) KV entries each row holds per layer."""
        return self.fill.clone()

    def nbytes(self) -> int:
        """Bytes held by the key and value buffers of all layers."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
