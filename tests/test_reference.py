"""Every fast path against `tah.model.reference`, the dense, cache-free TaH forward.

Float64 models, so that no decision (an MLP decider's threshold, a greedy argmax) can flip on a
rounding difference between two correct computations: then logits agree to ~1e-10, pass counts
and generated tokens exactly. The random property test over paddings and chunkings (float32) is
tests/test_attention_property.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import cache

import pytest
import torch

import tah.kernels.choose as choose
from conftest import randomize_lora, tiny_tah
from tah.generation import generate, generate_reference
from tah.model.reference import reference_forward, reference_greedy, reference_loss

ATOL = 1e-9


def model64(decider: str, max_iter: int, lora_std: float = 0.05, seed: int = 0):
    """A tiny float64 TaH model whose decider sends a mix of tokens deeper."""
    model = tiny_tah(decider=decider, max_iter=max_iter, random_rate=0.4, lora_per_depth=max_iter > 2,
                     seed=seed)
    if lora_std != 0.05:  # strong enough that depth 1 often changes the argmax (drafts get rejected)
        randomize_lora(model, std=lora_std, seed=3)
    model.set_threshold(0.5 if lora_std > 1 else 0.3)
    return model.double()


def batch(padding: str, seed: int = 0):
    """ids, mask (3, 9): rows of 9, 6 and 4 real tokens, padded on the given side; oracle iter_labels
    (1..3, -100 on padding and on a few real tokens); labels (-100 on padding)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (3, 9), generator=gen)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, n in enumerate((9, 6, 4)):
        if padding == "left":
            mask[row, 9 - n:] = 1
        else:
            mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    iter_labels = torch.randint(1, 4, (3, 9), generator=gen)
    iter_labels[(mask == 0) | (torch.rand(3, 9, generator=gen) < 0.15)] = -100
    return ids, mask, iter_labels, ids.masked_fill(mask == 0, -100)


@cache
def reference_case(decider: str, max_iter: int, padding: str):
    """(model, ids, mask, iter_labels or None, reference logits, reference iter_count), built once per
    module. decider "oracle": an MLP model told who iterates by iter_labels."""
    model = model64("mlp" if decider == "oracle" else decider, max_iter)
    ids, mask, iter_labels, _ = batch(padding)
    iter_labels = iter_labels.clamp(max=max_iter) if decider == "oracle" else None
    with torch.no_grad():
        logits, iters = reference_forward(model, ids, mask, iter_labels)
    counts = iters[mask.bool()]
    assert (counts == 1).any() and (counts > 1).any(), "the case must mix depths"
    return model, ids, mask, iter_labels, logits, iters


def assert_close(logits, iters, ref_logits, ref_iters, mask, what: str) -> None:
    """Pass counts equal and logits close on real tokens; logits may be those of the last columns only."""
    valid = mask.bool()
    assert torch.equal(iters[valid], ref_iters[valid]), f"{what}: pass counts\n{iters}\n{ref_iters}"
    valid = valid[:, -logits.shape[1]:]
    err = (logits[valid] - ref_logits[:, -logits.shape[1]:][valid]).abs().max().item()
    assert err <= ATOL, f"{what}: max |logits - reference| = {err:.3g}"


@contextmanager
def gpu_attention(on: bool):
    """The CUDA path of masked attention (kernels/cuda/attention.py's masked_attention_gpu), run on CPU."""
    choose.GPU_PATH_ON_CPU = on
    try:
        yield
    finally:
        choose.GPU_PATH_ON_CPU = False


DECIDERS = ["oracle", "mlp", "random"]


# -- training forward -----------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("max_iter", [2, 3])
@pytest.mark.parametrize("decider", DECIDERS)
def test_inference_forward_matches_the_reference(decider, max_iter, padding):
    model, ids, mask, iter_labels, ref_logits, ref_iters = reference_case(decider, max_iter, padding)
    with torch.no_grad():
        for gpu in (False, True):
            with gpu_attention(gpu):
                out = model(ids, attention_mask=mask, iter_labels=iter_labels)
            assert_close(out.logits, out.iter_count, ref_logits, ref_iters, mask, f"eval forward, gpu path {gpu}")


@pytest.mark.parametrize("max_iter, shared_head, gpu", [(2, True, False), (2, False, False), (3, True, False),
                                                         (2, True, True), (3, True, True)])
