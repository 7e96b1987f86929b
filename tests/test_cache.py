"""The tagged KV cache: invisible to the outputs, one entry per (token, depth reached), grows by doubling."""

from __future__ import annotations

import pytest
import torch

from conftest import left_padded, tiny_tah
from tah.errors import InputError
from tah.model import cache as cache_module
from tah.model.cache import TaHCache
from tah.model.step import Queries

ATOL = 1e-4
DECIDERS = [("random", dict(random_rate=0.5, seed=3)), ("mlp", dict(threshold=0.3))]


def make(max_iter: int, decider: str, options: dict, weights_seed: int = 0):
    """A tiny TaH model; options["seed"] is the random decider's seed (tiny_tah's `seed` sets the weights)."""
    options = dict(options)
    decider_seed = options.pop("seed", 0)
    model = tiny_tah(seed=weights_seed, max_iter=max_iter, decider=decider, **options)
    if decider == "random":
        model.tah_config = model.tah_config.replace(seed=decider_seed)
        model.decider.seed = decider_seed
    if decider == "mlp":
        model.set_threshold(options["threshold"])
    return model


def run_steps(model, ids, mask, prompt: int, cache=None):
    """Prefill ids[:, :prompt], then one token per step with the growing mask; outputs concatenated."""
    out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache, use_cache=True)
    cache, logits, iters = out.past_key_values, [out.logits], [out.iter_count]
    for t in range(prompt, ids.shape[1]):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        logits.append(out.logits)
        iters.append(out.iter_count)
    return torch.cat(logits, 1), torch.cat(iters, 1), cache


def passes(iter_count: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) total passes of the real tokens of each row."""
    return (iter_count * mask.bool()).sum(1)


# -- the cache is invisible ---------------------------------------------------------------------
@pytest.mark.parametrize("max_iter", [2, 3])
@pytest.mark.parametrize("decider,options", DECIDERS, ids=[d for d, _ in DECIDERS])
@pytest.mark.parametrize("prompt", [1, 4])
def test_one_prefill_equals_single_token_steps(max_iter, decider, options, prompt):
    model = make(max_iter, decider, options)
    ids, mask = left_padded([10, 6, 8], seed=5)
    valid = mask.bool()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=True)
        logits, iters, cache = run_steps(model, ids, mask, prompt)

    counts = full.iter_count[valid]
    assert (counts == 1).any() and (counts > 1).any(), f"the decider should send a mix deeper: {counts.tolist()}"
    assert torch.equal(iters[valid], full.iter_count[valid])
    assert (logits[valid] - full.logits[valid]).abs().max() <= ATOL
    assert torch.isfinite(logits).all()
    # Both caches hold the same entries per row, whichever way they were filled.
    assert torch.equal(cache.entries(), full.past_key_values.entries())


def test_the_cache_passes_under_either_name():
    """transformers 5.24 renamed past_key_values to cache: the TaH model takes and returns it under
    both names, whatever the installed version, and refuses two different caches at once."""
    model = make(2, "random", dict(random_rate=0.5, seed=3))
    ids, mask = left_padded([6, 4], seed=2)
    with torch.no_grad():
        first = model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        assert first.cache is first.past_key_values is first["cache"]
        old_name = model(ids[:, -1:], attention_mask=mask, past_key_values=first.cache, use_cache=True).logits
        again = model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        new_name = model(ids[:, -1:], attention_mask=mask, cache=again.cache, use_cache=True).logits
        with pytest.raises(InputError, match="pass the cache once"):
            model(ids[:, -1:], attention_mask=mask, cache=TaHCache(), past_key_values=TaHCache())
    assert torch.equal(old_name, new_name)


@pytest.mark.parametrize("max_iter", [2, 3])
def test_under_autograd_steps_equal_one_prefill_and_backward_runs(max_iter):
    """With gradients on, the cache appends by concatenation (one block per pass at the longest
    row's fill) instead of writing in place: same outputs, and backward through every step works."""
    model = make(max_iter, "random", dict(random_rate=0.5, seed=3))
    ids, mask = left_padded([10, 6, 8], seed=5)
    valid = mask.bool()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=True)
    logits, iters, cache = run_steps(model, ids, mask, 4)
    assert logits.requires_grad
    assert torch.equal(iters[valid], full.iter_count[valid])
    assert (logits[valid].detach() - full.logits[valid]).abs().max() <= ATOL
    logits[valid].square().mean().backward()
    assert all(p.grad is not None for p in model.lm.parameters() if p.requires_grad)
    # Shorter rows keep gaps of invalid slots; the valid ones are exactly one per (token, depth).
    assert torch.equal(cache.valid.sum(1), full.past_key_values.entries())
    assert (cache.entries() >= full.past_key_values.entries()).all()


