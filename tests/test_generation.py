"""tah.generate: equal to the plain loop (greedy), exact in distribution (sampling), clear errors."""

from __future__ import annotations

import pytest
import torch

from conftest import left_padded, randomize_lora, tiny_lm, tiny_tah
from tah import InputError
from tah.generation import Sampler, generate, generate_reference
from tah.generation import static as static_engine
from tah.model import lora
from tah.model.decider import ConstantDecider
from tah.model.lora import DepthState


def strong_model(max_iter: int, decider: str = "random", rate: float = 0.5, **config):
    """LoRA strong enough that deeper passes often change the argmax, so drafts get rejected too."""
    model = tiny_tah(decider=decider, random_rate=rate, max_iter=max_iter, lora_per_depth=True, **config)
    randomize_lora(model, std=2.0, seed=3)
    return model


@pytest.mark.parametrize("max_iter", [2, 3])
@pytest.mark.parametrize("decider", ["random", "mlp"])
def test_greedy_equals_the_reference_loop_fused_and_unfused(max_iter, decider):
    model = strong_model(max_iter, decider)
    model.set_threshold(0.4)
    ids, mask = left_padded([5, 9, 3, 7], seed=1)
    reference = generate_reference(model, ids, mask, max_new_tokens=24, eos_token_id=7)
    assert (reference.iter_counts > 1).any() and (reference.iter_counts == 1).any()
    stats = {}
    for fused, candidates in ((True, 1), (True, 3), (True, 4), (False, None)):  # batch 1's default (2): below
        out = generate(model, ids, mask, max_new_tokens=24, eos_token_id=7, fused=fused,
                       draft_candidates=candidates)
        assert torch.equal(out.sequences, reference.sequences), f"fused={fused}, candidates={candidates}"
        assert torch.equal(out.iter_counts, reference.iter_counts), f"fused={fused}, candidates={candidates}"
        stats[fused, candidates] = out.stats
    assert stats[True, 1].drafts > 0 and stats[False, None].drafts == 0
    for candidates in (1, 3):
        assert stats[True, candidates].forwards < stats[False, None].forwards  # the point of fusing
    assert stats[True, 3].drafts_accepted >= stats[True, 1].drafts_accepted  # the runner-ups' point
    assert stats[True, 4].drafts_accepted >= stats[True, 3].drafts_accepted
    for b in range(ids.shape[0]):  # one prompt alone: greedy's batch-1 defaults (two candidates)
        real = mask[b].bool()
        alone = generate(model, ids[b:b + 1, real], max_new_tokens=24, eos_token_id=7)
        expected = generate_reference(model, ids[b:b + 1, real], max_new_tokens=24, eos_token_id=7)
        assert torch.equal(alone.sequences, expected.sequences), f"prompt {b} alone"
        assert torch.equal(alone.iter_counts, expected.iter_counts), f"prompt {b} alone"



@pytest.mark.parametrize("fused", [True, False])
def test_mostly_padded_steps_skip_padding_and_decode_the_same(fused, monkeypatch):
    """Decode steps whose slots are mostly padding (a batch where few rows have a deeper pass) run
    the linears on their real queries only; the tokens are those of a loop that never does."""
    model = strong_model(2, rate=0.3)
    ids, mask = left_padded([5, 9, 3, 7], seed=1)
    monkeypatch.setattr(lora, "PACK_REAL_SHARE", 0.0)  # never pack
    reference = generate_reference(model, ids, mask, max_new_tokens=24)
    monkeypatch.undo()
    packed_steps = []
    set_depth = DepthState.set

    def spy(self, *args, **kwargs):
        set_depth(self, *args, **kwargs)
        packed_steps.append(self.rows is not None)

    monkeypatch.setattr(DepthState, "set", spy)
    out = generate(model, ids, mask, max_new_tokens=24, fused=fused)
    assert sum(packed_steps) > 5
    assert torch.equal(out.sequences, reference.sequences)
    assert torch.equal(out.iter_counts, reference.iter_counts)


