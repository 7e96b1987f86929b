"""Continuous batching: a Decoder whose rows are requests that join between steps and leave when done.

A request joins through a prefill of its own: a one-row `Decoder.begin`, exactly what
`tah.generate` runs for that prompt alone. Its cache row and decoding state are then appended to
the running batch (`TaHCache.append_rows`), and the rows step together, fused drafts and all. A row
that finishes or is cancelled leaves the batch (`TaHCache.keep_rows`) between steps, so a step never
computes rows nobody waits for.

Each row keeps its own sampling settings, stop rules and random generator, and makes exactly the
draws its solo run makes, in the same order (a pick per depth-0 token, a pick or a speculative
acceptance per deeper pass): a seeded request samples the same tokens as `tah.generate(...,
seed=...)` on its own, and a greedy one the same tokens as a greedy call. Drafting takes one
candidate per hard token (greedy's extra candidates change speed, never tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tah.generation.engine import Decoder, _Row
from tah.generation.sampling import Sampler, greedy_tokens


@dataclass
class Request:
    """One prompt to decode. logprobs: None (off) or k >= 0: record each generated token's log
    probability under the final accumulated logits, with the k most likely tokens."""

    prompt: list[int]
    max_new_tokens: int
    sampler: Sampler = field(default_factory=Sampler)  # give it a seeded generator for reproducible draws
    eos_ids: set[int] = field(default_factory=set)
    stop: Callable[[list[int]], bool] | None = None  # tokens -> stop now? (generate's _stop_checker)
    logprobs: int | None = None


@dataclass
class Row(_Row):
    """A batch row with its request; tokens, passes (and logprobs) grow as it decodes."""

    request: Request = field(default_factory=lambda: Request([], 1))
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    # position -> (V,) log-softmax of the latest logits picked from there (logprobs only)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)


class BatchDecoder(Decoder):
    """The running batch of a server: `join` a request, `step` every row once, `leave` rows. Starts
    empty; `rows` are the requests decoding, in batch order."""

    def __init__(self, model, *, fused: bool = True) -> None:
        super().__init__(model, _RowSamplers(), max_new_tokens=1, eos_ids=set(), fused=fused, candidates=1)
        self.rows: list[Row] = []
        self.cache = None
        self.deferred = None
        self._prompt_parts: list[tuple[Row, list[tuple[int, int]], torch.Tensor]] = []
        self.copies, self.rollbacks = [], []

    @torch.no_grad()
    def join(self, request: Request) -> Row:
        """Prefill `request` alone and add it to the batch, unless its first token ends it already.
        Returns its row (done if so). Raises InputError on bad settings, as tah.generate does."""
        prompt_len = len(request.prompt)
        recorder = _Recorder(request, prompt_len - 1)
        solo = Decoder(self.model, recorder, max_new_tokens=request.max_new_tokens, eos_ids=request.eos_ids,
                       fused=self.fused, candidates=1, stop=request.stop)
        ids = torch.tensor([request.prompt], device=self.model.device)
        solo.begin(ids, torch.ones_like(ids), prompt_len + request.max_new_tokens + 16)
        row = Row(**vars(solo.rows[0]), request=request)
        row.scores = recorder.scores
        if row.tokens:  # the first token came from the prefill's logits
            _log_emitted(row)
        if row.done:
            return row
        vocab = solo.deep_acc.shape[-1]
        draft_q = solo.draft_q if solo.draft_q is not None else solo.deep_acc.new_zeros(1, vocab, dtype=torch.float32)
        res_q = solo.res_q if solo.res_q is not None else draft_q.new_zeros(1, 1, vocab)
        if not self.rows:
            self.cache, self.deep_acc, self.draft_q = solo.cache, solo.deep_acc, draft_q
            self.res_l0, self.res_q = solo.res_l0, res_q
        else:
            self.cache.append_rows(solo.cache)
            self.deep_acc, self.draft_q = torch.cat([self.deep_acc, solo.deep_acc]), torch.cat([self.draft_q, draft_q])
            self.res_l0, self.res_q = torch.cat([self.res_l0, solo.res_l0]), torch.cat([self.res_q, res_q])
        self.rows.append(row)
        if solo.deferred is not None:  # the prompt's depth-1 queries, for the next step (see Decoder._defer)
            queries, inputs = solo.deferred
            self._prompt_parts.append((row, [(k, pos) for _, k, pos in queries], inputs))
        return row

    def leave(self, rows: list[Row]) -> None:
        """Drop `rows` from the batch (done or cancelled), with their cache entries."""
        gone = {id(row) for row in rows}
        keep = [b for b, row in enumerate(self.rows) if id(row) not in gone]
        self._prompt_parts = [part for part in self._prompt_parts if id(part[0]) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[b] for b in keep]
        if not keep:
            self.cache = self.deep_acc = self.draft_q = self.res_l0 = self.res_q = None
            return
        self.cache.keep_rows(keep)
        index = torch.tensor(keep, device=self.deep_acc.device)
        self.deep_acc, self.draft_q, self.res_l0, self.res_q = (
            t.index_select(0, index) for t in (self.deep_acc, self.draft_q, self.res_l0, self.res_q))

    @torch.no_grad()
    def step(self) -> None:
        """One forward over every row; rows that finish have `done` set (call `leave` for them)."""
        if self._prompt_parts:  # joined since the last step: their deferred prompt queries ride in this one
            index = {id(row): b for b, row in enumerate(self.rows)}
            queries = [(index[id(row)], k, pos) for row, part, _ in self._prompt_parts for k, pos in part]
            self.deferred = (queries, torch.cat([inputs for _, _, inputs in self._prompt_parts]))
            self._prompt_parts = []
        super().step()

    # -- the per-row hooks of Decoder ----------------------------------------------------------
    def _shallow_results(self, shallow, step):
        # one query per row (one candidate), at the row's next position
        self.sampler.rows = [self.rows[b] for b in shallow for _ in self.rows[b].feeds]
        return super()._shallow_results(shallow, step)

    def _deep_results(self, deep: list[int], step) -> torch.Tensor:
        """Decoder._deep_results with each row's own sampler, making exactly its solo run's draws."""
        logits, col = step.logits, step.col_deep
        device = logits.device
        idx = torch.tensor(deep, device=device)
        acc = self.deep_acc[idx] + logits[idx, col]
        self.deep_acc[idx] = acc
        passes = [self.rows[b].deep_depth + 1 for b in deep]
        go_on = [False] * len(deep)
        if any(n < self.max_iter for n in passes):
            decided = self._decide(acc, step, idx, col, [n - 1 for n in passes]).tolist()
            go_on = [bool(g) and n < self.max_iter for g, n in zip(decided, passes, strict=True)]
        argmax = greedy_tokens(acc).tolist()
        tokens, kept = [], []
        for i, b in enumerate(deep):
            row = self.rows[b]
            sampler, drafts = row.request.sampler, row.drafts
            _record(row, row.deep_pos, acc[i])
            if sampler.greedy:
                token = argmax[i]
                tokens.append(token)
                kept.append(0 if drafts and drafts[0].token == token else -1)
            elif not drafts:
                tokens.append(int(sampler.pick(acc[i:i + 1])[0]))
                kept.append(-1)
            else:
                draft = torch.tensor([drafts[0].token], device=device)
                accepted, token = sampler.accept(acc[i:i + 1], draft, self.draft_q[b:b + 1])
                tokens.append(int(token))
                kept.append(0 if bool(accepted) else -1)
        return torch.tensor([[int(g) for g in go_on], tokens, kept])

    def _after_shallow(self, row, b, hard, picks, feed, staged=False) -> None:
        self.max_new = row.request.max_new_tokens  # the base reads it to skip drafting past the last token
        super()._after_shallow(row, b, hard, picks, feed, staged)

    def _emit(self, row: Row, token: int, passes: int) -> None:
        row.tokens.append(token)
        row.passes.append(passes)
        _log_emitted(row)
        request = row.request
        if token in request.eos_ids or len(row.tokens) >= request.max_new_tokens or \
                (request.stop is not None and request.stop(row.tokens)):
            row.done = True


class _RowSamplers:
    """Decoder's `sampler` for a batch of requests: `pick` draws each row's token with the row's own
    sampler (rows: set by the caller to the rows of the logits, in order)."""

    greedy = False  # mixed rows: the decoder keeps sampling buffers; per-row checks are the hooks'

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = greedy_tokens(logits)
        sampled = [i for i, row in enumerate(self.rows) if not row.request.sampler.greedy]
        probs = None
        if sampled:
            probs = torch.zeros(logits.shape, device=logits.device)
            drawn = []
            for i in sampled:
                token, probs[i:i + 1] = self.rows[i].request.sampler.pick(logits[i:i + 1])
                drawn.append(token)
            tokens = tokens.index_put((torch.tensor(sampled, device=logits.device),), torch.cat(drawn))
        for i, row in enumerate(self.rows):
            _record(row, row.next_pos, logits[i])
        return tokens, probs


class _Recorder:
    """A one-row prefill's sampler: the request's own, keeping the logits it picks from (logprobs)."""

    def __init__(self, request: Request, position: int) -> None:
        self.sampler, self.greedy, self.position = request.sampler, request.sampler.greedy, position
        self.wanted = request.logprobs is not None
        self.scores: dict[int, torch.Tensor] = {}

    def pick(self, logits: torch.Tensor):
        if self.wanted:
            self.scores[self.position] = torch.log_softmax(logits[0].float(), -1)
        return self.sampler.pick(logits)


def _record(row: Row, position: int, logits: torch.Tensor) -> None:
    """Keep the (V,) logits picked from at `position`, as log-probabilities, if the row wants them."""
    if row.request.logprobs is not None:
        row.scores[position] = torch.log_softmax(logits.float(), -1)


def _log_emitted(row: Row) -> None:
    """Add the last emitted token's log probability (and the top k) to row.logprobs, if wanted."""
    k = row.request.logprobs
    if k is None:
        return
    position = len(row.request.prompt) - 2 + len(row.tokens)  # the query that predicted the token
    scores = row.scores.pop(position)
    for stale in [p for p in row.scores if p < position]:
        del row.scores[stale]
    top = torch.topk(scores, min(k, scores.shape[-1])) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    row.logprobs.append((float(scores[row.tokens[-1]]), pairs))
