"""Continuous batching on the static engine: a server's requests in the fixed rows of one runner.

`slots.BatchDecoder` runs the eager engine, which on a GPU is bound by launching kernels (issue
26). Here the running batch lives in one `StaticRunner` of `max_batch` rows, whose two decode
steps a CUDA graph replays. A request joins through a prefill of its own (what `tah.generate`
runs for that prompt alone on the static engine), whose cache entries are copied into a free row
(`StaticRunner.join_row`); a row that finishes or is cancelled leaves between steps, the last row
moving into its place, so that the running rows always lead. A step runs on the smallest bucket of
leading rows (1, 2, 4, ... up to `max_batch`; views of the runner's buffers, each with its own
graphs) that holds them: one request costs a step of one row, not of the whole batch. A step reads
the device once for the tokens every row emitted (and once more for log-probabilities, when a row
wants them).

Each row keeps its own sampling settings (the runner's per-row buffers), stop rules and random
generator, and a seeded row draws what its solo static run draws, in the same order: its first
token from the prefill, then Exp(1) noise each step, and a uniform and more noise on the steps
that finish its hard tokens. A seeded request thus samples the tokens `tah.generate(...,
engine="static", seed=...)` gives it alone, and a greedy one its greedy tokens; unseeded rows
share one draw a step from torch's default generator.
"""

from __future__ import annotations

import torch

from tah.errors import InputError
from tah.generation.slots import Request, Row
from tah.generation.static import NONE, StaticRunner, rounded_capacity
from tah.model.cache import TaHCache

# Slots a joining row is given room for past its prompt's: every row of the runner gets the same
# capacity, so reserving each request's worst case (max_tokens can be the whole context) would
# multiply it by the batch; rows that need more grow the runner as they get there.
JOIN_HEADROOM = 512


