"""Depth 0 is the base model: with no token iterating, TaH's logits are the wrapped HF model's."""

from __future__ import annotations

import pytest
import torch

from conftest import left_padded, randomize_lora, tiny_lm
from tah import TaHConfig, TaHForCausalLM

TOL = 1e-5
ARCHS = ["qwen3", "llama"]
# "never": adapters exist (and are randomized) but no token ever uses them; max_iter=1: no adapters at all
MODES = {
    "never": dict(max_iter=2, decider="never"),
    "never_max_iter_3": dict(max_iter=3, decider="never", lora_per_depth=True),
    "max_iter_1": dict(max_iter=1, decider="mlp"),
}


def pair(arch: str, mode: str, seed: int = 0) -> tuple[torch.nn.Module, TaHForCausalLM]:
    """(bare HF model, TaH around an identical copy): from_base wraps its model in place."""
    bare = tiny_lm(arch, seed=seed)
    config = TaHConfig(input_topk=8, lora_rank=4, lora_alpha=8.0, decider_hidden_dims=[16], decider_topk=8,
                       decider_expansion=2, **MODES[mode])
    tah = TaHForCausalLM.from_base(tiny_lm(arch, seed=seed), config)
    randomize_lora(tah, seed=seed)
    if config.max_iter > 1:
        assert tah.lora and all(bool((b != 0).any()) for m in tah.lora.values() for b in m.lora_B)
    else:
        assert not tah.lora
    return bare.eval(), tah.eval()


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as HF `generate` makes them for a left-padded batch."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def bare_logits(bare: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        if mask is None:
            return bare(input_ids=ids).logits
        return bare(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits


def plain_batch() -> tuple[torch.Tensor, None]:
    return torch.randint(3, 64, (2, 14), generator=torch.Generator().manual_seed(1)), None


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return left_padded([14, 9, 3], seed=1)


def assert_equal_where_valid(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> None:
    keep = torch.ones(ours.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours[keep], ref[keep], rtol=0, atol=TOL)


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "left_padded"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_the_bare_model(arch, mode, padded):
    bare, tah = pair(arch, mode)
    ids, mask = padded_batch() if padded else plain_batch()
    with torch.no_grad():
        out = tah(ids, attention_mask=mask)
    assert_equal_where_valid(out.logits, bare_logits(bare, ids, mask), mask)
    assert torch.equal(out.iter_count, torch.ones_like(ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_would_change_the_output(arch):
    """Guards the test above: the randomized adapters are strong enough to show if depth 0 used them."""
    bare, tah = pair(arch, "never")
    ids, _ = plain_batch()
    tah.depth_state.set(1)  # run the wrapped model with every linear's adapter on
    try:
        with torch.no_grad():
            adapted = tah.lm(input_ids=ids).logits
    finally:
        tah.depth_state.set(0)
    assert (adapted - bare_logits(bare, ids, None)).abs().max() > 100 * TOL


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "left_padded"])
@pytest.mark.parametrize("mode", ["never", "max_iter_1"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_then_decode_equals_the_bare_model(arch, mode, padded):
    """A prefill of all but the last 3 tokens, then 3 one-token steps, reproduce one bare forward."""
    bare, tah = pair(arch, mode)
    ids, mask = padded_batch() if padded else plain_batch()
    reference = bare_logits(bare, ids, mask)
    prefill = ids.shape[1] - 3

    with torch.no_grad():
        out = tah(ids[:, :prefill], attention_mask=None if mask is None else mask[:, :prefill], use_cache=True)
        pieces, counts = [out.logits], [out.iter_count]
        for t in range(prefill, ids.shape[1]):
            step_mask = None if mask is None else mask[:, : t + 1]
            out = tah(ids[:, t : t + 1], attention_mask=step_mask, past_key_values=out.past_key_values,
                      use_cache=True)
            assert out.logits.shape == (ids.shape[0], 1, reference.shape[-1])
            pieces.append(out.logits)
            counts.append(out.iter_count)
    assert_equal_where_valid(torch.cat(pieces, dim=1), reference, mask)
    assert torch.equal(torch.cat(counts, dim=1), torch.ones_like(ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_never_decider_in_training_mode_with_labels(arch):
    """Training mode (dropout 0) with labels: same logits, and the loss is the bare model's HF loss."""
    bare, tah = pair(arch, "never")
    ids, _ = plain_batch()
    labels = ids.clone()
    labels[:, :3] = -100
    tah.train()
    with torch.no_grad():
        out = tah(ids, labels=labels)
        ref = bare(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=TOL)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=TOL)
    assert torch.equal(out.iter_count, torch.ones_like(ids))


@pytest.mark.parametrize("arch, scaling", [("granite", dict(logits_scaling=4.0)), ("cohere", dict(logit_scale=0.25))])
def test_our_lm_head_scales_logits_like_the_model_does(arch, scaling):
    """Prefill keeps few logits and runs the LM head itself (`_lm_head`): for models whose head
    scales its logits (Granite divides, Cohere multiplies), it must scale alike."""
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

    config_cls, model_cls = {"granite": (GraniteConfig, GraniteForCausalLM), "cohere": (CohereConfig, CohereForCausalLM)}[arch]
    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, **scaling)
    torch.manual_seed(0)
    bare = model_cls(config).eval()
    torch.manual_seed(0)
    tah = TaHForCausalLM.from_base(model_cls(config).eval(), TaHConfig(max_iter=2, decider="never"))
    ids, mask = left_padded([6, 4])
    with torch.no_grad():
        expected = bare(ids, attention_mask=mask).logits[:, -1:]
        got = tah(ids, attention_mask=mask, logits_to_keep=1).logits
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)
