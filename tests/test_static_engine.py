"""The static-shape engine (the GPU's, run here without CUDA graphs): the same tokens and pass counts
as the plain loop, every decision on the device, one host sync per step, a cache that grows."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import left_padded, randomize_lora, tiny_tah
from tah import InputError
from tah.generation import Sampler, generate, generate_reference
from tah.generation import static as static_engine
from tah.generation.generate import _use_static
from tah.generation.sampling import RowSampling
from tah.kernels.host_reads import HostReads


def strong_model(decider: str = "random", rate: float = 0.4, **config):
    """LoRA strong enough that depth 1 often changes the argmax, so drafts get rejected too."""
    model = tiny_tah(decider=decider, random_rate=rate, max_iter=2, **config)
    randomize_lora(model, std=2.0, seed=3)
    return model


@pytest.mark.parametrize("decider", ["random", "mlp", "always", "never"])
def test_static_engine_equals_the_reference_loop(decider):
    model = strong_model(decider)
    model.set_threshold(0.4)
    ids, mask = left_padded([5, 9, 3, 7], seed=1)
    reference = generate_reference(model, ids, mask, max_new_tokens=24, eos_token_id=7)
    out = generate(model, ids, mask, max_new_tokens=24, eos_token_id=7, engine="static")
    assert torch.equal(out.sequences, reference.sequences)
    assert torch.equal(out.iter_counts, reference.iter_counts)
    if decider in ("random", "mlp"):
        assert (reference.iter_counts == 2).any() and (reference.iter_counts == 1).any()
    if decider == "random":  # drafts ran, some were kept and some rolled back
        assert 0 < out.stats.drafts_accepted < out.stats.drafts
        assert out.stats.deep_steps > 0 and out.stats.shallow_steps > 0
    if decider == "never":
        assert out.stats.deep_steps == 0


def test_static_engine_matches_the_eager_engine_one_prompt_at_a_time():
    model = strong_model()
    for seed in range(3):
        ids, _ = left_padded([6 + seed], seed=seed)
        eager = generate(model, ids, max_new_tokens=20, engine="eager")
        static = generate(model, ids, max_new_tokens=20, engine="static")
        assert torch.equal(static.sequences, eager.sequences)
        assert torch.equal(static.iter_counts, eager.iter_counts)


def test_kv_entries_are_one_per_token_and_depth_reached():
    model = strong_model()
    ids, mask = left_padded([4, 6], seed=5)
    out = generate(model, ids, mask, max_new_tokens=30, engine="static")
    prefill = model(ids, attention_mask=mask)
    # every token but the last generated one holds its entries; the last one too where it ran as a kept draft
    fed = int(prefill.iter_count[mask.bool()].sum()) + int(out.iter_counts[:, :-1].sum())
    assert fed <= out.stats.kv_entries <= fed + ids.shape[0]


def test_the_cache_grows_when_rows_fill_it(monkeypatch):
    model = strong_model(rate=0.9)
    monkeypatch.setattr(static_engine, "SLOT_ROUNDING", 8)
    ids, mask = left_padded([5, 3], seed=2)
    reference = generate_reference(model, ids, mask, max_new_tokens=40)
    out = generate(model, ids, mask, max_new_tokens=40, engine="static")
    assert torch.equal(out.sequences, reference.sequences)
    assert torch.equal(out.iter_counts, reference.iter_counts)


def test_runners_are_reused_across_calls_and_rebuilt_when_settings_change():
    model = strong_model(decider="mlp")
    ids, _ = left_padded([5], seed=0)
    generate(model, ids, max_new_tokens=8, engine="static")
    first = next(iter(model._static_runners.values()))
    generate(model, ids, max_new_tokens=8, engine="static")
    assert next(iter(model._static_runners.values())) is first
    model.set_threshold(0.2)  # a captured graph bakes the threshold in
    lowered = generate(model, ids, max_new_tokens=8, engine="static")
    assert next(iter(model._static_runners.values())) is not first
    assert torch.equal(lowered.iter_counts, generate_reference(model, ids, max_new_tokens=8).iter_counts)


def test_a_decode_step_reads_the_device_once():
    """Plain and fused steps alike: the emitted tokens are the step's only host read."""
    model = strong_model(rate=0.5)
    ids, mask = left_padded([5, 7], seed=4)
    runner = static_engine.runner_for(model, 2, 64, torch.float32, torch.device("cpu"), graphs=False)
    prefill = static_engine.TaHCache(capacity=ids.shape[1])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=prefill, use_cache=True, logits_to_keep=1)
        runner.load(prefill, out.logits[:, -1].argmax(-1), prefill.seen, torch.ones(2, dtype=torch.bool))
        with HostReads() as counter:
            for fused in (False, True, False, True):
                runner.step(fused)
    assert counter.count == 0, counter.where  # the step itself reads nothing; the decoder reads runner.out once