def test_steps_after_a_prefill_equal_a_longer_prefill():
    """Decoding continues a prompt exactly as if the whole text had been prefilled (max_iter 3)."""
    model = make(3, "random", dict(random_rate=0.5, seed=11))
    ids, mask = left_padded([12, 9], seed=2)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        logits, iters, _ = run_steps(model, ids, mask, prompt=7)
    valid = mask.bool()
    assert (full.iter_count[valid] == 3).any()
    assert torch.equal(iters[valid], full.iter_count[valid])
    assert (logits[valid] - full.logits[valid]).abs().max() <= ATOL


# -- memory: one entry per (token, depth it reached) --------------------------------------------
def test_entries_after_prefill_are_tokens_plus_extra_passes():
    model = make(2, "random", dict(random_rate=0.5, seed=1))
    n = 16
    ids, mask = left_padded([n], seed=0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
    k = int((out.iter_count > 1).sum())
    assert 0 < k < n
    entries = out.past_key_values.entries()
    assert entries.tolist() == [n + k]
    assert entries.tolist() != [2 * n]


@pytest.mark.parametrize("decider,options", DECIDERS, ids=[d for d, _ in DECIDERS])
def test_entries_equal_total_passes_max_iter_3(decider, options):
    model = make(3, decider, options)
    ids, mask = left_padded([14], seed=4)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
    assert (out.iter_count > 1).any() and (out.iter_count < 3).any()
    assert out.past_key_values.entries().tolist() == [int(out.iter_count.sum())]


@pytest.mark.parametrize("max_iter", [2, 3])
def test_left_padded_rows_hold_their_valid_tokens_plus_extra_passes(max_iter):
    model = make(max_iter, "random", dict(random_rate=0.5, seed=2))
    lengths = [9, 4, 0, 7]
    ids, mask = left_padded(lengths, seed=8)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
    cache = out.past_key_values
    total = passes(out.iter_count, mask)
    assert torch.equal(cache.entries(), total)
    assert cache.entries()[2] == 0  # an all-padding row holds nothing
    extra = total - torch.tensor(lengths)
    assert (extra >= 0).all() and extra.sum() > 0

    # Decode more steps (padding for the empty row on some of them): entries keep equal to the passes.
    gen = torch.Generator().manual_seed(1)
    seen_ids, seen_mask, seen_iters = ids, mask, out.iter_count
    for step in range(5):
        new_ids = torch.randint(3, 64, (len(lengths), 1), generator=gen)
        new_mask = torch.ones(len(lengths), 1, dtype=torch.long)
        if step % 2 == 0:
            new_mask[2] = 0
        seen_ids, seen_mask = torch.cat([seen_ids, new_ids], 1), torch.cat([seen_mask, new_mask], 1)
        with torch.no_grad():
            step_out = model(new_ids, attention_mask=seen_mask, past_key_values=cache, use_cache=True)
        seen_iters = torch.cat([seen_iters, step_out.iter_count], 1)
        assert torch.equal(cache.entries(), passes(seen_iters, seen_mask)), f"after step {step}"

    # And the tokens decoded one by one got what one prefill of everything would give them.
    with torch.no_grad():
        full = model(seen_ids, attention_mask=seen_mask, use_cache=True)
    valid = seen_mask.bool()
    assert torch.equal(full.iter_count[valid], seen_iters[valid])
    assert torch.equal(full.past_key_values.entries(), cache.entries())


def test_depth_d_entries_exist_only_for_tokens_that_reached_depth_d():
    """The live slots of each row are exactly its (token, depth) pairs: tags match the iteration counts."""
    model = make(3, "random", dict(random_rate=0.6, seed=4))
    ids, mask = left_padded([11, 5], seed=6)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
    cache = out.past_key_values
    for b in range(ids.shape[0]):
        fill = int(cache.entries()[b])
        row_valid = mask[b].bool()
        counts = out.iter_count[b, row_valid]
        assert bool(cache.valid[b, :fill].all())
        assert not bool(cache.valid[b, fill:].any())
        tags = sorted(zip(cache.pos[b, :fill].tolist(), cache.depth[b, :fill].tolist(), strict=True))
        want = sorted((p, d) for p, c in enumerate(counts.tolist()) for d in range(c))
        assert tags == want


# -- growth ------------------------------------------------------------------------------------
@pytest.mark.parametrize("capacity", [1, 4, 5])
def test_cache_grows_by_doubling_without_changing_results(capacity):
    model = make(3, "random", dict(random_rate=0.5, seed=9))
    ids, mask = left_padded([13, 8], seed=7)
    valid = mask.bool()
    small = TaHCache(capacity=capacity)
    history = [small.capacity]

    with torch.no_grad():
        ref_logits, ref_iters, ref_cache = run_steps(model, ids, mask, prompt=3)
        out = model(ids[:, :3], attention_mask=mask[:, :3], past_key_values=small, use_cache=True)
        logits, iters = [out.logits], [out.iter_count]
        history.append(small.capacity)
        for t in range(3, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=small, use_cache=True)
            logits.append(out.logits)
            iters.append(out.iter_count)
            history.append(small.capacity)
            assert int(small.entries().max()) <= small.capacity
            assert all(k.shape[2] == small.capacity for k in small.keys + small.values)
    logits, iters = torch.cat(logits, 1), torch.cat(iters, 1)

    assert torch.equal(iters[valid], ref_iters[valid])
    assert (logits[valid] - ref_logits[valid]).abs().max() <= ATOL
    assert torch.equal(small.entries(), ref_cache.entries())
    grown = [(a, b) for a, b in zip(history, history[1:], strict=False) if b != a]
    assert len(grown) >= 2, history
    assert all(b >= 2 * a for a, b in grown), f"capacity must at least double when it grows: {history}"
    # Growth is rare: a handful of reallocations, not one per step.
    assert len(grown) <= 6


def test_growth_mid_pass_keeps_a_single_prefill_exact():
    """A deep pass that crosses the capacity (depth-1 entries appended after the depth-0 ones)."""
    model = make(2, "always", {})
    ids, mask = left_padded([6, 3], seed=1)
    valid = mask.bool()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=True)
        cache = TaHCache(capacity=6)  # depth 0 fits, depth 1 does not
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    assert (out.iter_count[valid] == 2).all()
    assert cache.capacity >= 12
    assert torch.equal(cache.entries(), torch.tensor([12, 6]))
    assert (out.logits[valid] - ref.logits[valid]).abs().max() <= ATOL