@pytest.mark.parametrize("max_iter", [2, 3])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("length", [6, 7], ids=["last prompt token hard", "last prompt token easy"])
def test_decode_steps_are_counted_by_kind(max_iter, fused, length):
    """DecodeStats splits the steps after prefill into depth-0-only ones and ones that ran a deeper
    pass (bench_decode.py --breakdown prices TaH's extra time from them). In one row, every deeper
    pass of a generated token takes a step of its own. With max_iter 3 the prompt's deeper passes run in
    prefill; with max_iter 2 they are deferred: the last prompt token's, if hard, takes a step as a
    generated token's would, and the other prompt tokens' run in the first step, a deep one."""
    model = strong_model(max_iter, rate=0.5)
    ids = torch.randint(3, 60, (1, length), generator=torch.Generator().manual_seed(2))
    out = generate(model, ids, max_new_tokens=30, fused=fused)
    stats = out.stats
    fed_passes = out.iter_counts[0] if max_iter == 2 else out.iter_counts[0, 1:]
    expected = int((fed_passes - 1).sum())
    prompt_hard = generate_reference(model, ids, max_new_tokens=1).prompt_iter_counts[0] > 1
    assert prompt_hard[:-1].any() and bool(prompt_hard[-1]) == (length == 6)  # what each case is for
    if max_iter == 2 and prompt_hard[:-1].any() and not prompt_hard[-1]:
        expected += 1  # the first step runs the prompt's deferred depth-1 pass beside the first token
    assert stats.deep_steps == expected > 0
    assert stats.forwards == stats.shallow_steps + stats.deep_steps
    assert 0 < stats.shallow_seconds + stats.deep_seconds <= stats.seconds - stats.prefill_seconds
    model.decider = ConstantDecider(False)
    plain = generate(model, ids, max_new_tokens=30).stats
    assert (plain.deep_steps, plain.deep_seconds, plain.shallow_steps) == (0, 0.0, 29)


@pytest.mark.parametrize("candidates", [1, 2, 3])
def test_rejected_drafts_are_rolled_back(candidates):
    model = strong_model(2, rate=0.6)
    ids, mask = left_padded([6, 4], seed=5)
    reference = generate_reference(model, ids, mask, max_new_tokens=40)
    out = generate(model, ids, mask, max_new_tokens=40, draft_candidates=candidates)
    assert out.stats.drafts > out.stats.drafts_accepted > 0  # both outcomes happened
    assert torch.equal(out.sequences, reference.sequences)
    # One KV entry per (token, depth reached); rolled-back drafts leave nothing behind. Every
    # generated token but the last was fed; its passes are those of the token it predicted.
    prompt_entries = int(reference.prompt_iter_counts[mask.bool()].sum())
    assert out.stats.kv_entries == prompt_entries + int(out.iter_counts[:, 1:].sum())


@pytest.mark.parametrize("max_iter", [2, 3])
def test_the_runner_up_draft_is_kept_exactly(max_iter):
    """draft_candidates=2: greedy drafts two candidates. Twin tokens (each odd row of the tied table is its even
    neighbour plus a trace of noise) rank nearly level at depth 0, so a deeper pass often picks the
    runner-up: that draft is kept, the first dropped, and the output is still the reference loop's,
    with exactly one KV entry per (token, depth reached)."""
    model = strong_model(max_iter, rate=0.9)
    table = model.lm.get_input_embeddings().weight
    with torch.no_grad():
        table[1::2] = table[0::2] + 1e-3 * torch.randn(table[1::2].shape, generator=torch.Generator().manual_seed(0))
    ids, mask = left_padded([5, 9, 3, 7], seed=1)
    reference = generate_reference(model, ids, mask, max_new_tokens=30)
    out = generate(model, ids, mask, max_new_tokens=30, draft_candidates=2)
    assert out.stats.runner_ups_accepted > 0
    assert torch.equal(out.sequences, reference.sequences)
    assert torch.equal(out.iter_counts, reference.iter_counts)
    prompt_entries = int(reference.prompt_iter_counts[mask.bool()].sum())
    assert out.stats.kv_entries == prompt_entries + int(out.iter_counts[:, 1:].sum())


