"""`TaHCache`: preallocated KV slots tagged with (position, depth, valid).

Per layer one buffer (B, kv_heads, capacity, head_dim) for keys and one for values. Each row
fills its slots left to right; a pass writes its real tokens at the row's fill level and its
padding just after (marked invalid, overwritten by the next pass), so a row holds exactly one
entry per (token, depth it reached). Capacity grows by doubling; attention reads a view of the
first `S` slots, never a concatenation. HF attention layers call `update()` like a `Cache`.

Split (`deep_capacity` given; what decoding uses): each row keeps its depth-0 entries in slots
[0, capacity) and its deeper ones after them, from slot `capacity` on. A depth-0 query then reads a
plain prefix of depth-0 entries, on HF's unmasked path as in the base model, however many deeper
entries exist; a pass with deeper queries reads both regions (and the free slots between them,
masked). Split caches are written in place only (no autograd).

Under autograd (training) a pass instead appends one block to every row at the end of the buffers
(shorter rows keep a gap of invalid slots) and the buffers are concatenated, never written in
place: autograd would otherwise copy a whole buffer in backward for every write. Training runs a
handful of passes, so those concatenations are cheap; decoding, under no_grad, never makes one.
Where every block so far was appended so, the buffers' length is known on the host, and a pass
whose caller also says what it knows of its padding (`KnownReal`) reads nothing from the device: a
training forward on a GPU then queues its passes without waiting on them. A training forward's
passes without autograd (stage 2's frozen ones, evaluation) lay their blocks out alike, written in
place, since their caller knows the padding too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tah.model.attention import additive_mask, duo_causal_visible

Branches = torch.Tensor | list[list[int]]  # (B, A) branch ids of a pass's queries (see TaHCache.begin_pass)
FEW_QUERIES = 64  # passes of at most this many (B x A) queries separate their branches in Python


@dataclass(frozen=True)
class KnownReal:
    """What the host knows of a pass's `real` (B, A) without reading it from the device (a sync on a
    GPU): whether no query is padding, and whether in every row the real queries come first."""

    all_real: bool
    real_first: bool


class TaHCache:
    def __init__(self, capacity: int = 64, deep_capacity: int | None = None) -> None:
        """capacity: slots per row before the first growth (split: for depth-0 entries);
        deep_capacity: None keeps every entry in one run of slots, an int splits rows (see above)
        with that many slots for deeper entries to start with."""
        self.capacity = capacity
        self.deep_capacity = deep_capacity
        self.deep_fill: torch.Tensor | None = None  # split: (B,) live deeper entries per row
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.pos: torch.Tensor | None = None  # (B, capacity) token position of each slot
        self.depth: torch.Tensor | None = None  # (B, capacity) depth of each slot
        self.valid: torch.Tensor | None = None  # (B, capacity) False for padding and free slots
        # (B, capacity) additive mask of a lone depth-0 query: 0 at valid depth-0 slots, else the
        # dtype's minimum. Kept up to date slot by slot, so the commonest masked step (plain decode
        # once deeper entries exist) builds no mask.
        self.shallow_bias: torch.Tensor | None = None
        self.fill: torch.Tensor | None = None  # (B,) live slots per row
        self.seen: torch.Tensor | None = None  # (B,) valid depth-0 tokens per row = next position
        self._slots: torch.Tensor | None = None  # (B, A) where the current pass writes
        self._start: int | None = None  # set when the current pass writes one contiguous block
        # split: (first column, columns, first slot) when every row writes the same column runs to the
        # same contiguous slots (a fused decode step's deep column to region 1, the rest to region 0)
        self._blocks: list[tuple[int, int, int]] | None = None
        # Under autograd: every row's block starts at _block_start; block slot j holds query
        # _order[:, j] (None: query j, the pass is already in slot order).
        self._block_start = 0
        self._order: torch.Tensor | None = None
        self._length = 0  # S: slots the current pass attends over
        # True while every slot so far is a valid depth-0 entry written in order: then a single
        # depth-0 query per row sees all of them and needs no mask (the plain decode step).
        self._plain = True
        # Slots every row's buffers hold while each pass so far ran under autograd (appended blocks,
        # see the module's docstring); None once one did not (fills are then read from the device).
        self._appended: int | None = 0

    # -- bookkeeping, once per pass -------------------------------------------------------------
    def positions_for(self, valid: torch.Tensor) -> torch.Tensor:
        """Position ids (B, T) of new tokens: count of earlier valid tokens; padding gets 0."""
        before = self.seen if self.seen is not None else torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
        return (before[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)

    def begin_pass(self, positions: torch.Tensor, depth: int | torch.Tensor, real: torch.Tensor,
                   dtype: torch.dtype, branches: Branches | None = None,
                   known: KnownReal | None = None) -> torch.Tensor | None:
        """Reserve slots for a pass of (B, A) queries; returns its (B, 1, A, S) additive mask, or None
        when HF's unmasked path computes the same attention: depth 0 from an empty cache without
        padding (`is_causal`), or one depth-0 query per row over a cache of valid depth-0 entries
        only (it sees every entry: the plain decode step).

        positions (B, A); depth int or (B, A); real (B, A) bool, False for padding queries.
        branches: None, or each query's branch id (B, A), a tensor or nested lists (a decode step's,
        read without tensor ops). Two queries on different branches > 0 are alternatives: neither
        sees the entry the other writes in this pass, so each computes what it would alone; branch
        0 sees and is seen as the duo-causal rule says. The cache keeps no branch ids: a caller
        invalidates all alternatives but one before a later pass could see them.
        known: what the caller knows of `real` on the host; with it, a pass under autograd reads
        nothing from the device.
        """
        batch, width = positions.shape
        self._ensure_rows(batch, positions.device, dtype)
        if self.deep_capacity is not None:
            return self._begin_split_pass(positions, depth, real, dtype, branches)
        fill = self.fill
        # Blocks appended to every row (see the module's docstring): under autograd, and for a
        # training forward's frozen passes too (stage 2: its caller knows the padding), whose
        # lengths are then known on the host as well
        blocks = torch.is_grad_enabled() or known is not None
        appended = self._appended if blocks else None  # every row's buffers this long: a Python int
        all_real = known.all_real if known is not None else bool(real.all())
        # One contiguous block of slots when every row is filled alike and the pass has no padding.
        if appended is not None:
            self._start = appended if all_real else None
        else:
            self._start = int(fill[0]) if all_real and _alike(fill) else None
        if self._start is not None:
            self._slots = None  # last_slots builds them when asked
            self._length = self._start + width
            self._grow(self._length)
            window = slice(self._start, self._length)
            self.pos[:, window] = positions
            self.depth[:, window] = depth
            self.valid[:, window] = True
            self.shallow_bias[:, window] = self._bias(depth == 0)
            self.fill = fill + width
        else:  # real tokens first, in order, then padding
            n_real = real.sum(1)
            in_block = _in_block(real, torch.ones_like(real))  # (B, A) slot - row start
            if blocks:  # one block for all rows (appended by concatenation under autograd: see above)
                self._block_start = appended if appended is not None else int(fill.max())
                identity = known.real_first if known is not None else \
                    bool((in_block == torch.arange(width, device=real.device)).all())
                self._order = None if identity else in_block.argsort(dim=1)
                fill = torch.full_like(fill, self._block_start)
            slots = fill[:, None] + in_block
            self._length = (self._block_start if blocks else int(fill.max())) + width
            self._grow(self._length)
            rows = torch.arange(batch, device=positions.device)[:, None]
            self.pos[rows, slots] = positions
            self.depth[rows, slots] = depth if isinstance(depth, torch.Tensor) else torch.full_like(positions, depth)
            self.valid[rows, slots] = real
            self.shallow_bias[rows, slots] = self._bias(real & (depth == 0))
            self._slots = slots
            self.fill = fill + n_real
        depth0 = isinstance(depth, int) and depth == 0
        if depth0:
            self.seen = self.seen + (width if all_real else real.sum(1))
        elif isinstance(depth, torch.Tensor):
            self.seen = self.seen + (real & (depth == 0)).sum(1)
        self._plain = self._plain and depth0 and self._start is not None
        self._appended = self._length if appended is not None else None
        if branches is None and (depth0 and self._start == 0 or self._plain and width == 1):
            return None  # HF's fast path: causal from an empty cache, or one query that sees all
        return self._mask(positions, depth, dtype, branches)

    def _mask(self, positions: torch.Tensor, depth: int | torch.Tensor, dtype: torch.dtype,
              branches: Branches | None) -> torch.Tensor:
        """The (B, 1, A, S) additive mask of this pass's queries over the first S slots."""
        S, width = self._length, positions.shape[1]
        if isinstance(depth, int) and depth == 0 and width == 1:  # sees every valid depth-0 entry: all precede it
            bias = self.shallow_bias[:, None, None, :S]
            return bias.clone() if torch.is_grad_enabled() else bias  # autograd saves the mask
        visible = duo_causal_visible(positions, depth, self.pos[:, :S], self.depth[:, :S], self.valid[:, :S])
        if branches is not None and width > 1:
            visible = self._separate_branches(visible, branches)
        return additive_mask(visible, dtype)

    def _begin_split_pass(self, positions: torch.Tensor, depth: int | torch.Tensor, real: torch.Tensor,
                          dtype: torch.dtype, branches: Branches | None) -> torch.Tensor | None:
        """begin_pass of a split cache: depth-0 queries take slots in region 0, deeper ones in region 1,
        each region filled left to right (real tokens first, then padding, as in one run)."""
        if torch.is_grad_enabled():
            raise RuntimeError("a split TaHCache (deep_capacity set) is written in place; run it under torch.no_grad()")
        width = positions.shape[1]
        shallow = depth == 0 if isinstance(depth, int) else None  # None: a mixed-depth pass
        all_real = bool(real.all())
        if shallow is not None and all_real:  # the plain decode step: counts are Python ints (each op costs there)
            in_region0 = None
            count0, count1 = (width, 0) if shallow else (0, width)  # real queries in each region
            end0, end1 = int(self.fill.max()) + count0, int(self.deep_fill.max()) + count1
            deep = not shallow
        else:
            in_region0 = torch.full_like(real, shallow) if shallow is not None else depth == 0
            count0 = in_region0.sum(1)  # queries (real or padding) per row in each region
            count1 = width - count0
            end0, end1 = int((self.fill + count0).max()), int((self.deep_fill + count1).max())  # past the last slot
            deep = not shallow if shallow is not None else bool(count1.any())
            if not all_real:
                count0, count1 = (real & in_region0).sum(1), (real & ~in_region0).sum(1)
        self._grow_split(end0, end1)
        self._place_split(positions, depth, real, in_region0, shallow, all_real)
        self.fill, self.deep_fill = _plus(self.fill, count0), _plus(self.deep_fill, count1)
        self.seen = _plus(self.seen, count0)  # real depth-0 tokens
        # Depth-0 queries read region 0 only; deeper ones need region 1 too.
        self._length = self.capacity + end1 if deep else end0
        if branches is None and shallow and self._start is not None and (self._start == 0 or width == 1):
            return None  # region 0 holds valid depth-0 entries only: causal from empty, or one query that sees all
        return self._mask(positions, depth, dtype, branches)

    def _place_split(self, positions: torch.Tensor, depth: int | torch.Tensor, real: torch.Tensor,
                     in_region0: torch.Tensor | None, shallow: bool | None, all_real: bool) -> None:
        """Choose this pass's slots in a split cache and write their tags: one block (a pass at one
        depth, rows filled alike), a block per region (a fused step whose rows are alike), or scattered."""
        self._start, self._blocks, self._slots = None, None, None
        if shallow is not None and all_real:
            fill = self.fill if shallow else self.deep_fill
            if _alike(fill):
                self._start = int(fill[0]) + (0 if shallow else self.capacity)
                self._blocks = [(0, positions.shape[1], self._start)]
        elif shallow is None and all_real:
            self._blocks = self._column_blocks(in_region0)
        if self._blocks is not None:
            for col, n, slot in self._blocks:
                window, columns = slice(slot, slot + n), slice(col, col + n)
                self.pos[:, window] = positions[:, columns]
                self.depth[:, window] = depth if isinstance(depth, int) else depth[:, columns]
                self.valid[:, window] = True
                self.shallow_bias[:, window] = self._bias(slot < self.capacity)
            if self._start is not None:
                self._blocks = None  # one block: the contiguous path of update() and last_slots
            return
        if in_region0 is None:  # a pass at one depth
            in_region0 = torch.full_like(real, shallow)
        slots = torch.where(in_region0, self.fill[:, None] + _in_block(real, in_region0),
                            self.capacity + self.deep_fill[:, None] + _in_block(real, ~in_region0))
        rows = torch.arange(real.shape[0], device=real.device)[:, None]
        self.pos[rows, slots] = positions
        self.depth[rows, slots] = depth if isinstance(depth, torch.Tensor) else torch.full_like(positions, depth)
        self.valid[rows, slots] = real
        self.shallow_bias[rows, slots] = self._bias(real & in_region0)
        self._slots = slots

    def _column_blocks(self, in_region0: torch.Tensor) -> list[tuple[int, int, int]] | None:
        """Blocks (first column, columns, first slot) of a mixed pass of real queries when each row
        sends the same contiguous run of columns to each region and the rows' fills are equal (a
        fused decode step at batch 1, always); else None."""
        pattern = in_region0.tolist()
        if any(row != pattern[0] for row in pattern[1:]):
            return None
        if not (_alike(self.fill) and _alike(self.deep_fill)):
            return None
        blocks = []
        for region, first_slot in ((True, int(self.fill[0])), (False, self.capacity + int(self.deep_fill[0]))):
            columns = [c for c, r in enumerate(pattern[0]) if r == region]
            if columns and columns[-1] - columns[0] + 1 != len(columns):
                return None
            if columns:
                blocks.append((columns[0], len(columns), first_slot))
        return blocks

    def _separate_branches(self, visible: torch.Tensor, branches: Branches) -> torch.Tensor:
        """visible (B, A, S) with each query's view of the entries this pass writes on other branches
        (> 0, see begin_pass) hidden. Padding needs no care: its entries are invalid, its outputs unread."""
        if isinstance(branches, torch.Tensor) and branches.numel() <= FEW_QUERIES:
            branches = branches.tolist()  # a decode step: pairs found in Python, hidden in one op
        if isinstance(branches, list):
            return self._separate_few_branches(visible, branches)
        width = branches.shape[1]
        on_branch = branches > 0
        apart = (branches[:, :, None] != branches[:, None, :]) & on_branch[:, :, None] & on_branch[:, None, :]
        index = self.last_slots[:, None, :].expand(-1, width, -1)  # (B, A, A): the slot of key query j
        return visible.scatter(2, index, visible.gather(2, index) & ~apart)

    def _separate_few_branches(self, visible: torch.Tensor, branches: list[list[int]]) -> torch.Tensor:
        """_separate_branches for the few queries of a decode step (ids as lists): a dozen tensor ops fewer."""
        pairs = [(b, i, j) for b, row in enumerate(branches) for i, mine in enumerate(row) for j, other in enumerate(row)
                 if mine > 0 and other > 0 and mine != other]
        if not pairs:
            return visible
        slots = self._slot_lists()
        rows, queries, keys = zip(*((b, i, slots[b][j]) for b, i, j in pairs), strict=True)
        device = visible.device
        visible[torch.tensor(rows, device=device), torch.tensor(queries, device=device),
                torch.tensor(keys, device=device)] = False
        return visible

    def _slot_lists(self) -> list[list[int]]:
        """last_slots as Python lists, without tensor ops when the pass wrote blocks of slots."""
        if self._slots is None and self._blocks is not None:
            row = [slot + k for _, n, slot in sorted(self._blocks) for k in range(n)]
            return [row] * self.fill.shape[0]
        return self.last_slots.tolist()

    def _bias(self, visible: bool | torch.Tensor) -> float | torch.Tensor:
        """Additive mask values for slots whose visibility to a lone depth-0 query is `visible`."""
        lowest = torch.finfo(self.shallow_bias.dtype).min
        if isinstance(visible, bool):
            return 0.0 if visible else lowest
        # not torch.where(visible, 0.0, lowest): its scalars make a float32 tensor, which float64's lowest overflows
        return self.shallow_bias.new_zeros(visible.shape).masked_fill_(~visible, lowest)

    def _ensure_rows(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        if self.shallow_bias is not None and self.shallow_bias.dtype != dtype:
            self.shallow_bias = self.shallow_bias.to(dtype)
        if self.fill is None:
            slots = self.slots_per_row
            self.fill = torch.zeros(batch, dtype=torch.long, device=device)
            self.deep_fill = torch.zeros(batch, dtype=torch.long, device=device) if self.deep_capacity is not None else None
            self.seen = torch.zeros(batch, dtype=torch.long, device=device)
            self.pos = torch.zeros(batch, slots, dtype=torch.long, device=device)
            self.depth = torch.zeros(batch, slots, dtype=torch.long, device=device)
            self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
            self.shallow_bias = torch.full((batch, slots), torch.finfo(dtype).min, dtype=dtype, device=device)
        elif self.fill.shape[0] != batch:
            raise ValueError(f"this cache holds {self.fill.shape[0]} rows; the input has {batch}")

    @property
    def slots_per_row(self) -> int:
        """Slots every tag tensor and layer buffer holds per row (both regions when split)."""
        return self.capacity + (self.deep_capacity or 0)

    def _grow_split(self, needed0: int, needed1: int) -> None:
        """Make room for `needed0` depth-0 and `needed1` deeper slots per row, doubling each region
        that is short; region 1 moves up when region 0 grows (tags and every layer's buffers)."""
        new0 = self.capacity if needed0 <= self.capacity else max(2 * self.capacity, needed0)
        new1 = self.deep_capacity if needed1 <= self.deep_capacity else max(2 * self.deep_capacity, needed1)
        self._resize_split(new0, new1)

    def _resize_split(self, new0: int, new1: int) -> None:
        """Lay the regions out at `new0` depth-0 and `new1` deeper slots per row (no smaller than now)."""
        if (new0, new1) == (self.capacity, self.deep_capacity):
            return
        old = (self.capacity, self.deep_capacity)
        lowest = torch.finfo(self.shallow_bias.dtype).min
        self.pos, self.depth = (_relayout(t, 1, old, (new0, new1)) for t in (self.pos, self.depth))
        self.valid = _relayout(self.valid, 1, old, (new0, new1))
        self.shallow_bias = _relayout(self.shallow_bias, 1, old, (new0, new1), fill=lowest)
        self.keys = [None if t is None else _relayout(t, 2, old, (new0, new1)) for t in self.keys]
        self.values = [None if t is None else _relayout(t, 2, old, (new0, new1)) for t in self.values]
        self.capacity, self.deep_capacity = new0, new1

    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new = max(2 * self.capacity, needed)
        self.pos = _extend(self.pos, new, dim=1)
        self.depth = _extend(self.depth, new, dim=1)
        self.valid = _extend(self.valid, new, dim=1)
        self.shallow_bias = _extend(self.shallow_bias, new, dim=1, fill=torch.finfo(self.shallow_bias.dtype).min)
        self.capacity = new  # layer buffers follow lazily in update()

    # -- the HF `Cache` interface used by attention layers ---------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *_: object, **__: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's (B, H, A, D) keys/values; return views of the first S slots. Whatever
        else the layer passes is ignored: a `cache_kwargs` dict before transformers 5.24, `kwargs=`
        from 5.24 on."""
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        self.keys[layer_idx] = self._write(self.keys[layer_idx], key_states)
        self.values[layer_idx] = self._write(self.values[layer_idx], value_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if keys.shape[2] == self._length:  # appended under autograd: exactly S slots (no slice: a compiled pass keeps A symbolic)
            return keys, values
        return keys[:, :, :self._length], values[:, :, :self._length]

    def _write(self, buffer: torch.Tensor | None, states: torch.Tensor) -> torch.Tensor:
        b, h, _, d = states.shape
        if torch.is_grad_enabled() and (states.requires_grad or buffer is not None and buffer.requires_grad):
            return self._append(buffer, states)
        if buffer is None:
            buffer = states.new_zeros(b, h, self.slots_per_row, d)
        elif buffer.shape[2] < self.slots_per_row:  # one run of slots grows lazily (split: see _grow_split)
            buffer = _extend(buffer, self.slots_per_row, dim=2)
        if self._start is not None:
            buffer[:, :, self._start:self._start + states.shape[2]] = states
        elif self._blocks is not None:
            for col, n, slot in self._blocks:
                buffer[:, :, slot:slot + n] = states[:, :, col:col + n]
        else:
            rows = torch.arange(b, device=states.device)[:, None]
            buffer[rows, :, self._slots] = states.transpose(1, 2)
        return buffer

    def _append(self, buffer: torch.Tensor | None, states: torch.Tensor) -> torch.Tensor:
        """Under autograd: the first `start` slots of `buffer` then this pass's states in slot order,
        a new (B, H, start + A, D) tensor (concatenation's backward only slices: no copy)."""
        if self._start is not None:
            start, block = self._start, states
        else:
            start = self._block_start
            block = states if self._order is None else \
                states.gather(2, self._order[:, None, :, None].expand_as(states))
        if start == 0:
            return block
        prefix = buffer[:, :, :start] if buffer is not None else states.new_zeros(*states.shape[:2], start, states.shape[3])
        return torch.cat([prefix, block], dim=2)

    # HF builds its own causal mask only on the fast path (empty cache, see begin_pass).
    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._length, 0

    @property
    def last_slots(self) -> torch.Tensor:
        """(B, A) the slot each query of the last pass wrote."""
        if self._slots is None and self._blocks is not None:
            columns = [torch.arange(slot, slot + n, device=self.fill.device) for _, n, slot in sorted(self._blocks)]
            self._slots = torch.cat(columns).expand(self.fill.shape[0], -1)
        elif self._slots is None:
            batch, width = self.fill.shape[0], self._length - self._start
            self._slots = torch.arange(self._start, self._length, device=self.fill.device).expand(batch, width)
        return self._slots

    def invalidate(self, rows: torch.Tensor | list[int], slots: torch.Tensor | list[int]) -> None:
        """Remove entries: nobody sees them again, and the row's later entries move down over them,
        so a row stays one dense run of slots (per region). rows, slots: (N,) tensors or lists (a
        decoder's, which then makes no tensors in the common case)."""
        self._plain = False
        if self._drop_tail(*(x if isinstance(x, list) else x.tolist() for x in (rows, slots))):
            return
        device = self.valid.device
        rows, slots = torch.as_tensor(rows, device=device), torch.as_tensor(slots, device=device)
        shallow = ((self.depth[rows, slots] == 0) & self.valid[rows, slots]).long()
        self.seen = self.seen.index_put((rows,), -shallow, accumulate=True)
        self.valid[rows, slots] = False
        self.shallow_bias[rows, slots] = self._bias(False)
        for b, first in zip(*_first_per_row(rows, slots), strict=True):
            self._close_gaps(b, first)

    def _drop_tail(self, rows: list[int], slots: list[int]) -> bool:
        """The commonest removals, done with a handful of ops: entries among one row's last ones in
        region 0 of a split cache. Region 0 holds only valid depth-0 entries below its fill, so the
        survivors among those last entries move down over the removed ones, and lowering the fill
        drops the rest: no tags to read. Returns False (nothing done) for any other case."""
        if self.deep_capacity is None or any(b != rows[0] for b in rows):
            return False
        b, first, end = rows[0], min(slots), int(self.fill[rows[0]])
        dropped = set(slots)
        if len(dropped) != len(slots) or max(slots) >= end:
            return False
        survivors = [slot for slot in range(first, end) if slot not in dropped]
        for target, slot in enumerate(survivors, start=first):
            if slot != target:
                for buffer in self.keys + self.values:
                    if buffer is not None:
                        buffer[b, :, target] = buffer[b, :, slot]
                self.pos[b, target] = self.pos[b, slot]
        new_end = first + len(survivors)
        self.valid[b, new_end:end] = False
        self.shallow_bias[b, new_end:end] = self._bias(False)
        self.fill[b] = new_end  # in place, as _close_gaps does; seen anew, as invalidate does
        self.seen = self.seen.clone()
        self.seen[b] -= end - new_end
        return True

    def _close_gaps(self, b: int, start: int) -> None:
        """Move row b's valid entries from slot `start` on to the front of that range, in order.
        Decoding only (in place), and rare: a handful of slots over every layer's buffers."""
        deep = self.deep_capacity is not None and start >= self.capacity
        end = self.capacity + int(self.deep_fill[b]) if deep else int(self.fill[b])
        kept = self.valid[b, start:end].nonzero()[:, 0] + start
        n = kept.numel()
        if n and not bool((kept == torch.arange(start, start + n, device=kept.device)).all()):
            target = slice(start, start + n)
            for buffer in self.keys + self.values:
                if buffer is not None:
                    buffer[b, :, target] = buffer[b, :, kept]
            for tags in (self.pos, self.depth, self.valid, self.shallow_bias):
                tags[b, target] = tags[b, kept]
        self.valid[b, start + n:end] = False
        self.shallow_bias[b, start + n:end] = self._bias(False)
        if deep:
            self.deep_fill[b] = start + n - self.capacity
        else:
            self.fill[b] = start + n

    # -- rows joining and leaving (continuous batching: tah.generation.slots) ---------------------
    def append_rows(self, other: TaHCache) -> None:
        """Add `other`'s rows (a split cache, e.g. one prompt's prefill) after this split cache's
        rows. Both caches are laid out to the larger size of each region first, so every row keeps
        its entries, tags and fills as they were. Decoding only (no autograd)."""
        if self.deep_capacity is None or other.deep_capacity is None:
            raise ValueError("append_rows joins split caches (deep_capacity set)")
        sizes = (max(self.capacity, other.capacity), max(self.deep_capacity, other.deep_capacity))
        self._resize_split(*sizes)
        other._resize_split(*sizes)
        self.keys = [_cat_rows(mine, theirs) for mine, theirs in zip(self.keys, other.keys, strict=True)]
        self.values = [_cat_rows(mine, theirs) for mine, theirs in zip(self.values, other.values, strict=True)]
        self.pos, self.depth, self.valid = (torch.cat([a, b]) for a, b in
                                            ((self.pos, other.pos), (self.depth, other.depth), (self.valid, other.valid)))
        self.shallow_bias = torch.cat([self.shallow_bias, other.shallow_bias.to(self.shallow_bias.dtype)])
        self.fill, self.deep_fill, self.seen = (torch.cat([a, b]) for a, b in
                                                ((self.fill, other.fill), (self.deep_fill, other.deep_fill),
                                                 (self.seen, other.seen)))

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order), dropping the others' entries."""
        index = torch.tensor(rows, dtype=torch.long, device=self.fill.device)
        self.keys = [None if t is None else t.index_select(0, index) for t in self.keys]
        self.values = [None if t is None else t.index_select(0, index) for t in self.values]
        for name in ("pos", "depth", "valid", "shallow_bias", "fill", "deep_fill", "seen"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index))
        self._slots = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.seen is None else int(self.seen.max())

    def entries(self) -> torch.Tensor:
        """(B,) KV entries each row holds per layer: one per (token, depth it reached)."""
        if self.fill is None:
            return torch.zeros(0, dtype=torch.long)
        return self.fill + self.deep_fill if self.deep_fill is not None else self.fill.clone()

    def nbytes(self) -> int:
        """Bytes held by the key and value buffers of all layers."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


def _first_per_row(rows: torch.Tensor, slots: torch.Tensor) -> tuple[list[int], list[int]]:
    """The rows named in `rows` and, for each, its lowest slot in `slots`."""
    first: dict[int, int] = {}
    for b, slot in zip(rows.tolist(), slots.tolist(), strict=True):
        first[b] = min(slot, first.get(b, slot))
    return list(first), list(first.values())


def _plus(counts: torch.Tensor, more: torch.Tensor | int) -> torch.Tensor:
    """counts + more as a new tensor (callers may hold the old one); no op when more is the int 0."""
    return counts if isinstance(more, int) and more == 0 else counts + more


def _alike(fill: torch.Tensor) -> bool:
    """Do all rows hold the same count (fill (B,))? Then a pass can write one block of slots."""
    return fill.shape[0] == 1 or bool((fill == fill[0]).all())


def _in_block(real: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """(B, A) each chosen query's place among the chosen queries of its row: the real ones first, in
    order, then the padding ones (values at unchosen queries are unused)."""
    real_here, pad_here = real & chosen, ~real & chosen
    return torch.where(real_here, real_here.long().cumsum(1) - 1,
                       real_here.sum(1, keepdim=True) + pad_here.long().cumsum(1) - 1)


def _relayout(t: torch.Tensor, dim: int, old: tuple[int, int], new: tuple[int, int], fill: float = 0) -> torch.Tensor:
    """A split tensor with regions of sizes `old` along `dim`, copied into regions of sizes `new`."""
    shape = list(t.shape)
    shape[dim] = new[0] + new[1]
    out = t.new_full(shape, fill)
    out.narrow(dim, 0, old[0]).copy_(t.narrow(dim, 0, old[0]))
    out.narrow(dim, new[0], old[1]).copy_(t.narrow(dim, old[0], old[1]))
    return out


def _extend(t: torch.Tensor, size: int, dim: int, fill: float = 0) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([t, t.new_full(shape, fill)], dim=dim)


def _cat_rows(mine: torch.Tensor | None, theirs: torch.Tensor | None) -> torch.Tensor | None:
    """Two layers' (B, H, S, D) buffers, one after the other along the batch."""
    if mine is None or theirs is None:
        return mine if theirs is None else theirs
    return torch.cat([mine, theirs])