# -- the lone depth-0 query's mask, kept slot by slot -------------------------------------------
@pytest.mark.parametrize("prompt_mask", [[[1, 1, 1, 1], [1, 1, 1, 1]], [[0, 1, 1, 1], [1, 1, 1, 1]]],
                         ids=["even rows", "padded row"])
def test_lone_depth0_mask_follows_the_tags_through_fused_steps_and_rollbacks(prompt_mask):
    """A lone depth-0 query (the plain decode step) reads a mask the cache keeps up to date as slots
    are written and rolled back. After fused steps (a depth-1 pass beside a depth-0 draft), deeper
    passes, and rejected drafts that are or are not the row's last slot, it must equal the
    duo-causal mask built from the slot tags."""
    from tah.model.attention import additive_mask, duo_causal_visible

    batch, f32 = 2, torch.float32
    cache = TaHCache(capacity=2)  # grows on the way
    ones = torch.ones(batch, 1, dtype=torch.bool)
    real = torch.tensor(prompt_mask, dtype=torch.bool)
    checked = 0
    with torch.no_grad():
        cache.begin_pass(cache.positions_for(real), 0, real, f32)
        for step in range(12):
            positions = cache.seen[:, None].clone()
            mask = cache.begin_pass(positions, 0, ones, f32)
            S = int(cache.fill.max())
            expected = additive_mask(duo_causal_visible(positions, 0, cache.pos[:, :S], cache.depth[:, :S],
                                                        cache.valid[:, :S]), f32)
            if mask is not None:  # None: nothing but valid depth-0 entries so far (HF's unmasked path)
                assert torch.equal(mask, expected), f"step {step}"
                checked += 1
            hard = cache.seen[:, None] - 1
            fused = torch.cat([hard, hard + 1], 1)  # the hard token's depth 1 beside its draft
            cache.begin_pass(fused, torch.tensor([[1, 0]]).expand(batch, 2), torch.ones(batch, 2, dtype=torch.bool), f32)
            draft_slots = cache.last_slots[:, 1].clone()
            if step % 3 == 1:  # a depth-2 pass follows, then the draft is rejected: not the last slot
                cache.begin_pass(hard, 2, ones, f32)
                cache.invalidate(torch.arange(batch), draft_slots)
            elif step % 3 == 2:  # rejected at once: the last slot, reclaimed
                cache.invalidate(torch.arange(batch), draft_slots)
    assert checked >= 11  # every step once the first draft exists