def test_greedy_drafts_the_runner_up_by_default_for_one_prompt_only():
    """The default draft count: 2 for greedy decoding of one prompt (extra queries are cheap there),
    1 for a batch (on CPU they made steps slower than the rollbacks they saved) and for sampling."""
    model = strong_model(2, rate=0.5)
    ids, mask = left_padded([5, 7], seed=1)
    assert generate(model, ids[:1], max_new_tokens=6).stats.draft_candidates == 2
    assert generate(model, ids, mask, max_new_tokens=6).stats.draft_candidates == 1
    assert generate(model, ids[:1], max_new_tokens=6, do_sample=True, seed=0).stats.draft_candidates == 1
    assert generate(model, ids, mask, max_new_tokens=6, draft_candidates=2).stats.draft_candidates == 2


def test_eos_stops_one_row_while_others_continue():
    model = strong_model(2)
    ids, mask = left_padded([5, 8], seed=2)
    free = generate(model, ids, mask, max_new_tokens=16)
    new = free.sequences[:, ids.shape[1]:]
    eos = next(int(t) for t in new[0, 2:] if int(t) not in new[1].tolist())
    out = generate(model, ids, mask, max_new_tokens=16, eos_token_id=eos)
    stop = new[0].tolist().index(eos)
    assert out.iter_counts[0, stop] > 0 and torch.all(out.iter_counts[0, stop + 1:] == 0)
    assert torch.all(out.sequences[0, ids.shape[1] + stop + 1:] == eos)  # padded with EOS
    assert torch.all(out.iter_counts[1] > 0) and torch.equal(out.sequences[1], free.sequences[1])


def test_never_decider_equals_hf_generate_on_the_bare_model():
    bare = tiny_lm(seed=4)
    model = tiny_tah(seed=4, decider="never")
    ids, mask = left_padded([6, 9, 2], seed=3)
    hf = bare.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                       pad_token_id=0)
    out = generate(model, ids, mask, max_new_tokens=12)
    assert torch.equal(out.sequences, hf)
    assert torch.all(out.iter_counts == 1)


def test_model_generate_is_the_same_call():
    model = strong_model(2)
    ids, mask = left_padded([4, 6], seed=8)
    sequences = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(sequences, generate(model, ids, mask, max_new_tokens=10).sequences)


def test_logits_to_keep_matches_the_full_forward():
    for decider in ("random", "mlp"):
        model = strong_model(3, decider)
        model.set_threshold(0.4)
        ids, mask = left_padded([5, 9, 3], seed=1)
        with torch.no_grad():
            full, part = model(ids, attention_mask=mask), model(ids, attention_mask=mask, logits_to_keep=2)
        assert part.logits.shape[1] == 2
        assert torch.allclose(full.logits[:, -2:], part.logits, atol=1e-5)
        assert torch.equal(full.iter_count, part.iter_count)


