"""Batched TaH decoding with fused latent iterations.

Every step is one forward of the base model over at most two queries per row (one more per extra
draft candidate; the first step also takes the prompt's deferred depth-1 queries, below):

- a *deep* query: the next pass (depth >= 1) of the row's pending hard token, fed with a soft
  embedding of its accumulated logits;
- a *shallow* query: depth 0 of the row's next token (or of each draft candidate for it).

Fused (the default): when a token turns out hard, the row does not wait for its deeper passes. It
drafts the next token from the depth-0 logits and runs that draft's depth 0 in the same forward as
the hard token's depth 1 (decoding is bound by reading the weights, so two queries cost about what
one does). The draft never sees the depth-1 entry (duo-causal rule: a depth-0 query only sees depth 0),
so its computation is exactly what the unfused loop would do with that token. Once the hard token's
final logits exist, the draft is kept if it is what the unfused loop would have produced (greedy:
the argmax; sampling: speculative acceptance, exact in distribution), otherwise its KV entry is
dropped and the right token runs next. Greedy decoding may draft several candidates, the top few of
the depth-0 logits, side by side (each on a branch of its own: none sees another's KV entry), since
a deeper pass that changes the token most often picks a runner-up. Works for any max_iter: deeper
passes of the hard token run in the following forwards while the drafts wait.

Unfused (`fused=False`): a hard row runs only its deep queries until the token is final; other rows
of the batch keep decoding in the same forwards.

With max_iter 2 the prefill runs depth 0 only: the prompt's depth-1 queries ride in the first step's
forward (see `_defer`), and a hard last prompt token is handled as a hard token of decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tah.generation.reference import GenerationOutput
from tah.generation.sampling import Sampler
from tah.model.cache import TaHCache
from tah.model.decider import ConstantDecider
from tah.model.step import Queries

if TYPE_CHECKING:
    from tah.model.tah_model import TaHOutput


@dataclass
class DecodeStats:
    forwards: int = 0
    draft_candidates: int = 1  # drafted per hard token (fused)
    drafts: int = 0  # hard tokens whose next token was drafted
    drafts_accepted: int = 0  # ... and kept (a candidate was right)
    runner_ups_accepted: int = 0  # ... kept thanks to a runner-up candidate (draft_candidates > 1)
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    # the decode steps after prefill, split by whether a deeper pass ran in them: where a TaH run's
    # extra time goes (benchmarks/bench_decode.py --breakdown)
    shallow_steps: int = 0  # depth-0 queries only
    shallow_seconds: float = 0.0
    deep_steps: int = 0  # with at least one deeper pass (fused with drafts, or alone)
    deep_seconds: float = 0.0
    kv_entries: int = 0  # KV entries per layer the cache held at the end, summed over rows
    kv_bytes: int = 0  # bytes the cache allocated

    @property
    def acceptance(self) -> float:
        return self.drafts_accepted / self.drafts if self.drafts else float("nan")

    def record_step(self, deep: bool, seconds: float) -> None:
        self.forwards += 1
        if deep:
            self.deep_steps += 1
            self.deep_seconds += seconds
        else:
            self.shallow_steps += 1
            self.shallow_seconds += seconds


@dataclass
class _Forward:
    """What one step's forward returns: logits (B, W, V), HF's hidden_states (or None), the (B, W)
    positions it ran, the column of its deep queries and the first of its shallow ones (a row's
    j-th depth-0 token sits in column col_shallow + j); prompt: whether the first step's deferred
    prompt queries ran (in the last columns, whose logits are not computed: nobody reads them)."""

    logits: torch.Tensor
    hidden: tuple | None
    positions: torch.Tensor
    col_deep: int
    col_shallow: int
    prompt: bool = False


@dataclass
class _Draft:
    """A candidate for the token after a pending hard token, run at depth 0 beside its deeper pass."""

    token: int
    slot: int = -1  # its KV slot, once it ran
    hard: bool = False  # its own depth-0 verdict, used if it is kept
    next: tuple[int, ...] = ()  # the token picked from its depth-0 logits (then the runner-ups, if drafting several)


@dataclass
class _Row:
    """Python-side state of one batch row (the logits live in tensors indexed by row)."""

    next_pos: int  # position of the next depth-0 query
    feeds: list[int] = field(default_factory=list)  # tokens to run at depth 0, position next_pos, next forward
    deep_depth: int = 0  # depth of the pending hard token's next pass (0: none pending)
    deep_pos: int = 0
    drafts: list[_Draft] = field(default_factory=list)  # candidates for the position after the hard token
    done: bool = False
    tokens: list[int] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)


class Decoder:
    """One `generate` call: owns the cache, the per-row state and the step loop. candidates: draft
    candidates per hard token when fused (more than 1: greedy only)."""

    def __init__(self, model, sampler: Sampler, *, max_new_tokens: int, eos_ids: set[int], fused: bool,
                 candidates: int = 1, stop=None, streamer=None) -> None:
        self.model, self.sampler, self.max_new, self.eos_ids = model, sampler, max_new_tokens, eos_ids
        self.fused, self.candidates, self.stop, self.streamer = fused, candidates, stop, streamer
        self.max_iter = model.tah_config.max_iter
        decider = model.decider
        self.decides = self.max_iter > 1 and not (isinstance(decider, ConstantDecider) and not decider.value)
        self.embed = model.embed
        self.stats = DecodeStats(draft_candidates=candidates)

    # -- the loop ------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int) -> GenerationOutput:
        self.begin(input_ids, attention_mask, capacity)
        while not self.finished:
            self.step()
        return self.end()

    @property
    def finished(self) -> bool:
        return all(row.done for row in self.rows)

    @torch.no_grad()
    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int) -> None:
        """Prefill and pick each row's first token. `run` is begin, `step` until finished, `end`;
        the pieces let a benchmark interleave the steps of several decoders (bench_decode's `lockstep`)."""
        self.started = started = time.perf_counter()
        self.input_ids = input_ids
        batch = input_ids.shape[0]
        self.cache = TaHCache(capacity=capacity, deep_capacity=capacity // 8 + 16)
        out, pending = self._prefill(input_ids, attention_mask)
        vocab = out.logits.shape[-1]
        device, dtype = out.logits.device, out.logits.dtype
        self.deep_acc = torch.zeros(batch, vocab, device=device, dtype=dtype)  # pending hard tokens
        self.draft_q = torch.zeros(batch, vocab, device=device) if not self.sampler.greedy else None
        # depth-0 logits (and sampling distributions) of hard tokens, by row and feed (see _Row.feeds)
        self.res_l0 = torch.zeros(batch, self.candidates, vocab, device=device, dtype=dtype)
        self.res_q = torch.zeros(batch, 1, vocab, device=device) if not self.sampler.greedy else None
        lengths = attention_mask.sum(1).tolist()
        self.rows = [_Row(next_pos=int(n) - 1) for n in lengths]  # the last prompt token's position, for now
        self.deferred = None  # (row, column, position) of each deferred prompt query, and their (N, H) inputs
        hard_last = self._defer(pending) if pending is not None else [False] * batch
        l0 = out.logits[:, -1]
        first, q = self.sampler.pick(l0)
        picks = [(token,) for token in first.tolist()]
        hard_at = [b for b, hard in enumerate(hard_last) if hard]
        if hard_at:
            picks = self._keep_hard(l0, q, hard_at, list(range(batch)), [0] * batch, picks)
        self.copies, self.rollbacks = [], []
        for b, (row, passes) in enumerate(zip(self.rows, out.iter_count[:, -1].tolist(), strict=True)):
            if hard_last[b]:  # its depth-1 pass runs in the first step, as a hard token's in decoding
                self._after_shallow(row, b, True, picks[b], 0)
                continue
            self._emit(row, picks[b][0], passes)
            row.next_pos += 1
            if not row.done:
                row.feeds = [picks[b][0]]
        self._apply_copies()
        self.stats.prefill_seconds = time.perf_counter() - started

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[TaHOutput, Queries | None]:
        """The model's forward over the prompts, run a depth at a time; with max_iter 2 it stops
        before the last pass (depth 1), whose queries come back to ride in the first step (_defer)."""
        loop = self.model.begin_forward(input_ids, attention_mask, cache=self.cache, logits_to_keep=1)
        defer = self.decides and self.max_iter == 2
        while loop.tokens is not None and not (defer and loop.tokens.depth == 1):
            self.model.depth_step(loop)
        return self.model.end_forward(loop, use_cache=True), loop.tokens

    def _defer(self, pending: Queries) -> list[bool]:
        """Keep the prompt's depth-1 pass, which prefill did not run, for the first step's forward:
        nothing reads a depth-1 entry before it (depth-0 queries never do), and it then costs a few
        more rows of a pass over the weights instead of a pass of its own. A row whose last prompt
        token is hard takes that token's pass as a pending hard token instead (drafting the first
        token beside it when fused). Returns, per row, whether its last prompt token is hard."""
        inputs, positions, real = pending.inputs, pending.positions, pending.real
        last = [row.next_pos for row in self.rows]
        pos_lists, real_lists = positions.tolist(), real.tolist()
        hard_last = [any(r and p == last[b] for p, r in zip(pos_lists[b], real_lists[b], strict=True))
                     for b in range(len(self.rows))]
        # per row, the columns to run in the first step: real ones, the last token's excepted
        columns = [[j for j, (p, r) in enumerate(zip(pos_lists[b], real_lists[b], strict=True)) if r and p != last[b]]
                   for b in range(len(self.rows))]
        self.deferred = None
        if any(columns):
            rows = [b for b, cols in enumerate(columns) for _ in cols]
            device = inputs.device
            self.deferred = ([(b, k, pos_lists[b][j]) for b, cols in enumerate(columns) for k, j in enumerate(cols)],
                             inputs[torch.tensor(rows, device=device),
                                    torch.tensor([j for cols in columns for j in cols], device=device)])
        return hard_last

    @torch.no_grad()
    def step(self) -> None:
        """One decode step (one forward), timed into the stats."""
        step_started = time.perf_counter()
        deep = self._step()
        self.stats.record_step(deep, time.perf_counter() - step_started)

    def end(self) -> GenerationOutput:
        """The output once every row is done. stats.seconds: from begin to now."""
        self.stats.seconds = time.perf_counter() - self.started
        self.stats.kv_entries, self.stats.kv_bytes = int(self.cache.entries().sum()), self.cache.nbytes()
        if self.streamer is not None:
            self.streamer.end()
        return self._output(self.input_ids)

    def _step(self) -> bool:
        """One forward and the row transitions it allows; returns whether a deeper pass ran."""
        live = [b for b, r in enumerate(self.rows) if not r.done]
        deep = [b for b in live if self.rows[b].deep_depth > 0]
        shallow = [b for b in live if self.rows[b].feeds]
        normal = {b for b in shallow if not self.rows[b].drafts}  # not drafts awaiting their verdict
        step = self._forward(deep, shallow)
        # The deep results stay on the device until the shallow ones sync (one stall per step).
        dp = self._deep_results(deep, step) if deep else None
        results = self._shallow_results(shallow, step) if shallow else []
        if len(normal) < len(shallow):
            self._hold_drafts([(b, r) for b, r in zip(shallow, results, strict=True) if b not in normal], step)
        self.copies: list[tuple[int, int, str]] = []  # (row, feed, what)
        self.rollbacks: list[tuple[int, int]] = []
        if dp is not None:
            for b, go_on, final_token, kept in zip(deep, *dp.tolist(), strict=True):
                if self.sampler.greedy and not go_on:  # keep the candidate that is the argmax, if any
                    tokens = [draft.token for draft in self.rows[b].drafts]
                    kept = tokens.index(final_token) if final_token in tokens else -1
                self._after_deep(self.rows[b], b, bool(go_on), final_token, kept)
        for b, row_results in zip(shallow, results, strict=True):
            if b in normal:
                hard, picks = row_results[0]
                self._after_shallow(self.rows[b], b, hard, picks, 0)
        self._apply_copies()
        return bool(deep) or step.prompt

    def _hold_drafts(self, ran: list[tuple[int, list[tuple[bool, tuple[int, ...]]]]], step: _Forward) -> None:
        """Drafts ran beside their hard token: each keeps its KV slot and its own results (hard?,
        picks) until the hard token's verdict. ran: (row, its drafts' results) per such row."""
        slots = self.cache.last_slots.tolist()
        for b, row_results in ran:
            row = self.rows[b]
            for j, (draft, (hard, picks)) in enumerate(zip(row.drafts, row_results, strict=True)):
                draft.slot, draft.hard, draft.next = slots[b][step.col_shallow + j], hard, picks
            row.feeds = []

    # -- device work ---------------------------------------------------------------------------
    def _forward(self, deep: list[int], shallow: list[int]) -> _Forward:
        """The step's pass: the model's `run_pass` over the queries `_schedule` lays out."""
        queries, col_deep, col_shallow, col_prompt = self._schedule(deep, shallow)
        need_hidden = self.decides and bool(self.model.decider.needs_hidden)
        if col_prompt is None:
            logits, hidden = self.model.run_pass(queries, self.cache, need_hidden)
            return _Forward(logits, hidden, queries.positions, col_deep, col_shallow)
        # The prompt's deferred queries' logits nobody reads: the LM head skips them (at context 2048, ~200).
        batch, width = queries.real.shape
        need = (torch.arange(width, device=queries.real.device) < col_prompt).expand(batch, -1)
        logits, hidden = self.model.run_pass(queries, self.cache, need_hidden, need=need)
        return _Forward(logits.view(batch, col_prompt, -1), hidden, queries.positions, col_deep, col_shallow, True)

    def _schedule(self, deep: list[int], shallow: list[int]) -> tuple[Queries, int, int, int | None]:
        """The step's queries, rows scheduled into columns: column 0 holds the deep queries (a row's
        pending hard token's next pass, its input the soft input of its sums), the next ones each
        row's depth-0 tokens (their embeddings), then the prompt's deferred queries (inputs made in
        prefill). Returns them, the columns of the deep and first depth-0 queries and the first
        prompt column (None: none this step)."""
        batch = len(self.rows)
        device = self.deep_acc.device
        feeds = [(b, j, token) for b in shallow for j, token in enumerate(self.rows[b].feeds)]
        prompt, prompt_inputs = self._prompt_queries()
        if not deep and not prompt and len(feeds) == batch and len(shallow) == batch:  # the plain step
            feed = torch.tensor([token for _, _, token in feeds], device=device)
            positions = torch.tensor([[row.next_pos] for row in self.rows], device=device)
            real = torch.ones(batch, 1, dtype=torch.bool, device=device)
            return Queries(self.embed(feed)[:, None], positions, 0, real), 0, 0, None
        col_deep, col_shallow = 0, int(bool(deep))
        col_prompt = col_shallow + max((j + 1 for _, j, _ in feeds), default=0)
        width = col_prompt + max((k + 1 for _, k, _ in prompt), default=0)
        # Small per-query tags are built in Python and sent once: a handful of tensor ops per step
        # instead of two dozen (each costs microseconds, which add up at batch 1).
        pos_tags, depth_tags, real_tags = ([[0] * width for _ in range(batch)] for _ in range(3))
        for b in deep:
            row = self.rows[b]
            pos_tags[b][col_deep], depth_tags[b][col_deep], real_tags[b][col_deep] = row.deep_pos, row.deep_depth, 1
        for b, k, position in prompt:
            pos_tags[b][col_prompt + k], depth_tags[b][col_prompt + k], real_tags[b][col_prompt + k] = position, 1, 1
        for b, j, _ in feeds:
            pos_tags[b][col_shallow + j], real_tags[b][col_shallow + j] = self.rows[b].next_pos, 1
        parts = []  # (rows, columns, (N, H) inputs)
        if deep:
            acc = self.deep_acc if len(deep) == batch else self.deep_acc[torch.tensor(deep, device=device)]
            parts.append((deep, [col_deep] * len(deep), self.model.soft_input(acc)))
        if feeds:
            tokens = torch.tensor([token for _, _, token in feeds], device=device)
            parts.append(([b for b, _, _ in feeds], [col_shallow + j for _, j, _ in feeds], self.embed(tokens)))
        if prompt:
            parts.append(([b for b, _, _ in prompt], [col_prompt + k for _, k, _ in prompt], prompt_inputs))
        depths = {self.rows[b].deep_depth for b in deep} | ({0} if feeds else set()) | ({1} if prompt else set())
        depth = depths.pop() if len(depths) == 1 else torch.tensor(depth_tags, device=device)
        queries = Queries(_grid(parts, batch, width), torch.tensor(pos_tags, device=device), depth,
                          torch.tensor(real_tags, dtype=torch.bool, device=device),
                          self._branches(shallow, col_shallow, width))
        return queries, col_deep, col_shallow, col_prompt if prompt else None

    def _branches(self, shallow: list[int], col_shallow: int, width: int) -> list[list[int]] | None:
        """The step's branch ids (B, width) when a row runs several draft candidates: candidate j on
        branch j + 1, so that none sees another's KV entry and each computes what it would alone
        (the cache's `begin_pass`); None when no row does."""
        several = [b for b in shallow if len(self.rows[b].feeds) > 1]  # only draft candidates come several
        if not several:
            return None
        branches = [[0] * width for _ in self.rows]
        for b in several:
            for j in range(len(self.rows[b].feeds)):
                branches[b][col_shallow + j] = j + 1
        return branches

    def _prompt_queries(self) -> tuple[list[tuple[int, int, int]], torch.Tensor | None]:
        """The deferred prompt queries of rows still decoding, (row, column, position) and their
        (N, H) inputs, once (the first step); then none."""
        if self.deferred is None:
            return [], None
        (queries, inputs), self.deferred = self.deferred, None
        live = [i for i, (b, _, _) in enumerate(queries) if not self.rows[b].done]
        if len(live) < len(queries):  # a row done at its first token needs no deeper entries
            queries, inputs = [queries[i] for i in live], inputs[torch.tensor(live, device=inputs.device)]
        return queries, inputs

    def _decide(self, acc: torch.Tensor, step: _Forward, idx: torch.Tensor | None, col: int | torch.Tensor,
                depths: list[int]) -> torch.Tensor:
        """(N, V) accumulated logits of queries (idx, col) of `step` -> (N,) bool: run another pass.
        idx: (N,) rows, or None for every row (the callers' own row index, not built twice); col:
        one column, or (N,) columns with idx."""
        device = acc.device
        pos = step.positions[:, col:col + 1] if idx is None else step.positions[idx, col][:, None]
        picked = None
        if step.hidden is not None:
            picked = tuple(None if h is None else h[:, col:col + 1] if idx is None else h[idx, col][:, None]
                           for h in step.hidden)
        same = all(d == depths[0] for d in depths)  # an int depth spares the decider a tensor
        depth = depths[0] if same else torch.tensor(depths, device=device)[:, None]
        return self.model.decide(acc[:, None], picked, pos, depth)[:, 0]

    def _shallow_results(self, shallow: list[int], step: _Forward) -> list[list[tuple[bool, tuple[int, ...]]]]:
        """Per shallow row, per depth-0 token it ran: (hard?, picks), synced to Python; picks: the
        next token from its logits, then for a hard token the runner-ups when drafting several. Only
        hard tokens' depth-0 logits (and sampling distributions) are kept: their deeper passes and
        drafts start from them."""
        logits, col = step.logits, step.col_shallow
        counts = [len(self.rows[b].feeds) for b in shallow]
        one_each = len(shallow) == len(self.rows) and all(n == 1 for n in counts)
        rows = [b for b, n in zip(shallow, counts, strict=True) for _ in range(n)]
        feeds = [j for n in counts for j in range(n)]
        columns = [col + j for j in feeds]
        if one_each:
            l0 = logits[:, col]
        elif len(shallow) == 1:  # one row's run of columns (batch 1's drafts): a view, not a gathered copy
            l0 = logits[shallow[0], col:col + counts[0]]
        else:
            l0 = logits[torch.tensor(rows, device=logits.device), torch.tensor(columns, device=logits.device)]
        nxt, q = self.sampler.pick(l0)
        if not self.decides:
            hard_list, next_list = [0] * len(rows), nxt.tolist()
        elif self.model.decider.position_only:  # (random) no tensor op: ~1.1-1.4% of a step at batch 1
            hard_list = self.model.decider.decide_positions([self.rows[b].next_pos for b in rows], 0)
            next_list = nxt.tolist()
        else:
            where = (None, col) if one_each else \
                (torch.tensor(rows, device=logits.device), torch.tensor(columns, device=logits.device))
            hard = self._decide(l0, step, *where, [0] * len(rows))
            hard_list, next_list = torch.stack([hard.long(), nxt]).tolist()
        picks = [(token,) for token in next_list]
        hard_at = [i for i, h in enumerate(hard_list) if h]
        if hard_at:
            picks = self._keep_hard(l0, q, hard_at, rows, feeds, picks)
        results, start = [], 0
        for n in counts:
            results.append([(bool(h), p) for h, p in zip(hard_list[start:start + n], picks[start:start + n], strict=True)])
            start += n
        return results

    def _keep_hard(self, l0: torch.Tensor, q: torch.Tensor | None, hard_at: list[int], rows: list[int],
                   feeds: list[int], picks: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Keep the depth-0 logits (and distributions) of the hard tokens at `hard_at` (indices of
        l0's rows, which belong to `rows` and `feeds`); when drafting several candidates, add each
        one's runner-ups to its picks. A row without drafts starts its hard token's deeper pass next:
        its logits go straight to deep_acc (and draft_q); a draft's wait in res_l0 (and res_q) until
        the draft is kept (see _after_shallow's `staged`)."""
        device = l0.device
        direct = [i for i in hard_at if not self.rows[rows[i]].drafts]
        staged = [i for i in hard_at if self.rows[rows[i]].drafts]
        if direct:
            where = [rows[i] for i in direct]
            if where == list(range(self.deep_acc.shape[0])):  # every row (batch 1): plain copies
                self.deep_acc.copy_(_rows_of(l0, direct))
                if q is not None:
                    self.draft_q.copy_(_rows_of(q, direct))
            else:
                where = torch.tensor(where, device=device)
                self.deep_acc.index_copy_(0, where, _rows_of(l0, direct))
                if q is not None:
                    self.draft_q.index_copy_(0, where, _rows_of(q, direct))
        if staged:
            where = (torch.tensor([rows[i] for i in staged], device=device),
                     torch.tensor([feeds[i] for i in staged], device=device))
            self.res_l0[where] = _rows_of(l0, staged)
            if q is not None:
                self.res_q[where] = _rows_of(q, staged)
        if self.candidates < 2:
            return picks
        picks = list(picks)
        top = _rows_of(l0, hard_at).topk(min(self.candidates, l0.shape[-1])).indices  # a tie may repeat the pick (_after_shallow)
        for i, others in zip(hard_at, top[:, 1:].tolist(), strict=True):
            picks[i] = (picks[i][0], *others)
        return picks

    def _deep_results(self, deep: list[int], step: _Forward) -> torch.Tensor:
        """Add the deep queries' logits to their rows' sums; returns a (3, N) device tensor: go on
        (another pass), the final token (when not going on), and the draft candidate kept (-1:
        none; greedy: -1, as _step finds it in Python)."""
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
        drafts = [[d.token for d in self.rows[b].drafts] for b in deep]
        if not any(drafts) or self.sampler.greedy:  # greedy: the candidate kept is found in Python (_step)
            tokens, _ = self.sampler.pick(acc)
            kept = torch.full_like(tokens, -1)
        else:
            draft_tokens = torch.tensor([d[0] if d else 0 for d in drafts], device=device)
            draft_q = self.draft_q if idx is None else self.draft_q[idx]
            accepted, tokens = self.sampler.accept(acc, draft_tokens, draft_q)
            if not all(drafts):
                has_draft = torch.tensor([bool(d) for d in drafts], device=device)
                picked, _ = self.sampler.pick(acc)
                tokens, accepted = torch.where(has_draft, tokens, picked), accepted & has_draft
            kept = torch.where(accepted, 0, -1)
        return torch.stack([torch.zeros_like(tokens) if go_on is None else go_on.long(), tokens, kept])

    # -- row transitions -----------------------------------------------------------------------
    def _after_shallow(self, row: _Row, b: int, hard: bool, picks: tuple[int, ...], feed: int,
                       staged: bool = False) -> None:
        """The row's `feed`-th token at row.next_pos finished its depth-0 pass; picks: the next
        token from its logits (then the runner-ups, when drafting several candidates). staged: it
        was a draft, whose logits (if hard) wait in res_l0 (see _keep_hard)."""
        pos = row.next_pos
        if hard:
            row.deep_depth, row.deep_pos = 1, pos
            if staged:
                self.copies.append((b, feed, "hard"))
            if self.fused and len(row.tokens) + 1 < self.max_new:
                candidates = list(dict.fromkeys(picks[:self.candidates]))  # a tie may make them one token
                row.drafts = [_Draft(token) for token in candidates]
                row.feeds, row.next_pos = candidates, pos + 1
                if staged:
                    self.copies.append((b, feed, "draft"))
                self.stats.drafts += 1
            else:
                row.feeds = []
            return
        self._emit(row, picks[0], 1)
        row.feeds, row.next_pos = ([] if row.done else [picks[0]]), pos + 1

    def _after_deep(self, row: _Row, b: int, go_on: bool, token: int, kept: int) -> None:
        """The pending hard token finished a deeper pass; kept: the draft candidate that is its
        final token (or the accepted sample), -1 for none."""
        if go_on:
            row.deep_depth += 1
            return
        passes, hard_pos = row.deep_depth + 1, row.deep_pos
        row.deep_depth = 0
        drafts, row.drafts = row.drafts, []
        self._emit(row, token, passes)
        if row.done:
            return
        for j, draft in enumerate(drafts):
            if j != kept and draft.slot >= 0:
                self.rollbacks.append((b, draft.slot))
        row.feeds, row.next_pos = [token], hard_pos + 1
        if kept >= 0:
            self.stats.drafts_accepted += 1
            self.stats.runner_ups_accepted += kept > 0
            self._after_shallow(row, b, drafts[kept].hard, drafts[kept].next, kept, staged=True)

    def _apply_copies(self) -> None:
        """Batch the tensor copies the row transitions asked for."""
        for kind in ("hard", "draft"):
            chosen = [(b, j) for b, j, k in self.copies if k == kind]
            if not chosen or kind == "draft" and self.draft_q is None:
                continue
            rows, feeds = (torch.tensor(x, device=self.deep_acc.device) for x in zip(*chosen, strict=True))
            if kind == "hard":
                self.deep_acc[rows] = self.res_l0[rows, feeds]
            else:
                self.draft_q[rows] = self.res_q[rows, feeds]
        if self.rollbacks:
            rows, slots = zip(*self.rollbacks, strict=True)
            self.cache.invalidate(list(rows), list(slots))

    def _emit(self, row: _Row, token: int, passes: int) -> None:
        row.tokens.append(token)
        row.passes.append(passes)
        stream(self.streamer, token, passes)
        if token in self.eos_ids or len(row.tokens) >= self.max_new or (self.stop is not None and self.stop(row.tokens)):
            row.done = True

    def _output(self, input_ids: torch.Tensor) -> GenerationOutput:
        return output(input_ids, [row.tokens for row in self.rows], [row.passes for row in self.rows],
                      self.eos_ids, self.stats)


def stream(streamer, token: int, passes: int) -> None:
    """Hand a new token to `streamer` (HF's streamer protocol; ours also takes the pass count), if any."""
    if streamer is None:
        return
    if getattr(streamer, "wants_passes", False):
        streamer.put(torch.tensor([token]), passes=passes)
    else:
        streamer.put(torch.tensor([token]))


def output(input_ids: torch.Tensor, tokens: list[list[int]], passes: list[list[int]], eos_ids: set[int],
           stats: DecodeStats) -> GenerationOutput:
    """The GenerationOutput of rows that made `tokens` with `passes` each: shorter rows padded with the
    lowest EOS id (0 without one), their pass counts with 0."""
    longest = max(len(row) for row in tokens)
    pad = min(eos_ids) if eos_ids else 0
    new = torch.full((len(tokens), longest), pad, dtype=torch.long)
    counts = torch.zeros(len(tokens), longest, dtype=torch.long)
    for b, (row_tokens, row_passes) in enumerate(zip(tokens, passes, strict=True)):
        new[b, :len(row_tokens)] = torch.tensor(row_tokens, dtype=torch.long)
        counts[b, :len(row_passes)] = torch.tensor(row_passes, dtype=torch.long)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    return GenerationOutput(sequences, counts.to(input_ids.device), None, stats=stats)


def _grid(parts: list[tuple[list[int], list[int], torch.Tensor]], batch: int, width: int) -> torch.Tensor:
    """The (batch, width, H) inputs of a step from its parts: (rows, columns, (N, H) inputs) each;
    zeros where no part puts one (padding)."""
    if sum(len(rows) for rows, _, _ in parts) == batch * width:  # every slot of the step is a query
        return torch.cat([x.view(batch, -1, x.shape[-1]) for _, _, x in parts], dim=1)
    inputs = parts[0][2].new_zeros(batch, width, parts[0][2].shape[-1])
    for rows, cols, x in parts:
        inputs[torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)] = x
    return inputs


def _rows_of(values: torch.Tensor, at: list[int]) -> torch.Tensor:
    """Rows `at` of (N, V) values: values itself when that is all of them in order (batch 1), else a gather."""
    return values if at == list(range(values.shape[0])) else values.index_select(0, torch.tensor(at, device=values.device))