class StaticBatchDecoder:
    """`slots.BatchDecoder`'s contract (`join`, `step`, `leave`, `rows`) on the static engine, for
    models it supports (max_iter <= 2). graphs: CUDA graphs (None: on CUDA devices)."""

    def __init__(self, model, *, max_batch: int, graphs: bool | None = None) -> None:
        self.model, self.max_batch = model, max_batch
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        self.rows: list[Row] = []
        self.runner: StaticRunner | None = None
        self._place: dict[int, int] = {}  # id(row) -> its row in the runner
        self._pending: dict[int, bool] = {}  # id(row) -> a hard token awaits its depth-1 pass
        self._bound: dict[int, int] = {}  # id(row) -> a bound on its filled slots, known without reading them
        self._buckets: dict[int, StaticRunner] = {}  # rows -> the runner over the runner's leading rows

    @torch.no_grad()
    def join(self, request: Request) -> Row:
        """Prefill `request` alone and give it a free row, unless its first token ends it already.
        Returns its row (done if so). Raises InputError for an empty prompt or a full batch."""
        if not request.prompt:
            raise InputError("the prompt is empty: it needs at least one token (e.g. a BOS token)")
        if len(self.rows) >= self.max_batch:
            raise InputError(f"the batch holds {self.max_batch} requests already; join after one leaves")
        ids = torch.tensor([request.prompt], device=self.model.device)
        prefill = TaHCache(capacity=ids.shape[1])
        out = self.model(ids, attention_mask=torch.ones_like(ids), past_key_values=prefill, use_cache=True,
                         logits_to_keep=1)
        logits = out.logits[:, -1]
        first, _ = request.sampler.pick(logits)  # the solo run's first draw
        row = Row(next_pos=len(request.prompt), request=request)
        first_token = int(first[0])
        self._emit(row, first_token, int(out.iter_count[0, -1]), *_first_logprobs(request, logits[0], first_token))
        if row.done:
            return row
        used = int(prefill.fill[0])
        headroom = min(request.max_new_tokens + request.max_new_tokens // 4, JOIN_HEADROOM)
        runner = self._runner_with_room(used + headroom + 2, out.logits.dtype)
        place = len(self.rows)  # the rows lead: the first free place is after them
        runner.join_row(place, prefill, first_token, len(request.prompt), request.sampler)
        self.rows.append(row)
        self._place[id(row)], self._pending[id(row)], self._bound[id(row)] = place, False, used
        return row

    def leave(self, rows: list[Row]) -> None:
        """Drop `rows` from the batch (done or cancelled). The rows after the last one staying move
        into the places freed before it, so the rows still lead; the places after them go idle."""
        gone = {id(row) for row in rows} & set(self._place)
        if not gone:
            return
        freed = sorted(self._place.pop(key) for key in gone)
        for key in gone:
            del self._pending[key], self._bound[key]
        self.rows = [row for row in self.rows if id(row) not in gone]
        kept = len(self.rows)
        movers = [row for row in self.rows if self._place[id(row)] >= kept]
        for row, place in zip(movers, (place for place in freed if place < kept), strict=True):
            self.runner.move_row(self._place[id(row)], place)
            self._place[id(row)] = place
        self.runner.active[kept:] = False

    @torch.no_grad()
    def step(self) -> None:
        """One step of every row; rows that finish have `done` set (call `leave` for them)."""
        runner = self._bucket(self._room_for_a_step())
        fused = any(self._pending.values())
        sampled = self._draw_noise(runner)
        logprobs = any(row.request.logprobs is not None for row in self.rows)
        runner.step(fused, sampled, logprobs)
        emitted = runner.out.tolist()  # the step's one host sync
        scores = (runner.logprob.tolist(), runner.top_ids.tolist(), runner.top_logprobs.tolist()) if logprobs else None
        stopped = []
        for row in self.rows:
            key, place = id(row), self._place[id(row)]
            deep_token, shallow_token, hard = emitted[place]
            self._bound[key] += 2 if fused else 1
            if deep_token != NONE:
                self._emit(row, deep_token, 2, *_step_logprobs(row, scores, place, 0))
            if shallow_token != NONE and not row.done:
                self._emit(row, shallow_token, 1, *_step_logprobs(row, scores, place, 1))
            self._pending[key] = bool(hard) and not row.done
            if row.done:
                stopped.append(place)
        if stopped:
            runner.active[stopped] = False  # their slots idle until `leave` gives the rows away

    def _bucket(self, runner: StaticRunner) -> StaticRunner:
        """The runner over the fewest leading rows, a power of two (or max_batch), that hold the batch."""
        rows = min(1 << (len(self.rows) - 1).bit_length(), self.max_batch)
        if rows == self.max_batch:
            return runner
        if rows not in self._buckets:
            self._buckets[rows] = runner.leading_rows(rows)
        return self._buckets[rows]

    def _draw_noise(self, runner: StaticRunner) -> bool:
        """The step's randomness; returns whether any row samples. A seeded row draws from its own
        generator what its solo run draws; the unseeded rows share one draw over the whole batch from
        torch's default generator (a few launches a step instead of a few a row), made first so that
        the seeded rows' own draws overwrite theirs."""
        sampling = [row for row in self.rows if not row.request.sampler.greedy]
        unseeded = [row for row in sampling if row.request.sampler.generator is None]
        if unseeded:
            runner.draw_noise(None, any(self._pending[id(row)] for row in unseeded))
        for row in sampling:
            if row.request.sampler.generator is not None:
                runner.draw_noise(row.request.sampler.generator, self._pending[id(row)], row=self._place[id(row)])
        return bool(sampling)

    # -- the runner's room ---------------------------------------------------------------------
    def _runner_with_room(self, slots: int, dtype: torch.dtype) -> StaticRunner:
        """The runner, made (or grown) so that a row holds `slots` slots."""
        if self.runner is None:
            self.runner = StaticRunner(self.model, self.max_batch, rounded_capacity(slots), dtype, self.model.device,
                                       self.graphs)
        elif self.runner.cache.capacity < slots:
            self.runner.grow(rounded_capacity(max(slots, 2 * self.runner.cache.capacity)))
            self._buckets = {}  # views of the old buffers
        return self.runner

    def _room_for_a_step(self) -> StaticRunner:
        """Grow the runner if a row could fill its slots in the next step (a fused step adds 2 a row).
        The bounds are known on the host; the fills are read only when a bound gets near the end."""
        runner = self.runner
        capacity = runner.cache.capacity
        if max(self._bound.values()) + 2 > capacity:
            fills = runner.cache.fill.tolist()
            for row in self.rows:
                self._bound[id(row)] = fills[self._place[id(row)]]
            if max(self._bound.values()) + 2 > capacity:
                runner.grow(rounded_capacity(2 * capacity))
                self._buckets = {}  # views of the old buffers
        return runner

    def _emit(self, row: Row, token: int, passes: int, logprob: float | None = None, top: list | None = None) -> None:
        row.tokens.append(token)
        row.passes.append(passes)
        if logprob is not None:
            row.logprobs.append((logprob, top))
        request = row.request
        if token in request.eos_ids or len(row.tokens) >= request.max_new_tokens or \
                (request.stop is not None and request.stop(row.tokens)):
            row.done = True


def _first_logprobs(request: Request, logits: torch.Tensor, token: int) -> tuple:
    """(log-probability of `token`, [(id, log-probability)] of the request's k most likely) under
    (V,) logits, or () if the request wants none."""
    k = request.logprobs
    if k is None:
        return ()
    scores = torch.log_softmax(logits.float(), -1)
    top = torch.topk(scores, min(k, scores.shape[-1]))
    return float(scores[token]), list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


def _step_logprobs(row: Row, scores: tuple | None, place: int, column: int) -> tuple:
    """A step's log-probabilities of the token the row emitted from `column`, as `_first_logprobs`."""
    k = row.request.logprobs
    if k is None:
        return ()
    logprob, ids, values = scores
    return logprob[place][column], list(zip(ids[place][column][:k], values[place][column][:k], strict=True))