def test_a_deferred_depth1_pass_completes_the_prefill_it_left():
    """The decoder's prefill runs the model's forward a depth at a time and, with max_iter 2, stops
    before its depth-1 pass, whose queries it runs in its first step. Run afterwards on the same
    cache, that pass leaves the entries of the full prefill, and adds to the last tokens' depth-0
    logits what the full prefill's depth 1 does. A loop run to its end is the forward (max_iter 3:
    one step per depth)."""
    model = strong_model(2, rate=0.5)
    ids, mask = left_padded([6, 9, 7], seed=1)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        loop = model.begin_forward(ids, mask, logits_to_keep=1)
        model.depth_step(loop)
        pending, part = loop.tokens, model.end_forward(loop, use_cache=True)
        positions, real = pending.positions, pending.real
        assert pending.depth == 1
        assert int(real.sum()) == int((full.iter_count[mask.bool()] == 2).sum()) > 0
        assert torch.all(part.iter_count == 1) and not torch.equal(part.cache.entries(), full.cache.entries())
        logits, _ = model.run_pass(pending, part.cache, need_hidden=False)
    assert torch.equal(part.cache.entries(), full.cache.entries())
    last = mask.sum(1) - 1
    for b in range(ids.shape[0]):
        hit = (positions[b] == last[b]) & real[b]
        expected = part.logits[b, -1] + (logits[b][hit][0] if hit.any() else 0)
        torch.testing.assert_close(expected, full.logits[b, -1], atol=1e-5, rtol=0)
    deeper = strong_model(3, rate=0.5)
    with torch.no_grad():
        whole = deeper(ids, attention_mask=mask, logits_to_keep=1)
        loop, depths = deeper.begin_forward(ids, mask, logits_to_keep=1), []
        while loop.tokens is not None:
            depths.append(loop.tokens.depth)
            deeper.depth_step(loop)
        stepped = deeper.end_forward(loop)
    assert depths == [0, 1, 2]
    assert torch.equal(stepped.logits, whole.logits) and torch.equal(stepped.iter_count, whole.iter_count)


# -- sampling: the fused path must draw from exactly the unfused distribution ---------------------
VOCAB, DRAWS = 8, 6000


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with expectation < 5 are pooled."""
    small = expected < 5
    counts = torch.cat([counts[~small], counts[small].sum().view(1)]) if small.any() else counts
    expected = torch.cat([expected[~small], expected[small].sum().view(1)]) if small.any() else expected
    keep = expected > 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat.double() / 2))


def expected_pairs(model, prompt: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    """(V, V) exact probability of (first, second) generated token under the unfused method."""
    with torch.no_grad():
        first = sampler.probs(model(prompt).logits[:, -1])[0]
        extended = torch.cat([prompt.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)
        second = sampler.probs(model(extended).logits[:, -1])
    return first[:, None] * second


def draw_pairs(model, prompt, fused: bool, engine: str = "eager", **sampling) -> torch.Tensor:
    # Three tokens, so that two are drafted and accepted or resampled (a draft is never made for
    # the last token). The eager engine drafts the first beside the last prompt token's depth-1
    # pass, the second beside the first token's; the static engine (whose prefill runs the prompt's
    # passes itself) the second and the third.
    out = generate(model, prompt.expand(DRAWS, -1), max_new_tokens=3, do_sample=True, seed=11, fused=fused,
                   engine=engine, **sampling)
    assert not fused or out.stats.drafts == 2 * DRAWS
    pairs = out.sequences[:, -3] * VOCAB + out.sequences[:, -2]
    return torch.bincount(pairs, minlength=VOCAB * VOCAB).double()


@pytest.fixture(scope="module")
def always_model():
    model = tiny_tah(decider="always", max_iter=2, vocab=VOCAB, seed=6)
    randomize_lora(model, std=1.5, seed=6)
    with torch.no_grad():  # sharper logits, so that depth 1 moves the distribution a lot (TV ~ 0.1)
        model.lm.get_input_embeddings().weight.mul_(4)
    return model


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=5, top_p=0.9)])
def test_fused_sampling_draws_from_the_unfused_distribution(always_model, sampling):
    prompt = torch.tensor([[3, 5, 1, 6]])
    expected = expected_pairs(always_model, prompt, Sampler(True, **sampling)).flatten() * DRAWS
    for fused in (True, False):
        assert chi_square_p_value(draw_pairs(always_model, prompt, fused, **sampling), expected) > 0.01, fused


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=5, top_p=0.9)])
def test_static_engine_sampling_draws_from_the_unfused_distribution(always_model, sampling):
    """The GPU's engine: drafts accepted or redrawn on the device, with noise drawn before each step."""
    prompt = torch.tensor([[3, 5, 1, 6]])
    expected = expected_pairs(always_model, prompt, Sampler(True, **sampling)).flatten() * DRAWS
    drawn = draw_pairs(always_model, prompt, True, engine="static", **sampling)
    assert chi_square_p_value(drawn, expected) > 0.01