@pytest.mark.parametrize("kwargs, words", [
    (dict(engine="paged"), "engine must be one of"),
    (dict(engine="static", draft_candidates=2), "draft candidates"),
])
def test_settings_the_static_engine_cannot_take_are_refused(kwargs, words):
    model = strong_model()
    ids, _ = left_padded([4])
    with pytest.raises(InputError, match=words):
        generate(model, ids, max_new_tokens=4, **kwargs)


def test_auto_takes_the_eager_engine_on_cpu_and_for_max_iter_3():
    model = strong_model()
    ids, _ = left_padded([4])
    assert not _use_static(model, "auto", True, None, torch.device("cpu"))
    assert _use_static(model, "auto", True, None, torch.device("cuda"))
    deeper = tiny_tah(decider="random", random_rate=0.3, max_iter=3)
    assert not _use_static(deeper, "auto", True, None, torch.device("cuda"))


def _loaded_runner(model, ids, mask, sampler=None):
    runner = static_engine.StaticRunner(model, ids.shape[0], 255, torch.float32, torch.device("cpu"), graphs=False)
    prefill = static_engine.TaHCache(capacity=ids.shape[1])
    out = model(ids, attention_mask=mask, past_key_values=prefill, use_cache=True, logits_to_keep=1)
    runner.load(prefill, out.logits[:, -1].argmax(-1), prefill.seen, torch.ones(ids.shape[0], dtype=torch.bool),
                sampler)
    return runner


def test_one_runner_per_batch_size_serves_every_prompt_length(monkeypatch):
    """Calls whose prompts ask for other capacities share their batch size's runner while it is large
    enough, and replace it (not add one) when not, or when the settings change: a runner's KV buffers
    span every layer, so kept copies would add up (tah eval bench on a GPU)."""
    monkeypatch.setattr(static_engine, "SLOT_ROUNDING", 8)
    model = strong_model()
    used = []
    for lengths in ([5, 9], [3, 4], [12, 30], [6, 7]):  # the capacity asked goes up, down, up, down
        ids, mask = left_padded(lengths, seed=len(used))
        out = generate(model, ids, mask, max_new_tokens=12, engine="static")
        reference = generate_reference(model, ids, mask, max_new_tokens=12)
        assert torch.equal(out.sequences, reference.sequences) and torch.equal(out.iter_counts, reference.iter_counts)
        used.append(next(reversed(model._static_runners.values())))
    assert used[1] is used[0] and used[2] is not used[1] and used[3] is used[2]
    assert len(model._static_runners) == 1
    generate(model, *left_padded([4]), max_new_tokens=4, engine="static")  # another batch size: a runner of its own
    model.set_threshold(0.3)  # other settings: batch 2's runner replaced
    generate(model, *left_padded([5, 9]), max_new_tokens=4, engine="static")
    assert len(model._static_runners) == 2 and used[2] not in model._static_runners.values()
    assert next(reversed(model._static_runners.values())).cache.capacity >= used[2].cache.capacity


class GraphCounter:
    """A torch.compile backend that runs each graph as traced and keeps it, to count them."""

    def __init__(self) -> None:
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward


@torch.no_grad()
@pytest.mark.parametrize("sampling", [False, True])
def test_steps_compile_as_whole_graphs_without_recompiling(sampling):
    """What CUDA graphs need, checked where torch.compile can see it: each step is one graph
    (fullgraph: no host read, no data-dependent Python), compiled once over 64 steps of either
    kind, and it computes what the uncompiled step does. With sampling, a step reads its randomness
    from buffers filled before it, so both runners draw from the same noise."""
    model = strong_model(decider="mlp")
    model.set_threshold(0.4)
    ids, mask = left_padded([5, 7], seed=4)
    sampler = Sampler(True, temperature=0.8, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(0)) \
        if sampling else None
    compiled, plain = _loaded_runner(model, ids, mask, sampler), _loaded_runner(model, ids, mask, sampler)
    counter, deep_tokens, rejected = GraphCounter(), 0, 0
    torch._dynamo.reset()
    try:
        step = torch.compile(compiled._run, fullgraph=True, backend=counter)
        for i in range(64):
            kind = "fused" if i % 3 == 0 else "plain"
            if sampling:
                plain.draw_noise(sampler.generator, kind == "fused")
                for name in ("noise", "resample_noise", "uniform"):
                    getattr(compiled, name).copy_(getattr(plain, name))
            step(kind, sampling)
            plain._run(kind, sampling)
            assert torch.equal(compiled.out, plain.out), f"step {i}"
            deep_tokens += int((plain.out[:, 0] != static_engine.NONE).sum())
            rejected += int(((plain.out[:, 0] != static_engine.NONE) & (plain.out[:, 1] == static_engine.NONE)).sum())
    finally:
        torch._dynamo.reset()
    assert len(counter.graphs) == 2
    assert deep_tokens > 0  # fused steps finished hard tokens
    if sampling:
        assert rejected > 0  # some drafts were redrawn


@torch.no_grad()
def test_compiled_sampling_steps_compile_once_for_every_call():
    """Each call brings its own generator; the compiled steps must not see a new object per call (a
    recompile, minutes on a real model), so the same two graphs serve seeded calls after the first."""
    model = strong_model()
    ids, mask = left_padded([5, 9], seed=2)
    counter = GraphCounter()
    model.compile_decode_steps(backend=counter)
    torch._dynamo.reset()
    try:
        outs = [generate(model, ids, mask, max_new_tokens=16, engine="static", do_sample=True, temperature=0.9,
                         seed=seed) for seed in (1, 2, 1)]
    finally:
        torch._dynamo.reset()
        model.compile_decode_steps(enabled=False)
    assert len(counter.graphs) == 2
    assert torch.equal(outs[0].sequences, outs[2].sequences) and not torch.equal(outs[0].sequences, outs[1].sequences)


def test_seeded_sampling_repeats_and_top_k_1_is_greedy():
    """A seed fixes the static engine's draws; top_k=1 leaves one token to draw, so acceptance and
    redraws must give exactly the greedy tokens and pass counts."""
    model = strong_model()
    ids, mask = left_padded([5, 9, 3], seed=1)
    sampled = [generate(model, ids, mask, max_new_tokens=24, engine="static", do_sample=True, seed=seed)
               for seed in (4, 4, 5)]
    assert torch.equal(sampled[0].sequences, sampled[1].sequences)
    assert not torch.equal(sampled[0].sequences, sampled[2].sequences)
    assert sampled[0].stats.drafts > 0
    one = generate(model, ids, mask, max_new_tokens=24, engine="static", do_sample=True, top_k=1, seed=4)
    greedy = generate_reference(model, ids, mask, max_new_tokens=24)
    assert torch.equal(one.sequences, greedy.sequences) and torch.equal(one.iter_counts, greedy.iter_counts)
    assert 0 < one.stats.drafts_accepted < one.stats.drafts  # both the kept and the redrawn path ran