@pytest.mark.parametrize("decider", DECIDERS)
def test_training_step_has_the_reference_loss_and_gradients(decider, max_iter, shared_head, gpu):
    """Train mode with gradients: the paths with their own backward (the shared LM head of max_iter 2,
    the gathered rows' gradient, the head's weight gradient) give the reference's gradients."""
    model = model64("mlp" if decider == "oracle" else decider, max_iter).train()
    model.use_shared_head = shared_head
    ids, mask, iter_labels, labels = batch("right", seed=1)
    iter_labels = iter_labels.clamp(max=max_iter) if decider == "oracle" else None
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    with gpu_attention(gpu):
        out = model(ids, attention_mask=mask, labels=labels, iter_labels=iter_labels, num_items_in_batch=11)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in trained}
    model.zero_grad()
    ref_logits, ref_iters = reference_forward(model, ids, mask, iter_labels)
    ref_loss = reference_loss(ref_logits, labels, num_items_in_batch=11)
    ref_loss.backward()

    counts = ref_iters[mask.bool()]
    assert (counts == 1).any() and (counts > 1).any()
    assert_close(out.logits.detach(), out.iter_count, ref_logits.detach(), ref_iters, mask, "train forward")
    assert abs(out.loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    lora_grads = 0
    for name, p in trained:
        scale = p.grad.abs().max().item()
        err = (grads[name] - p.grad).abs().max().item()
        assert err <= 1e-5 * max(scale, 1e-3), f"{name}: |grad - reference| = {err:.3g} (max {scale:.3g})"
        lora_grads += "lora_B" in name and scale > 0
    assert lora_grads > 0  # the deeper passes reached the loss


@pytest.mark.parametrize("decider", DECIDERS)
def test_sparse_logits_to_keep_matches_the_reference(decider):
    """logits_to_keep = n: the last n columns' logits (where the decider allows, the LM head runs on
    those and on the tokens that continue only)."""
    for max_iter in (2, 3):
        model, ids, mask, iter_labels, ref_logits, ref_iters = reference_case(decider, max_iter, "left")
        with torch.no_grad():
            for keep in (1, 3):
                out = model(ids, attention_mask=mask, iter_labels=iter_labels, logits_to_keep=keep)
                assert out.logits.shape[1] == keep
                assert_close(out.logits, out.iter_count, ref_logits, ref_iters, mask, f"keep {keep}")


# -- prefill and cached steps ---------------------------------------------------------------------
def run_cached(model, ids, mask, iter_labels, splits: list[int]):
    """Feed ids in consecutive chunks ending at `splits` (and T) through one cache."""
    bounds = [0, *splits, ids.shape[1]]
    cache_, logits, iters = None, [], []
    for a, b in zip(bounds, bounds[1:], strict=False):
        labels = None if iter_labels is None else iter_labels[:, a:b]
        out = model(ids[:, a:b], attention_mask=mask[:, :b], iter_labels=labels, past_key_values=cache_,
                    use_cache=True)
        cache_ = out.past_key_values
        logits.append(out.logits)
        iters.append(out.iter_count)
    return torch.cat(logits, 1), torch.cat(iters, 1)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("max_iter", [2, 3])
@pytest.mark.parametrize("decider", DECIDERS)
def test_prefill_and_cached_steps_match_the_reference(decider, max_iter, padding):
    model, ids, mask, iter_labels, ref_logits, ref_iters = reference_case(decider, max_iter, padding)
    with torch.no_grad():
        for gpu in (False, True):
            with gpu_attention(gpu):
                for splits in ([4, 5, 6, 7, 8], [3]):  # prefill 4 then one token a step; two chunks
                    logits, iters = run_cached(model, ids, mask, iter_labels, splits)
                    assert_close(logits, iters, ref_logits, ref_iters, mask, f"splits {splits}, gpu path {gpu}")


# -- decoding -------------------------------------------------------------------------------------
ENGINES = {  # name: (generate's keyword arguments, GPU attention path on CPU)
    "eager fused": (dict(engine="eager", draft_candidates=1), False),
    "eager fused, 3 drafts": (dict(engine="eager", draft_candidates=3), False),
    "eager unfused": (dict(engine="eager", fused=False), False),
    "eager fused, gpu attention": (dict(engine="eager", draft_candidates=2), True),
    "static": (dict(engine="static"), False),
    "static, gpu attention": (dict(engine="static"), True),
}


@pytest.mark.parametrize("decider, max_iter", [("random", 2), ("mlp", 2), ("random", 3), ("mlp", 3)])
def test_greedy_decoding_matches_the_reference_decoder(decider, max_iter):
    """tah.generate on each engine (max_iter 2 only for the static one), and the plain cached loop,
    give the tokens and pass counts of greedy decoding by the dense reference."""
    model = model64(decider, max_iter, lora_std=2.0)
    ids, mask, _, _ = batch("left", seed=2)
    ids, mask = ids[:, :7], mask[:, :7]
    expected, expected_counts = reference_greedy(model, ids, mask, max_new_tokens=12, eos_token_id=7)
    counts = expected_counts[expected_counts > 0]
    assert (counts == 1).any() and (counts > 1).any()
    plain = generate_reference(model, ids, mask, max_new_tokens=12, eos_token_id=7)
    assert torch.equal(plain.sequences, expected) and torch.equal(plain.iter_counts, expected_counts)
    rejected = False
    for name, (kwargs, gpu) in ENGINES.items():
        if kwargs["engine"] == "static" and max_iter > 2:
            continue
        with gpu_attention(gpu):
            out = generate(model, ids, mask, max_new_tokens=12, eos_token_id=7, **kwargs)
        assert torch.equal(out.sequences, expected), f"{name}: tokens\n{out.sequences}\n{expected}"
        assert torch.equal(out.iter_counts, expected_counts), f"{name}: pass counts"
        rejected |= out.stats.drafts_accepted < out.stats.drafts
    assert rejected  # some draft was rolled back: the fused engines' hard case ran


def test_one_prompt_decodes_as_the_reference_decoder():
    """A batch of one: greedy's default drafts two candidates a hard token."""
    model = model64("mlp", 2, lora_std=2.0, seed=1)
    ids, mask, _, _ = batch("left", seed=3)
    prompt = ids[:1, :6]
    expected, expected_counts = reference_greedy(model, prompt, max_new_tokens=16)
    assert (expected_counts > 1).any()
    for engine in ("eager", "static"):
        out = generate(model, prompt, max_new_tokens=16, engine=engine)
        assert torch.equal(out.sequences, expected), engine
        assert torch.equal(out.iter_counts, expected_counts), engine
