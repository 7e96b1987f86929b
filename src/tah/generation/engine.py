"""Batched TaH decoding with fused latent iterations.

Every step is one forward of the base model over at most two queries per row:

- a *deep* query: the next pass (depth >= 1) of the row's pending hard token, fed with a soft
  embedding of its accumulated logits;
- a *shallow* query: depth 0 of the row's next token.

Fused (the default): when a token turns out hard, the row does not wait for its deeper passes. It
drafts the next token from the depth-0 logits and runs that draft's depth 0 in the same forward as
the hard token's depth 1 (decoding is bound by reading the weights, so two queries cost about what
one does). The draft never sees the depth-1 entry (duo-causal rule: a depth-0 query only sees depth 0),
so its computation is exactly what the unfused loop would do with that token. Once the hard token's
final logits exist, the draft is kept if it is what the unfused loop would have produced (greedy:
the argmax; sampling: speculative acceptance, exact in distribution), otherwise its KV entry is
dropped and the right token runs next. Works for any max_iter: deeper passes of the hard token run
in the following forwards while the draft waits.

Unfused (`fused=False`): a hard row runs only its deep queries until the token is final; other rows
of the batch keep decoding in the same forwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tah.generation.reference import GenerationOutput
from tah.generation.sampling import Sampler
from tah.model.cache import TaHCache
from tah.model.decider import ConstantDecider
from tah.model.soft_input import soft_embedding


@dataclass
class DecodeStats:
    forwards: int = 0
    drafts: int = 0
    drafts_accepted: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    kv_entries: int = 0  # KV entries per layer the cache held at the end, summed over rows
    kv_bytes: int = 0  # bytes the cache allocated

    @property
    def acceptance(self) -> float:
        return self.drafts_accepted / self.drafts if self.drafts else float("nan")


@dataclass
class _Forward:
    """What one step's forward returns: logits (B, W, V), HF's hidden_states (or None), the (B, W)
    positions it ran, and the columns of its deep and shallow queries."""

    logits: torch.Tensor
    hidden: tuple | None
    positions: torch.Tensor
    col_deep: int
    col_shallow: int


@dataclass
class _Row:
    """Python-side state of one batch row (the logits live in tensors indexed by row)."""

    next_pos: int  # position of the next depth-0 query
    feed: int | None = None  # token to run at depth 0 in the next forward
    deep_depth: int = 0  # depth of the pending hard token's next pass (0: none pending)
    deep_pos: int = 0
    draft: int | None = None  # token drafted for the position after the hard token
    draft_ran: bool = False
    draft_slot: int = -1
    draft_hard: bool = False  # the draft's own depth-0 verdict, kept until the draft is accepted
    draft_next: int = 0  # the token picked from the draft's depth-0 logits
    done: bool = False
    tokens: list[int] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)


class Decoder:
    """One `generate` call: owns the cache, the per-row state and the step loop."""

    def __init__(self, model, sampler: Sampler, *, max_new_tokens: int, eos_ids: set[int], fused: bool,
                 stop=None, streamer=None) -> None:
        self.model, self.sampler, self.max_new, self.eos_ids = model, sampler, max_new_tokens, eos_ids
        self.fused, self.stop, self.streamer = fused, stop, streamer
        self.max_iter = model.tah_config.max_iter
        decider = model.decider
        self.decides = self.max_iter > 1 and not (isinstance(decider, ConstantDecider) and not decider.value)
        self.embed = model.lm.get_input_embeddings()
        self.stats = DecodeStats()

    # -- the loop ------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int) -> GenerationOutput:
        started = time.perf_counter()
        batch = input_ids.shape[0]
        self.cache = TaHCache(capacity=capacity)
        out = self.model(input_ids, attention_mask=attention_mask, past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1)
        vocab = out.logits.shape[-1]
        device, dtype = out.logits.device, out.logits.dtype
        self.deep_acc = torch.zeros(batch, vocab, device=device, dtype=dtype)  # pending hard tokens
        self.draft_q = torch.zeros(batch, vocab, device=device) if not self.sampler.greedy else None
        self.res_l0 = torch.zeros(batch, vocab, device=device, dtype=dtype)  # last depth-0 logits per row
        self.res_q = torch.zeros(batch, vocab, device=device) if not self.sampler.greedy else None
        lengths = attention_mask.sum(1).tolist()
        self.rows = [_Row(next_pos=int(n)) for n in lengths]
        first, _ = self.sampler.pick(out.logits[:, -1])
        for row, token, passes in zip(self.rows, first.tolist(), out.iter_count[:, -1].tolist(), strict=True):
            self._emit(row, token, passes)
            if not row.done:
                row.feed = token
        self.stats.prefill_seconds = time.perf_counter() - started
        while not all(row.done for row in self.rows):
            self._step()
        self.stats.seconds = time.perf_counter() - started
        self.stats.kv_entries, self.stats.kv_bytes = int(self.cache.entries().sum()), self.cache.nbytes()
        if self.streamer is not None:
            self.streamer.end()
        return self._output(input_ids)

    def _step(self) -> None:
        live = [b for b, r in enumerate(self.rows) if not r.done]
        deep = [b for b in live if self.rows[b].deep_depth > 0]
        shallow = [b for b in live if self.rows[b].feed is not None]
        normal = [b for b in shallow if self.rows[b].draft is None]  # not a draft awaiting its verdict
        step = self._forward(deep, shallow)
        self.stats.forwards += 1
        # The deep results stay on the device until the shallow ones sync (one stall per step).
        dp = self._deep_results(deep, step) if deep else None
        sh_hard, sh_next = self._shallow_results(shallow, step) if shallow else ([], [])
        waiting = [i for i, b in enumerate(shallow) if self.rows[b].draft is not None]
        if waiting:  # the draft ran beside its hard token: wait for the verdict
            slots = self.cache.last_slots[:, step.col_shallow].tolist()
            for i in waiting:
                row = self.rows[shallow[i]]
                row.draft_ran, row.draft_slot, row.draft_hard, row.draft_next = True, slots[shallow[i]], sh_hard[i], sh_next[i]
                row.feed = None
        self.copies: list[tuple[int, str]] = []
        self.rollbacks: list[tuple[int, int]] = []
        if dp is not None:
            for b, go_on, final_token, accepted in zip(deep, *dp.tolist(), strict=True):
                self._after_deep(self.rows[b], b, bool(go_on), final_token, bool(accepted))
        for b, hard, nxt in zip(shallow, sh_hard, sh_next, strict=True):
            if b in normal:
                self._after_shallow(self.rows[b], b, hard, nxt)
        self._apply_copies()

    # -- device work ---------------------------------------------------------------------------
    def _forward(self, deep: list[int], shallow: list[int]) -> _Forward:
        """One model forward: column 0 holds the deep queries, the last column the shallow ones."""
        batch = len(self.rows)
        device = self.deep_acc.device
        need_hidden = self.decides and bool(self.model.decider.needs_hidden)
        if not deep and len(shallow) == batch:  # the plain step: one depth-0 token per row
            feed = torch.tensor([row.feed for row in self.rows], device=device)
            positions = torch.tensor([[row.next_pos] for row in self.rows], device=device)
            real = torch.ones(batch, 1, dtype=torch.bool, device=device)
            logits, hidden = self.model.run_pass(self.embed(feed)[:, None], positions, real, 0, self.cache, need_hidden)
            return _Forward(logits, hidden, positions, 0, 0)
        width = int(bool(deep)) + int(bool(shallow))
        col_deep, col_shallow = 0, width - 1
        # Small per-query tags are built in Python and sent once: a handful of tensor ops per step
        # instead of two dozen (each costs microseconds, which add up at batch 1).
        pos_tags, depth_tags, real_tags = ([[0] * width for _ in range(batch)] for _ in range(3))
        for b in deep:
            row = self.rows[b]
            pos_tags[b][col_deep], depth_tags[b][col_deep], real_tags[b][col_deep] = row.deep_pos, row.deep_depth, 1
        for b in shallow:
            pos_tags[b][col_shallow], real_tags[b][col_shallow] = self.rows[b].next_pos, 1
        parts = []  # (column, rows, (N, H) inputs)
        if deep:
            every_row = len(deep) == batch
            acc = self.deep_acc if every_row else self.deep_acc[torch.tensor(deep, device=device)]
            parts.append((col_deep, deep, soft_embedding(acc, self.embed.weight, self.model.tah_config.input_topk)))
        if shallow:
            parts.append((col_shallow, shallow, self.embed(torch.tensor([self.rows[b].feed for b in shallow], device=device))))
        if all(len(rows) == batch for _, rows, _ in parts):
            inputs = torch.stack([x for _, _, x in parts], dim=1)
        else:
            inputs = parts[0][2].new_zeros(batch, width, parts[0][2].shape[-1])
            for col, rows, x in parts:
                inputs[torch.tensor(rows, device=device), col] = x
        depths = {self.rows[b].deep_depth for b in deep} | ({0} if shallow else set())
        depth = depths.pop() if len(depths) == 1 else torch.tensor(depth_tags, device=device)
        positions = torch.tensor(pos_tags, device=device)
        logits, hidden = self.model.run_pass(inputs, positions, torch.tensor(real_tags, dtype=torch.bool, device=device),
                                             depth, self.cache, need_hidden)
        return _Forward(logits, hidden, positions, col_deep, col_shallow)

    def _decide(self, acc: torch.Tensor, step: _Forward, idx: torch.Tensor | None, col: int,
                depths: list[int]) -> torch.Tensor:
        """(N, V) accumulated logits of queries (idx, col) of `step` -> (N,) bool: run another pass.
        idx: (N,) rows, or None for every row (the callers' own row index, not built twice)."""
        device = acc.device
        pos = step.positions[:, col:col + 1] if idx is None else step.positions[idx, col:col + 1]
        picked = None
        if step.hidden is not None:
            picked = tuple(None if h is None else h[:, col:col + 1] if idx is None else h[idx, col][:, None]
                           for h in step.hidden)
        same = all(d == depths[0] for d in depths)  # an int depth spares the decider a tensor
        depth = depths[0] if same else torch.tensor(depths, device=device)[:, None]
        go_on, _ = self.model.decider(acc[:, None], picked, pos, depth)
        return go_on[:, 0]

    def _shallow_results(self, shallow: list[int], step: _Forward) -> tuple[list[bool], list[int]]:
        """Pick each shallow query's next token and decide whether it is hard (synced to Python).
        Only hard tokens' depth-0 logits (and sampling distributions) are kept: their deeper passes
        and drafts start from them."""
        logits, col = step.logits, step.col_shallow
        every_row = len(shallow) == len(self.rows)
        idx = None if every_row else torch.tensor(shallow, device=logits.device)
        l0 = logits[:, col] if every_row else logits[idx, col]
        nxt, q = self.sampler.pick(l0)
        if not self.decides:
            return [False] * len(shallow), nxt.tolist()
        hard = self._decide(l0, step, idx, col, [0] * len(shallow))
        hard_list, next_list = torch.stack([hard.long(), nxt]).tolist()
        hard_at = [i for i, h in enumerate(hard_list) if h]
        if hard_at:
            at = torch.tensor(hard_at, device=logits.device)
            rows = torch.tensor([shallow[i] for i in hard_at], device=logits.device)
            self.res_l0[rows] = l0[at]
            if q is not None:
                self.res_q[rows] = q[at]
        return [bool(h) for h in hard_list], next_list

    def _deep_results(self, deep: list[int], step: _Forward) -> torch.Tensor:
        """Add the deep queries' logits to their rows' sums; returns a (3, N) device tensor: go on
        (another pass), the final token (when not going on), and the draft's verdict."""
        logits, col = step.logits, step.col_deep
        device = logits.device
        idx = None if len(deep) == len(self.rows) else torch.tensor(deep, device=device)
        if idx is None:  # every row: no gather, the sum is kept in place
            acc = self.deep_acc.add_(logits[:, col])
        else:
            acc = self.deep_acc[idx] + logits[idx, col]
            self.deep_acc[idx] = acc
        passes = [self.rows[b].deep_depth + 1 for b in deep]
        go_on = None
        if any(n < self.max_iter for n in passes):
            go_on = self._decide(acc, step, idx, col, [n - 1 for n in passes])
            if not all(n < self.max_iter for n in passes):
                go_on = go_on & torch.tensor([n < self.max_iter for n in passes], device=device)
        drafts = [self.rows[b].draft for b in deep]
        if all(d is None for d in drafts):
            tokens, _ = self.sampler.pick(acc)
            accepted = torch.zeros_like(tokens)
        else:
            draft_tokens = torch.tensor([0 if d is None else d for d in drafts], device=device)
            draft_q = self.draft_q if self.draft_q is None or idx is None else self.draft_q[idx]
            accepted, tokens = self.sampler.accept(acc, draft_tokens, draft_q)
            if any(d is None for d in drafts):
                has_draft = torch.tensor([d is not None for d in drafts], device=device)
                picked, _ = self.sampler.pick(acc)
                tokens, accepted = torch.where(has_draft, tokens, picked), accepted & has_draft
        return torch.stack([torch.zeros_like(tokens) if go_on is None else go_on.long(), tokens, accepted.long()])

    # -- row transitions -----------------------------------------------------------------------
    def _after_shallow(self, row: _Row, b: int, hard: bool, nxt: int) -> None:
        """The token at row.next_pos finished its depth-0 pass."""
        pos = row.next_pos
        if hard:
            row.deep_depth, row.deep_pos = 1, pos
            self.copies.append((b, "hard"))
            if self.fused and len(row.tokens) + 1 < self.max_new:
                row.draft, row.draft_ran, row.feed, row.next_pos = nxt, False, nxt, pos + 1
                self.copies.append((b, "draft"))
                self.stats.drafts += 1
            else:
                row.feed = None
            return
        self._emit(row, nxt, 1)
        row.feed, row.next_pos = (None if row.done else nxt), pos + 1

    def _after_deep(self, row: _Row, b: int, go_on: bool, token: int, accepted: bool) -> None:
        if go_on:
            row.deep_depth += 1
            return
        passes, hard_pos = row.deep_depth + 1, row.deep_pos
        row.deep_depth = 0
        had_draft, ran = row.draft is not None, row.draft_ran
        row.draft, row.draft_ran = None, False
        self._emit(row, token, passes)
        if row.done:
            return
        if had_draft and accepted:
            self.stats.drafts_accepted += 1
            row.next_pos, row.feed = hard_pos + 1, token
            self._after_shallow(row, b, row.draft_hard, row.draft_next)
            return
        if had_draft and ran:
            self.rollbacks.append((b, row.draft_slot))
        row.feed, row.next_pos = token, hard_pos + 1

    def _apply_copies(self) -> None:
        """Batch the tensor copies the row transitions asked for."""
        for kind in ("hard", "draft"):
            rows = [b for b, k in self.copies if k == kind]
            if not rows:
                continue
            idx = torch.tensor(rows, device=self.deep_acc.device)
            if kind == "hard":
                self.deep_acc[idx] = self.res_l0[idx]
            elif self.draft_q is not None:
                self.draft_q[idx] = self.res_q[idx]
        if self.rollbacks:
            rows, slots = zip(*self.rollbacks, strict=True)
            device = self.deep_acc.device
            self.cache.invalidate(torch.tensor(rows, device=device), torch.tensor(slots, device=device))

    def _emit(self, row: _Row, token: int, passes: int) -> None:
        row.tokens.append(token)
        row.passes.append(passes)
        if self.streamer is not None:  # HF streamer protocol; ours also wants the pass count
            if getattr(self.streamer, "wants_passes", False):
                self.streamer.put(torch.tensor([token]), passes=passes)
            else:
                self.streamer.put(torch.tensor([token]))
        if token in self.eos_ids or len(row.tokens) >= self.max_new or (self.stop is not None and self.stop(row.tokens)):
            row.done = True

    def _output(self, input_ids: torch.Tensor) -> GenerationOutput:
        longest = max(len(r.tokens) for r in self.rows)
        pad = min(self.eos_ids) if self.eos_ids else 0
        new = torch.full((len(self.rows), longest), pad, dtype=torch.long)
        passes = torch.zeros(len(self.rows), longest, dtype=torch.long)
        for b, row in enumerate(self.rows):
            new[b, :len(row.tokens)] = torch.tensor(row.tokens)
            passes[b, :len(row.passes)] = torch.tensor(row.passes)
        sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
        return GenerationOutput(sequences, passes.to(input_ids.device), None, stats=self.stats)