def test_a_wrong_acceptance_rule_is_caught(always_model, monkeypatch):
    prompt = torch.tensor([[3, 5, 1, 6]])
    expected = expected_pairs(always_model, prompt, Sampler(True)).flatten() * DRAWS

    def accept_every_draft(self, target_logits, drafts, draft_probs):
        return torch.ones_like(drafts, dtype=torch.bool), drafts

    monkeypatch.setattr(Sampler, "accept", accept_every_draft)
    assert chi_square_p_value(draw_pairs(always_model, prompt, True), expected) < 0.01


def test_a_wrong_acceptance_rule_is_caught_on_the_static_engine(always_model, monkeypatch):
    prompt = torch.tensor([[3, 5, 1, 6]])
    expected = expected_pairs(always_model, prompt, Sampler(True)).flatten() * DRAWS

    def accept_every_draft(p, drafts, q, uniform, noise):
        return torch.ones_like(drafts, dtype=torch.bool), drafts

    monkeypatch.setattr(static_engine, "accept_drawn", accept_every_draft)
    assert chi_square_p_value(draw_pairs(always_model, prompt, True, engine="static"), expected) < 0.01


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, do_sample=True, temperature=-0.5), "temperature"),
    (dict(max_new_tokens=4, do_sample=True, top_p=0.0), "top_p"),
    (dict(max_new_tokens=4, do_sample=True, top_p=1.5), "top_p"),
    (dict(max_new_tokens=4, stop_strings=5), "stop_strings"),
    (dict(max_new_tokens=4, stop_strings=[b"x"]), "stop_strings"),
    (dict(max_new_tokens=4, stop_strings="x"), "tokenizer"),
    (dict(max_new_tokens=200), "max_position_embeddings"),
    (dict(max_new_tokens=4, draft_candidates=5), "draft_candidates"),
    (dict(max_new_tokens=4, do_sample=True, draft_candidates=2), "greedy"),
])
def test_bad_requests_raise_input_errors(kwargs, words):
    model = tiny_tah(decider="random")
    ids, mask = left_padded([5, 3])
    with pytest.raises(InputError, match=words):
        generate(model, ids, mask, **kwargs)


def test_empty_prompt_is_an_error():
    model = tiny_tah()
    with pytest.raises(InputError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    ids, mask = left_padded([4, 0])
    with pytest.raises(InputError, match="empty"):
        generate(model, ids, mask, max_new_tokens=3)


class CharTokenizer:
    """Just enough of a tokenizer for stop strings: token i is the letter 'a' + i."""

    def decode(self, tokens, **_):
        return "".join(chr(ord("a") + t % 26) for t in tokens)


def test_stop_strings_end_a_row():
    model = strong_model(2)
    ids, mask = left_padded([5], seed=4)
    free = generate(model, ids, mask, max_new_tokens=12).sequences[0, 5:].tolist()
    stop = CharTokenizer().decode(free[3:5])
    out = generate(model, ids, mask, max_new_tokens=12, stop_strings=[stop], tokenizer=CharTokenizer())
    produced = int((out.iter_counts[0] > 0).sum())
    assert produced <= 5 and stop in CharTokenizer().decode(out.sequences[0, 5:5 + produced].tolist())


def test_greedy_picks_the_first_of_tied_maxima_like_argmax():
    from tah.generation.sampling import greedy_tokens

    logits = torch.randint(0, 3, (64, 500)).float()  # many ties per row
    logits[5] = 0.0
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))


def test_generate_is_the_package_level_call_the_readme_shows():
    """`import tah; tah.generate(...)`, as in the README and the issue's API."""
    import tah

    model = strong_model(2)
    ids, mask = left_padded([4, 6], seed=2)
    out = tah.generate(model, ids, mask, max_new_tokens=6)
    assert torch.equal(out.sequences, generate(model, ids, mask, max_new_tokens=6).sequences)
    assert out.iter_counts.shape == (2, 6)
