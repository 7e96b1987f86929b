"""One attention rule: every path of `TaHForCausalLM` against the dense, cache-free reference
(`tah.model.reference`), over random batches, paddings, deciders and chunkings.

The reference shares no code with the cache, packing or mask code. At depth d it runs the wrapped
HF model once over *all* entries of depths 0..d (a depth-k entry exists for a token iff the token
continued at every earlier depth), with a mask built by plain loops over (position, depth, valid)
tags: key j is visible to query i iff pos_j <= pos_i, depth_j <= depth_i and j is valid. Deeper
entries get the LoRA of their own depth through a per-entry (B, N) depth tensor.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tah.kernels.choose as choose
from conftest import tiny_tah
from tah.model.attention import additive_mask, duo_causal_visible
from tah.model.reference import reference_forward as dense_reference
from tah.model.reference import visible as naive_visible

ATOL = 1e-4
VOCAB = 64


# -- helpers ------------------------------------------------------------------------------------
def padded_batch(lengths: list[int], sides: list[str], width: int, seed: int):
    """ids, mask (B, width): row b has lengths[b] real tokens placed by sides[b]."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, (n, side) in enumerate(zip(lengths, sides, strict=True)):
        start = {"left": width - n, "right": 0, "middle": (width - n) // 2}[side]
        ids[b, start:start + n] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[b, start:start + n] = 1
    return ids, mask


def build(max_iter: int, decider: str, rate: float, seed: int, lora_per_depth: bool, model_seed: int,
          arch: str = "qwen3"):
    """A tiny TaH model; `seed` is the random decider's (tiny_tah's own `seed` is the weights')."""
    extra = dict(random_rate=rate) if decider == "random" else dict(threshold=0.3)
    model = tiny_tah(arch, seed=model_seed, vocab=VOCAB, max_iter=max_iter, decider=decider,
                     lora_per_depth=lora_per_depth, **extra)
    if decider == "random":
        model.tah_config = model.tah_config.replace(seed=seed)
        model.decider.seed = seed
    else:
        model.set_threshold(0.3)
    return model


def assert_matches(logits, iters, ref_logits, ref_iters, mask, what: str) -> None:
    valid = mask.bool()
    assert logits.shape == ref_logits.shape, what
    assert torch.isfinite(logits).all(), f"{what}: non-finite logits"
    assert torch.equal(iters[valid], ref_iters[valid]), (
        f"{what}: iteration counts differ\nmodel {iters.tolist()}\nref   {ref_iters.tolist()}\nmask {mask.tolist()}")
    if valid.any():
        err = (logits[valid] - ref_logits[valid]).abs().max().item()
        assert err <= ATOL, f"{what}: max |logits - reference| = {err:.3g}\nmask {mask.tolist()}"


def run_cached(model, ids, mask, splits: list[int]):
    """Feed ids in consecutive chunks ending at `splits` (and T) through one cache."""
    bounds = [0, *splits, ids.shape[1]]
    cache, logits, iters = None, [], []
    for a, b in zip(bounds, bounds[1:], strict=False):
        out = model(ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
        iters.append(out.iter_count)
    return torch.cat(logits, 1), torch.cat(iters, 1)


# -- the property -------------------------------------------------------------------------------
@st.composite
def cases(draw):
    batch = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(0, 10), min_size=batch, max_size=batch))
    sides = draw(st.lists(st.sampled_from(["left", "right", "middle"]), min_size=batch, max_size=batch))
    width = max(max(lengths), 1) + draw(st.integers(0, 2))
    decider = draw(st.sampled_from(["random", "random", "mlp"]))
    return dict(
        lengths=lengths, sides=sides, width=width, decider=decider,
        max_iter=draw(st.sampled_from([2, 3])),
        rate=draw(st.sampled_from([0.3, 0.6, 1.0])),
        seed=draw(st.integers(0, 1000)),
        lora_per_depth=draw(st.booleans()),
        model_seed=draw(st.integers(0, 3)),
        arch=draw(st.sampled_from(["qwen3", "llama"])),
        data_seed=draw(st.integers(0, 1000)),
        prefill=draw(st.integers(1, width)),
        chunk=draw(st.integers(1, max(width - 1, 1))),
    )


