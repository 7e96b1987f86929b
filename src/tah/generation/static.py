"""Decoding with static shapes: a fixed-capacity cache, every decision on the device, CUDA graphs.

On a GPU a decode step at small batch is bound by launching kernels, not by the GPU (issue 26:
~46,000 launches for 32 steps of a 28-layer model). Here a step is one of two fixed-shape
forwards, each captured once in a CUDA graph and then replayed:

- *plain*: one depth-0 query per row, while no row has a pending hard token;
- *fused*: per row, the pending hard token's depth-1 pass (padding where none is pending) and
  depth 0 of the row's next token. For a pending row that token is a *draft*: the top token of the
  hard token's depth-0 logits. The draft never sees the depth-1 entry (duo-causal rule), so its
  pass is exactly the unfused one; when the hard token's final logits pick another token, the
  draft's entry is dropped and the right token runs next.

Everything a step decides (hard or not, the draft kept or dropped, the next token, the next
position) is computed on the device into fixed tensors; the host reads one small tensor per step,
the tokens emitted, to stop rows (EOS, max_new_tokens, stop strings) and to choose the next step's
kind. Greedy tokens and pass counts equal the plain one-forward-per-token loop (tests hold them
against it).

Sampling: a pending row's draft is drawn from the hard token's depth-0 distribution q, and kept by
speculative acceptance against its final distribution p (min(1, p/q), else a draw from
max(0, p - q)): tokens distributed exactly as the unfused loop's (tests: chi-square against the
exact distribution). A step's randomness (Exp(1) noise for its draws, a uniform for acceptance)
is drawn from the call's generator into fixed buffers just before the step runs, outside its
graph: the step itself is a fixed function of its buffers, which a CUDA graph can replay, and a
seeded call draws the same tokens with or without graphs.

Scope: max_iter <= 2 and one draft; `tah.generate(engine="auto")` takes the eager engine
(`engine.py`) otherwise. On CPU the same steps run without graphs (what tests check).

After `TaHForCausalLM.compile_decode_steps()`, each step function goes through `torch.compile`
(fullgraph; inductor unless told otherwise) before its capture, so that a graph replays fused
kernels (norms, rotary, the elementwise work), as HF's compiled static-cache `generate` does.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections import OrderedDict

import torch

from tah.generation.engine import DecodeStats, output, stream
from tah.generation.reference import GenerationOutput
from tah.generation.sampling import RowSampling, Sampler, accept_drawn, draw, greedy_tokens
from tah.model.cache import TaHCache
from tah.model.decider import ConstantDecider, RandomDecider
from tah.model.static_cache import StaticTaHCache
from tah.model.step import Queries

SLOT_ROUNDING = 256  # capacities are rounded up to a multiple of this, so runners are reused across calls
KEPT_RUNNERS = 4  # batch sizes whose static runner (buffers + graphs) a model keeps, least recently used dropped
NONE = -1  # "no token" in the emitted tensor
TOP_LOGPROBS = 20  # the most likely tokens a step's log-probabilities list (OpenAI's top_logprobs allows 20)
# a runner's per-row buffers besides its cache and sampling settings ((B, ...) each; see leading_rows, move_row)
ROW_BUFFERS = ("token", "position", "active", "pending", "hard_acc", "hard_pos", "out", "fused_depth", "hard_q",
               "noise", "resample_noise", "uniform", "logprob", "top_ids", "top_logprobs")


def supports(model, fused: bool) -> str | None:
    """None if the static engine can decode with these settings, else why not."""
    if model.tah_config.max_iter > 2:
        return "max_iter > 2 runs on the eager engine"
    if not fused and _decides(model):
        return "fused=False runs on the eager engine"
    return None


def _decides(model) -> bool:
    decider = model.decider
    return model.tah_config.max_iter > 1 and not (isinstance(decider, ConstantDecider) and not decider.value)


class StaticRunner:
    """The fixed buffers of one (model, batch, capacity) and the step functions over them; the CUDA
    graphs that replay those functions when `graphs` is set. Each row's sampling settings are
    buffers too (`sampling`), so rows may differ (a server's) and no settings are baked into a
    graph; a step's kind says whether any row samples and whether log-probabilities are wanted."""

    def __init__(self, model, batch: int, capacity: int, dtype: torch.dtype, device: torch.device,
                 graphs: bool) -> None:
        text = model.lm.config.get_text_config()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        self.model, self.graphs = model, graphs
        self.embed = model.embed
        self.decides = _decides(model)
        self.need_hidden = self.decides and bool(model.decider.needs_hidden)
        self.cache = StaticTaHCache(text.num_hidden_layers, batch, text.num_key_value_heads, head_dim, capacity,
                                    dtype, device)
        vocab = self.embed.weight.shape[0]
        long = dict(dtype=torch.long, device=device)
        self.token = torch.zeros(batch, **long)  # the token to run at depth 0 next (a draft if pending)
        self.position = torch.zeros(batch, **long)  # its position
        self.active = torch.zeros(batch, dtype=torch.bool, device=device)  # rows still decoding
        self.pending = torch.zeros(batch, dtype=torch.bool, device=device)  # a hard token awaits depth 1
        self.hard_acc = torch.zeros(batch, vocab, dtype=dtype, device=device)  # its depth-0 logits
        self.hard_pos = torch.zeros(batch, **long)
        # what a step emits, per row: [token from a hard token's final logits, token from depth 0]
        # (NONE where none), then whether the row has a pending hard token after the step
        self.out = torch.full((batch, 3), NONE, **long)
        self.fused_depth = torch.tensor([[1, 0]], **long).expand(batch, 2)
        self.sampling = RowSampling(batch, device)
        floats = dict(dtype=torch.float32, device=device)
        self.hard_q = torch.zeros(batch, vocab, **floats)  # the pending hard token's depth-0 distribution
        self.noise = torch.ones(batch, vocab, **floats)  # Exp(1): a step's depth-0 draws
        self.resample_noise = torch.ones(batch, vocab, **floats)  # Exp(1): a rejected draft's redraw
        self.uniform = torch.zeros(batch, **floats)  # a draft's acceptance
        # with log-probabilities, per row and emitted token ([from a hard token's final logits, from
        # depth 0], as in `out`): its log-probability and the TOP_LOGPROBS most likely tokens'
        top = min(TOP_LOGPROBS, vocab)
        self.logprob = torch.zeros(batch, 2, **floats)
        self.top_ids = torch.zeros(batch, 2, top, **long)
        self.top_logprobs = torch.zeros(batch, 2, top, **floats)
        self._variant = (False, False)  # (sampled, logprobs) of the step being traced or run
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        # One memory pool for the intermediates of every graph of this runner and of its views
        # (leading_rows shares this dict): graphs replay one at a time and keep nothing in the pool
        # past a replay (their results are copied into the buffers), so each need not hold its own.
        self._pool: dict[str, object] = {}
        self.settings = _settings_key(model)
        self._step = self._step_function()

    def _step_function(self):
        """The step function: `_run`, compiled after `compile_decode_steps` (once per runner and step
        kind, and again after `grow`; a graph captures the compiled code)."""
        options = compile_options(self.model)
        return self._run if options is None else torch.compile(self._run, fullgraph=True, **options)

    def leading_rows(self, rows: int) -> StaticRunner:
        """A runner over the first `rows` rows of this one: views of its buffers and cache (what
        either writes, the other sees), with graphs of its own. A server's running batch, kept in
        the leading rows, steps on the smallest such bucket that holds it."""
        view = copy.copy(self)
        for name in ROW_BUFFERS:
            setattr(view, name, getattr(self, name)[:rows])
        view.sampling = self.sampling.leading_rows(rows)
        view.cache = self.cache.leading_rows(rows)
        view._graphs = {}
        view._step = view._step_function()
        return view

    def move_row(self, source: int, target: int) -> None:
        """Row `target` takes row `source`'s state, cache entries and sampling settings (a server
        filling the place of a row that left, to keep its rows leading); `source` is left as it was."""
        for name in ROW_BUFFERS:
            buffer = getattr(self, name)
            buffer[target] = buffer[source]
        self.sampling.move_row(source, target)
        self.cache.move_row(source, target)

    # -- host side -----------------------------------------------------------------------------
    def load(self, cache: TaHCache, first: torch.Tensor, positions: torch.Tensor, active: torch.Tensor,
             sampler: Sampler | None = None) -> None:
        """Start from a prefill: its cache entries, each row's first token (B,), that token's
        position (B,), the rows that go on (B,) bool, and every row's sampling settings (None: greedy)."""
        self.cache.take_entries(cache, int(cache.fill.max()))
        self.token.copy_(first)
        self.position.copy_(positions)
        self.active.copy_(active)
        self.pending.zero_()
        self.sampling.set_row(slice(None), sampler or Sampler())

    def join_row(self, row: int, cache: TaHCache, first: int, position: int, sampler: Sampler) -> None:
        """Row `row` starts from a one-row prefill (a request joining a server's batch): its cache
        entries, its first token and that token's position, its sampling settings. The other rows
        are left as they are; the row's own state left by an earlier request is overwritten."""
        self.cache.take_row(row, cache)
        self.token[row], self.position[row] = first, position
        self.active[row], self.pending[row] = True, False
        self.sampling.set_row(row, sampler)

    def draw_noise(self, generator: torch.Generator | None, fused: bool, row: int | None = None) -> None:
        """A step's randomness from `generator` (None: torch's default) into its buffers, before the
        step and outside any graph (see the module's docstring): Exp(1) noise for the depth-0 draws,
        and for a fused step a uniform and Exp(1) noise for the drafts' acceptance. Of every row, or
        of row `row` only (a server's request, drawing from its own generator what its solo run draws)."""
        where = slice(None) if row is None else slice(row, row + 1)
        self.noise[where].exponential_(generator=generator)
        if fused:
            self.uniform[where].uniform_(generator=generator)
            self.resample_noise[where].exponential_(generator=generator)

    def step(self, fused: bool, sampled: bool = False, logprobs: bool = False) -> None:
        """One step (replayed from its graph once captured); results in `self.out` (and with
        `logprobs`, in `logprob`, `top_ids`, `top_logprobs`). `sampled`: some row samples (its noise
        drawn by `draw_noise` first); else every row takes the argmax."""
        kind = ("fused" if fused else "plain", sampled, logprobs)
        if not self.graphs:
            self._step(*kind)
            return
        graph = self._graphs.get(kind)
        if graph is None:
            try:
                graph = self._graphs[kind] = self._capture(kind)
            except RuntimeError as error:  # an op that cannot be captured: go on without graphs, and say so
                warnings.warn(f"tah: CUDA graph capture of the {kind[0]} decode step failed ({error}); "
                              "decoding goes on without CUDA graphs (slower)", stacklevel=2)
                self.graphs = False
                self._step(*kind)
                return
        graph.replay()

    def _run(self, kind: str, sampled: bool = False, logprobs: bool = False) -> None:
        state = self.model.depth_state
        state.device_only = True  # the LoRA linears read no tags on the host
        state.column_hint = (0, 1)  # a fused step's deep queries: column 0, depth 1 (max_iter 2)
        self._variant = (sampled, logprobs)  # (constants where compiled: one graph per variant)
        try:
            self._fused() if kind == "fused" else self._plain()
        finally:
            state.device_only, state.column_hint = False, None

    def grow(self, capacity: int) -> None:
        """More slots a row; the graphs are captured anew over the new buffers."""
        self.cache = self.cache.grown(capacity)
        self._graphs = {}

    def _capture(self, kind: tuple) -> torch.cuda.CUDAGraph:
        """Warm the step up on a side stream, then capture it. The warm-up really runs, so the state it
        changes (tags, fills, the rows' state; keys and values are written at free slots only) is
        put back afterwards."""
        saved = self._state()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(*kind)  # (a compiled step compiles here, before the capture)
            torch.cuda.current_stream().wait_stream(side)
            self._restore(saved)
            graph = torch.cuda.CUDAGraph()
            if "handle" not in self._pool:
                self._pool["handle"] = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool["handle"]):
                self._step(*kind)
        finally:
            self._restore(saved)  # capture itself runs nothing, but a failed warm-up may have
        return graph

    def _state(self) -> list[torch.Tensor]:
        return [t.clone() for t in self._state_tensors()]

    def _restore(self, saved: list[torch.Tensor]) -> None:
        for t, kept in zip(self._state_tensors(), saved, strict=True):
            t.copy_(kept)

    def _state_tensors(self) -> list[torch.Tensor]:
        c = self.cache
        return [c.pos, c.depth, c.valid, c.fill, self.token, self.position, self.active, self.pending,
                self.hard_acc, self.hard_pos, self.out, self.hard_q]

    # -- device side: the two steps ------------------------------------------------------------
    def _plain(self) -> None:
        """Depth 0 of every active row's next token."""
        positions = self.position[:, None]
        queries = Queries(self.embed(self.token)[:, None], positions, 0, self.active[:, None])
        logits, hidden = self.model.run_pass(queries, self.cache, self.need_hidden)
        self.out[:, 0].fill_(NONE)
        self._after_depth0(logits[:, 0], hidden, 0, self.active)

    def _fused(self) -> None:
        """Depth 1 of each pending hard token beside depth 0 of the row's next token (its draft)."""
        deep = self.pending & self.active
        inputs = torch.stack([self.model.soft_input(self.hard_acc), self.embed(self.token)], 1)
        positions = torch.stack([self.hard_pos, self.position], 1)
        real = torch.stack([deep, self.active], 1)
        queries = Queries(inputs, positions, self.fused_depth, real)
        logits, hidden = self.model.run_pass(queries, self.cache, self.need_hidden)
        final = self.hard_acc + logits[:, 0]
        final_token, accepted = self._deep_pick(final)
        if self._variant[1]:
            self._log_probs(0, final, final_token)
        rejected = deep & ~accepted  # the draft was not the hard token's final pick
        self.cache.drop_last(rejected)
        self.out[:, 0].copy_(torch.where(deep, final_token, NONE))
        # a rejected draft's place goes to the right token, at the same position, next step
        self.token.copy_(torch.where(rejected, final_token, self.token))
        self._after_depth0(logits[:, 1], hidden, 1, self.active & ~rejected)

    def _after_depth0(self, logits: torch.Tensor, hidden: tuple | None, column: int, ran: torch.Tensor) -> None:
        """The transitions after depth 0 of each row's token where `ran` (B,) bool: an easy token's
        pick is emitted; a hard token becomes pending and its top token is the next step's draft.
        Either way the pick runs next, one position on. Rows where `ran` is False keep their state
        (a rejected draft's row keeps the token just set)."""
        pick, probs = self._pick(logits)
        if self._variant[1]:
            self._log_probs(1, logits, pick)
        hard = self._hard(logits, hidden, column) & ran if self.decides else torch.zeros_like(ran)
        self.out[:, 1].copy_(torch.where(ran & ~hard, pick, NONE))
        self.hard_acc.copy_(torch.where(hard[:, None], logits, self.hard_acc))
        if probs is not None:  # the draft's distribution q, for its acceptance
            self.hard_q.copy_(torch.where(hard[:, None], probs, self.hard_q))
        self.hard_pos.copy_(torch.where(hard, self.position, self.hard_pos))
        self.pending.copy_(hard)
        self.token.copy_(torch.where(ran, pick, self.token))
        self.position.add_(ran.long())
        self.out[:, 2].copy_(hard.long())

    def _pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, V) depth-0 logits -> (B,) tokens (the argmax, or for sampling rows drawn with the step's
        noise) and the distributions drawn from (None when no row samples)."""
        argmax = greedy_tokens(logits)
        if not self._variant[0]:
            return argmax, None
        probs = self.sampling.probs(logits)
        return torch.where(self.sampling.greedy, argmax, draw(probs, self.noise)), probs

    def _deep_pick(self, final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) a pending hard token's final logits -> ((B,) its token, (B,) bool whether the draft
        (`self.token`) is that token): the argmax, or for sampling rows speculative acceptance of the draft."""
        argmax = greedy_tokens(final)
        if not self._variant[0]:
            return argmax, argmax == self.token
        accepted, token = accept_drawn(self.sampling.probs(final), self.token, self.hard_q, self.uniform,
                                       self.resample_noise)
        greedy = self.sampling.greedy
        return torch.where(greedy, argmax, token), torch.where(greedy, argmax == self.token, accepted)

    def _log_probs(self, column: int, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """Log-probabilities under (B, V) `logits` (unscaled, as the eager engine reports them) of
        (B,) `tokens` and of the most likely tokens, into column `column` of the logprob buffers."""
        scores = torch.log_softmax(logits.float(), -1)
        self.logprob[:, column] = scores.gather(-1, tokens[:, None])[:, 0]
        top = scores.topk(self.top_ids.shape[-1], dim=-1)
        self.top_ids[:, column] = top.indices
        self.top_logprobs[:, column] = top.values

    def _hard(self, logits: torch.Tensor, hidden: tuple | None, column: int) -> torch.Tensor:
        """(B,) bool: does the decider send each row's depth-0 token (at `column`) to depth 1?"""
        decider = self.model.decider
        positions = self.position[:, None]
        if isinstance(decider, RandomDecider):  # its hash, not its lookup table (which reads sizes on the host)
            return decider.draw(positions, torch.zeros_like(positions))[:, 0]  # (a tensor depth: no host copy)
        states = None if hidden is None else tuple(h if h is None else h[:, column:column + 1] for h in hidden)
        return self.model.decide(logits[:, None], states, positions, 0)[:, 0]


def _settings_key(model) -> tuple:
    """What a captured graph bakes in besides its buffers: the decider and its threshold, max_iter,
    and whether (and how) its steps are compiled. (Sampling settings are buffers.)"""
    config = model.tah_config
    return (id(model.decider), config.threshold, config.max_iter, config.input_topk, repr(compile_options(model)))


def compile_options(model) -> dict | None:
    """torch.compile's options for the steps (`TaHForCausalLM.compile_decode_steps`), None: eager steps."""
    return model.__dict__.get("_decode_compile")


def rounded_capacity(slots: int) -> int:
    """Live slots of a static cache holding at least `slots`: with its trash slot, a multiple of SLOT_ROUNDING."""
    return -(-(slots + 1) // SLOT_ROUNDING) * SLOT_ROUNDING - 1


def runner_for(model, batch: int, capacity: int, dtype: torch.dtype, device: torch.device,
               graphs: bool) -> StaticRunner:
    """The kept runner of this batch size if its settings match and its cache holds `capacity`
    slots a row, else a new one in its place. One runner per batch size (KEPT_RUNNERS sizes, the
    least recently used dropped): a runner's KV buffers are batch x capacity slots of every layer
    (about 20 GB for a 0.6B Qwen3 at batch 32 and 5,000 slots), so `tah eval bench`'s batches, each
    asking for its own prompt length plus max_new_tokens, share the largest one instead of each
    keeping its own; a larger capacity costs a step a longer masked attention, not a new capture.
    The runner replaced is dropped before its successor allocates."""
    capacity = rounded_capacity(capacity)
    runners: OrderedDict = model.__dict__.setdefault("_static_runners", OrderedDict())
    key = (batch, dtype, str(device), graphs)
    runner = runners.get(key)
    if runner is None or runner.settings != _settings_key(model) or runner.cache.capacity < capacity:
        if runner is not None:
            capacity = max(capacity, runner.cache.capacity)  # the calls it served fit the new one too
            del runners[key], runner  # its buffers and graphs freed before the new ones are made
        runner = StaticRunner(model, batch, capacity, dtype, device, graphs)
    runners[key] = runner
    runners.move_to_end(key)
    while len(runners) > KEPT_RUNNERS:
        runners.popitem(last=False)
    return runner


class StaticDecoder:
    """One `generate` call on the static engine: prefill, then steps until every row is done."""

    def __init__(self, model, sampler: Sampler | None = None, *, max_new_tokens: int, eos_ids: set[int], stop=None,
                 streamer=None, graphs: bool | None = None) -> None:
        self.model, self.max_new, self.eos_ids, self.stop, self.streamer = model, max_new_tokens, eos_ids, stop, streamer
        self.sampler = sampler or Sampler()
        self.graphs = graphs
        self.stats = DecodeStats()

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> GenerationOutput:
        started = time.perf_counter()
        device = input_ids.device
        graphs = device.type == "cuda" if self.graphs is None else self.graphs
        batch, length = input_ids.shape
        prefill = TaHCache(capacity=length)
        out = self.model(input_ids, attention_mask=attention_mask, past_key_values=prefill, use_cache=True,
                         logits_to_keep=1)
        first, _ = self.sampler.pick(out.logits[:, -1])
        # Worst case a row holds every prompt entry, then 1 slot per new token plus the deep ones; start
        # with room for a quarter of the new tokens going deep, growing if a row gets near the end.
        used = int(prefill.fill.max())
        runner = runner_for(self.model, batch, used + self.max_new + self.max_new // 4 + 2, out.logits.dtype, device, graphs)
        first_list, passes = first.tolist(), out.iter_count[:, -1].tolist()
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.passes: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch
        for b in range(batch):
            self._emit(b, first_list[b], passes[b])
        active = torch.tensor([not d for d in self.done], device=device)
        runner.load(prefill, first, prefill.seen, active, self.sampler)
        sampled = not self.sampler.greedy
        self.stats.prefill_seconds = time.perf_counter() - started
        pending, bound = False, used  # a bound on every row's fill, known without reading it
        while not all(self.done):
            if bound + 2 > runner.cache.capacity:  # rare: read the fills, grow if a row is really near the end
                bound = int(runner.cache.fill.max())
                if bound + 2 > runner.cache.capacity:
                    runner.grow(rounded_capacity(2 * runner.cache.capacity))
            step_started = time.perf_counter()
            if sampled:
                runner.draw_noise(self.sampler.generator, pending)
            runner.step(fused=pending, sampled=sampled)
            bound += 2 if pending else 1
            emitted = runner.out.tolist()  # the step's one host sync
            self.stats.record_step(pending, time.perf_counter() - step_started)
            pending = self._take(emitted, runner)
        self.stats.seconds = time.perf_counter() - started
        self.stats.kv_entries = int(runner.cache.entries().sum())
        self.stats.kv_bytes = runner.cache.nbytes()
        if self.streamer is not None:
            self.streamer.end()
        return output(input_ids, self.tokens, self.passes, self.eos_ids, self.stats)

    def _take(self, emitted: list[list[int]], runner: StaticRunner) -> bool:
        """Record a step's tokens; stop rows that are done. Returns whether a live row has a pending hard token."""
        stopped, pending = [], False
        for b, (deep_token, shallow_token, hard) in enumerate(emitted):
            if self.done[b]:
                continue
            if deep_token != NONE:
                self.stats.drafts += 1
                self.stats.drafts_accepted += shallow_token != NONE or bool(hard)  # the draft's own pass counted
                self._emit(b, deep_token, 2)
            if shallow_token != NONE and not self.done[b]:
                self._emit(b, shallow_token, 1)
            if self.done[b]:
                stopped.append(b)
            pending = pending or bool(hard) and not self.done[b]
        if stopped:
            runner.active[stopped] = False  # a few rows, once each
        return pending

    def _emit(self, b: int, token: int, passes: int) -> None:
        self.tokens[b].append(token)
        self.passes[b].append(passes)
        stream(self.streamer, token, passes)
        if token in self.eos_ids or len(self.tokens[b]) >= self.max_new or \
                (self.stop is not None and self.stop(self.tokens[b])):
            self.done[b] = True