# -- branches: alternatives for one token, side by side -----------------------------------------
@pytest.mark.parametrize("few_queries", [cache_module.FEW_QUERIES, 0], ids=["in Python", "tensor ops"])
@pytest.mark.parametrize("as_lists", [False, True], ids=["tensor", "lists"])
def test_draft_candidates_on_branches_compute_what_each_would_alone(few_queries, as_lists, monkeypatch):
    """A fused greedy step runs a hard token's depth-1 pass beside two draft candidates for the next
    position, each on a branch of its own. The candidates share (position, depth 0); neither may
    see the other's entry, so each (and the deep query) must get the logits it gets in a step
    without the other. Decode steps separate branches in Python; bigger passes with tensor ops."""
    import copy

    monkeypatch.setattr(cache_module, "FEW_QUERIES", few_queries)

    model = make(2, "random", dict(random_rate=0.0, seed=0))
    ids, mask = left_padded([6], seed=4)
    embed = model.lm.get_input_embeddings()
    with torch.no_grad():
        prefill = model(ids, attention_mask=mask, past_key_values=TaHCache(), use_cache=True).past_key_values
        soft = torch.randn(1, 1, embed.weight.shape[1], generator=torch.Generator().manual_seed(0))
        hard_pos = int(prefill.seen[0]) - 1

        def step(tokens: list[int]) -> torch.Tensor:
            inputs = torch.cat([soft, embed(torch.tensor([tokens]))], dim=1)
            width = inputs.shape[1]
            positions = torch.tensor([[hard_pos] + [hard_pos + 1] * (width - 1)])
            depth = torch.tensor([[1] + [0] * (width - 1)])
            real = torch.ones(1, width, dtype=torch.bool)
            branches = [list(range(width))]  # the deep query on branch 0, the candidates on 1, 2, ...
            branches = branches if as_lists else torch.tensor(branches)
            queries = Queries(inputs, positions, depth, real, branches)
            logits, _ = model.run_pass(queries, copy.deepcopy(prefill), need_hidden=False)
            return logits[0]

        both, first, second = step([10, 20]), step([10]), step([20])
    torch.testing.assert_close(both[0], first[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(both[1], first[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(both[2], second[1], atol=ATOL, rtol=0)
    assert not torch.allclose(first[1], second[1], atol=1e-3)  # the candidates differ at all


def test_dropping_a_candidate_before_kept_entries_leaves_no_gap():
    """When the runner-up candidate is kept, the first one's slot lies before it (and before any
    deeper pass run since): dropping it moves the later entries down, tags and keys alike."""
    cache = TaHCache(capacity=8)
    f32 = torch.float32
    with torch.no_grad():
        real = torch.ones(1, 3, dtype=torch.bool)
        cache.begin_pass(torch.tensor([[0, 1, 2]]), 0, real, f32)
        fused = torch.tensor([[2, 3, 3]])  # depth 1 of token 2, candidates A and B for position 3
        cache.begin_pass(fused, torch.tensor([[1, 0, 0]]), real, f32)
        keys = torch.arange(6.0).view(1, 1, 6, 1)  # (B, H, S, D): slot s holds key s
        cache.keys, cache.values = [keys.clone()], [keys.clone()]
        cache.invalidate(torch.tensor([0]), torch.tensor([4]))  # A (slot 4) dropped, B (slot 5) kept
    assert int(cache.fill[0]) == 5 and int(cache.seen[0]) == 4
    assert cache.pos[0, :5].tolist() == [0, 1, 2, 2, 3] and cache.depth[0, :5].tolist() == [0, 0, 0, 1, 0]
    assert cache.valid[0, :5].all() and not cache.valid[0, 5:].any()
    assert cache.keys[0][0, 0, :5, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 5.0]  # B's key moved into A's slot


@pytest.mark.parametrize("kept", [0, 1, 2, None], ids=["first", "second", "third", "none"])
def test_a_split_cache_keeps_one_candidate_where_the_first_was(kept):
    """Greedy drafts three rival candidates beside a hard token's depth-1 pass; after the verdict
    all but the kept one (if any) are dropped. In a split cache the kept one's entry (keys, values,
    tags) ends up in the first candidate's slot, the fill drops past it, and the deep entry in
    region 1 stays."""
    cache = TaHCache(capacity=8, deep_capacity=4)
    f32 = torch.float32
    with torch.no_grad():
        cache.begin_pass(torch.tensor([[0, 1, 2]]), 0, torch.ones(1, 3, dtype=torch.bool), f32)
        fused = torch.tensor([[2, 3, 3, 3]])  # depth 1 of token 2, candidates A, B, C for position 3
        cache.begin_pass(fused, torch.tensor([[1, 0, 0, 0]]), torch.ones(1, 4, dtype=torch.bool), f32)
        deep_slot, *candidate_slots = cache.last_slots[0].tolist()
        slots = torch.arange(float(cache.slots_per_row)).view(1, 1, -1, 1)  # slot s holds key s, value 10 s
        cache.keys, cache.values = [slots.clone()], [10 * slots]
        dropped = [slot for j, slot in enumerate(candidate_slots) if j != kept]
        cache.invalidate(torch.tensor([0] * len(dropped)), torch.tensor(dropped))
    fill = 3 + (kept is not None)
    assert int(cache.fill[0]) == fill and int(cache.seen[0]) == fill and int(cache.deep_fill[0]) == 1
    assert cache.valid[0, :fill].all() and not cache.valid[0, fill:cache.capacity].any()
    assert cache.pos[0, :fill].tolist() == [0, 1, 2, 3][:fill] and bool(cache.valid[0, deep_slot])
    if kept is not None:
        assert candidate_slots[0] == 3
        assert cache.keys[0][0, 0, 3, 0] == candidate_slots[kept] and cache.values[0][0, 0, 3, 0] == 10 * candidate_slots[kept]
    assert cache.keys[0][0, 0, deep_slot, 0] == deep_slot  # region 1 untouched


# -- split: depth-0 entries in one region, deeper ones in another (what decoding uses) ------------
@pytest.mark.parametrize("max_iter", [2, 3])
@pytest.mark.parametrize("capacity,deep_capacity", [(64, 16), (2, 1)], ids=["roomy", "growing"])
def test_a_split_cache_is_invisible_too(max_iter, capacity, deep_capacity):
    """Prefill and single-token steps through a split cache give the logits and iteration counts of one
    prefill, with padded rows, whether or not its regions have to grow (region 1 moves up when
    region 0 grows); it holds the same entries per row as a cache in one run of slots."""
    model = make(max_iter, "random", dict(random_rate=0.5, seed=3))
    ids, mask = left_padded([10, 6, 8], seed=5)
    valid = mask.bool()
    split = TaHCache(capacity=capacity, deep_capacity=deep_capacity)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=True)
        logits, iters, cache = run_steps(model, ids, mask, 4, cache=split)
    assert torch.equal(iters[valid], full.iter_count[valid])
    assert (logits[valid] - full.logits[valid]).abs().max() <= ATOL
    assert torch.equal(split.entries(), full.past_key_values.entries())
    assert (split.fill <= split.capacity).all() and (split.deep_fill <= split.deep_capacity).all()
    assert all(k.shape[2] == split.slots_per_row for k in split.keys + split.values)
    if capacity == 2:
        assert split.capacity >= 2 * capacity and split.deep_capacity >= 2 * deep_capacity
    for b in range(ids.shape[0]):  # region 0: the row's depth-0 entries; region 1: its deeper ones
        region0 = slice(0, int(split.fill[b]))
        region1 = slice(split.capacity, split.capacity + int(split.deep_fill[b]))
        assert bool(split.valid[b, region0].all()) and bool((split.depth[b, region0] == 0).all())
        assert bool(split.valid[b, region1].all()) and bool((split.depth[b, region1] > 0).all())
        assert int(split.valid[b].sum()) == int(split.entries()[b])


def test_a_split_cache_keeps_lone_depth0_queries_unmasked():
    """The point of splitting: once deeper entries exist, a lone depth-0 query per row still reads a
    plain prefix of depth-0 entries, so it takes HF's unmasked path (mask None) as in the base model;
    after a fused step (depth 1 beside a depth-0 draft) and a rolled-back draft as well. A row of
    another length needs the slot-by-slot mask, which matches the tags."""
    from tah.model.attention import additive_mask, duo_causal_visible

    f32, ones = torch.float32, torch.ones(1, 1, dtype=torch.bool)
    with torch.no_grad():
        cache = TaHCache(capacity=4, deep_capacity=2)
        assert cache.begin_pass(torch.arange(4)[None], 0, torch.ones(1, 4, dtype=torch.bool), f32) is None
        for step in range(6):
            hard = cache.seen[:, None] - 1
            fused = cache.begin_pass(torch.cat([hard, hard + 1], 1), torch.tensor([[1, 0]]),
                                     torch.ones(1, 2, dtype=torch.bool), f32)
            assert fused is not None  # the deep query needs the duo-causal mask
            if step % 2:  # the draft is rejected: its slot is reclaimed
                cache.invalidate(torch.tensor([0]), cache.last_slots[:, 1].clone())
            assert cache.begin_pass(cache.seen[:, None].clone(), 0, ones, f32) is None, f"step {step}"
        assert int(cache.deep_fill[0]) == 6 and cache.deep_capacity >= 6
        padded = TaHCache(capacity=4, deep_capacity=2)
        real = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
        padded.begin_pass(padded.positions_for(real), 0, real, f32)
        padded.begin_pass(padded.seen[:, None] - 1, 1, torch.ones(2, 1, dtype=torch.bool), f32)
        positions = padded.seen[:, None].clone()
        mask = padded.begin_pass(positions, 0, torch.ones(2, 1, dtype=torch.bool), f32)
        S = mask.shape[-1]
        assert S <= padded.capacity  # depth-0 queries read region 0 only
        expected = additive_mask(duo_causal_visible(positions, 0, padded.pos[:, :S], padded.depth[:, :S],
                                                    padded.valid[:, :S]), f32)
        assert torch.equal(mask, expected)


def test_a_split_cache_refuses_autograd():
    """Split caches are written in place, which would hide the writes from autograd."""
    cache = TaHCache(capacity=4, deep_capacity=2)
    with pytest.raises(RuntimeError, match="no_grad"):
        cache.begin_pass(torch.arange(3)[None], 0, torch.ones(1, 3, dtype=torch.bool), torch.float32)