@settings(max_examples=25, deadline=None)
@given(cases())
def test_every_path_matches_the_dense_reference(case):
    model = build(case["max_iter"], case["decider"], case["rate"], case["seed"], case["lora_per_depth"],
                  case["model_seed"], case["arch"])
    ids, mask = padded_batch(case["lengths"], case["sides"], case["width"], case["data_seed"])
    with torch.no_grad():
        ref_logits, ref_iters = dense_reference(model, ids, mask)
        assert (ref_iters <= case["max_iter"]).all() and (ref_iters >= 1).all()

        # (a) one full forward without a cache, inference
        out = model(ids, attention_mask=mask)
        assert out.past_key_values is None
        assert_matches(out.logits, out.iter_count, ref_logits, ref_iters, mask, "full forward (eval)")

        # (b) prefill, then one token per step with the growing attention mask
        logits, iters = run_cached(model, ids, mask, list(range(case["prefill"], case["width"])))
        assert_matches(logits, iters, ref_logits, ref_iters, mask, f"prefill {case['prefill']} + steps")

        # (c) chunked prefill: two chunks
        if case["width"] >= 2:
            logits, iters = run_cached(model, ids, mask, [case["chunk"]])
            assert_matches(logits, iters, ref_logits, ref_iters, mask, f"two chunks split at {case['chunk']}")

        # (e) the CUDA path of masked attention (packed KV groups, masked_attention_gpu), run here
        choose.GPU_PATH_ON_CPU = True
        try:
            out = model(ids, attention_mask=mask)
            assert_matches(out.logits, out.iter_count, ref_logits, ref_iters, mask, "full forward, GPU attention")
            logits, iters = run_cached(model, ids, mask, list(range(case["prefill"], case["width"])))
            assert_matches(logits, iters, ref_logits, ref_iters, mask, "prefill + steps, GPU attention")
        finally:
            choose.GPU_PATH_ON_CPU = False

    # (a') the training path: train mode (all dropout is 0), gradients on
    model.train()
    out = model(ids, attention_mask=mask)
    assert out.logits.requires_grad
    assert_matches(out.logits.detach(), out.iter_count, ref_logits, ref_iters, mask, "full forward (train)")

    # (d) rows that are entirely padding: their outputs only need to be finite (checked above for all
    # rows); and they never iterate.
    empty = mask.sum(1) == 0
    assert (out.iter_count[empty] == 1).all()


# -- fixed cases that keep the property honest ---------------------------------------------------
def test_reference_depth_zero_is_the_base_model():
    model = build(2, "random", 0.0, 0, False, 0)  # nobody continues
    ids, mask = padded_batch([6, 3], ["left", "right"], 7, seed=1)
    with torch.no_grad():
        ref_logits, ref_iters = dense_reference(model, ids, mask)
        for b in range(2):
            row = mask[b].bool()
            base = model.lm(input_ids=ids[b, row][None]).logits[0]
            assert (ref_logits[b, row] - base).abs().max() <= ATOL
    assert (ref_iters == 1).all()


def test_reference_mixes_depths_and_a_wrong_rule_is_caught():
    """The property is only as strong as its cases: the reference must send a mix of tokens deeper, and
    a rule that lets deeper queries see keys of deeper earlier depths at any position must differ."""
    for decider, rate in [("random", 0.5), ("mlp", 0.3)]:
        model = build(3, decider, rate, 7, True, 1)
        ids, mask = padded_batch([9, 6], ["left", "right"], 9, seed=3)
        with torch.no_grad():
            ref_logits, ref_iters = dense_reference(model, ids, mask)
            valid = mask.bool()
            counts = ref_iters[valid]
            assert (counts == 1).any() and (counts > 1).any(), counts
            out = model(ids, attention_mask=mask)
            assert_matches(out.logits, out.iter_count, ref_logits, ref_iters, mask, decider)

            def depth_blind(qp, qd, kp, kd, kv):  # plain causal over every entry, depth ignored
                return bool(kv) and kp <= qp

            wrong_logits, wrong_iters = dense_reference(model, ids, mask, rule=depth_blind)
            deep = valid & (ref_iters > 1)
            differs = (wrong_logits[deep] - out.logits[deep]).abs().max() > 10 * ATOL
            assert differs or not torch.equal(wrong_iters[valid], out.iter_count[valid])


# -- the mask rule itself -----------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), queries=st.integers(1, 6), keys=st.integers(1, 9), seed=st.integers(0, 10_000),
       int_depth=st.booleans())
def test_duo_causal_visible_matches_naive_loops(batch, queries, keys, seed, int_depth):
    gen = torch.Generator().manual_seed(seed)
    q_pos = torch.randint(0, 6, (batch, queries), generator=gen)
    q_depth = int(torch.randint(0, 3, (), generator=gen)) if int_depth else torch.randint(0, 3, (batch, queries), generator=gen)
    k_pos = torch.randint(0, 6, (batch, keys), generator=gen)
    k_depth = torch.randint(0, 3, (batch, keys), generator=gen)
    k_valid = torch.rand(batch, keys, generator=gen) < 0.7
    k_valid[0] = False  # a row with no valid key at all
    visible = duo_causal_visible(q_pos, q_depth, k_pos, k_depth, k_valid)
    assert visible.shape == (batch, queries, keys) and visible.dtype == torch.bool
    for b in range(batch):
        for i in range(queries):
            qd = q_depth if isinstance(q_depth, int) else int(q_depth[b, i])
            for j in range(keys):
                want = naive_visible(int(q_pos[b, i]), qd, int(k_pos[b, j]), int(k_depth[b, j]), bool(k_valid[b, j]))
                assert bool(visible[b, i, j]) == want, (b, i, j)
    assert not visible[0].any()

    mask = additive_mask(visible, torch.float32)
    assert mask.shape == (batch, 1, queries, keys)
    assert (mask[:, 0][visible] == 0).all()
    assert (mask[:, 0][~visible] <= -1e30).all()