@pytest.mark.parametrize("sampling", [{}, dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=3)])
def test_the_decoder_reads_the_device_once_a_step(sampling):
    """Issue 26's rule for decode steps: one host sync a step (the emitted tokens), whatever the
    step's kind, greedy or sampling; prefill's reads come once per call."""
    model = strong_model(rate=0.5)
    ids, mask = left_padded([5, 7], seed=4)
    generate(model, ids, mask, max_new_tokens=4, engine="static", **sampling)  # warm: few_rows' trials read timings
    reads, forwards = [], []
    for new in (10, 30):
        with HostReads() as counter:
            out = generate(model, ids, mask, max_new_tokens=new, engine="static", **sampling)
        reads.append(counter.count)
        forwards.append(out.stats.forwards)
    assert out.stats.deep_steps > 0 and out.stats.shallow_steps > 0
    assert reads[1] - reads[0] == forwards[1] - forwards[0]


class _Recorder:
    """A streamer (HF's protocol, plus the pass counts ours takes) that records what it is given."""

    wants_passes = True

    def __init__(self) -> None:
        self.prompt, self.tokens, self.passes, self.ended = None, [], [], False

    def put(self, value: torch.Tensor, passes: int | None = None) -> None:
        if self.prompt is None:
            self.prompt = value
            return
        self.tokens += value.tolist()
        self.passes.append(passes)

    def end(self) -> None:
        self.ended = True


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_a_streamer_gets_every_token_with_its_passes_then_the_end(engine):
    model = strong_model()
    ids, _ = left_padded([6], seed=3)
    recorder = _Recorder()
    out = generate(model, ids, max_new_tokens=16, eos_token_id=7, streamer=recorder, engine=engine)
    new = out.sequences[0, ids.shape[1]:].tolist()
    assert torch.equal(recorder.prompt, ids)
    assert recorder.tokens == new[:len(recorder.tokens)] and len(recorder.tokens) == int((out.iter_counts > 0).sum())
    assert recorder.passes == out.iter_counts[0, :len(recorder.passes)].tolist()
    assert 2 in recorder.passes and recorder.ended


@torch.no_grad()
def test_compiled_steps_decode_the_tokens_of_the_plain_loop():
    """`compile_decode_steps`: both steps through inductor (fused kernels, what a GPU graph would
    capture) give the plain loop's tokens and pass counts, and a runner built before the switch
    is not reused."""
    model = strong_model(decider="mlp")
    model.set_threshold(0.4)
    ids, mask = left_padded([5, 7], seed=4)
    expected = generate_reference(model, ids, mask, max_new_tokens=24)
    generate(model, ids, mask, max_new_tokens=24, engine="static")
    eager_runner = next(iter(model._static_runners.values()))
    model.compile_decode_steps()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # (reset keeps the counts of earlier tests' compiles)
    try:
        out = generate(model, ids, mask, max_new_tokens=24, engine="static")
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs == 2  # the plain and the fused step, each compiled whole
    assert out.stats.deep_steps > 0 and out.stats.shallow_steps > 0
    assert torch.equal(out.sequences, expected.sequences)
    assert torch.equal(out.iter_counts, expected.iter_counts)
    assert next(reversed(model._static_runners.values())) is not eager_runner
    model.compile_decode_steps(enabled=False)
    assert static_engine.compile_options(model) is None


def test_row_sampling_gives_each_row_its_samplers_distribution():
    """The static engine's per-row settings (a server's rows differ): each row's distribution is the one
    its own Sampler gives, support and all, whatever the other rows ask (ties at the top included)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=generator) * 3
    logits[0, :5] = logits[0].max()
    settings = [Sampler(True, temperature=t, top_k=k, top_p=p, min_p=m)
                for t, k, p, m in itertools.product([0.6, 1.3], [0, 1, 20, 500], [1.0, 0.9, 0.3], [0.0, 0.1])]
    for first in range(0, len(settings), 6):
        rows = RowSampling(6, torch.device("cpu"))
        for b, sampler in enumerate(settings[first:first + 6]):
            rows.set_row(b, sampler)
        got = rows.probs(logits)
        for b, sampler in enumerate(settings[first:first + 6]):
            expected = sampler.probs(logits[b:b + 1])[0]
            assert torch.equal(got[b] > 0, expected > 0), sampler
            torch.testing.assert_close(got[b], expected, atol=1e-6, rtol=1e-5)
