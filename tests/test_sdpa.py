"""`tah_sdpa`: HF's sdpa attention without the KV-head copy under a mask on CPU, same results."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tah import TaHConfig, TaHForCausalLM
from tah.kernels.cpu.attention import PACKED_QUERIES
from tah.kernels.masks import packed_mask
from tah.kernels.sdpa import NAME, tah_sdpa_attention


class _Layer(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("queries", [1, 2, 3, 7, PACKED_QUERIES + 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("b", [1, 2])  # packed: 2-3 queries a row (decode steps), any from PACKED_QUERIES
def test_matches_hf_sdpa_with_a_mask(queries, groups, b):
    gen = torch.Generator().manual_seed(queries * 10 + groups)
    kv, s, d = 2, 11, 8
    query = torch.randn(b, kv * groups, queries, d, generator=gen)
    key, value = torch.randn(b, kv, s, d, generator=gen), torch.randn(b, kv, s, d, generator=gen)
    visible = torch.rand(b, 1, queries, s, generator=gen) > 0.3
    visible[..., 0] = True  # every query sees something
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    layer = _Layer(groups)
    ours, _ = tah_sdpa_attention(layer, query, key, value, mask, scaling=d ** -0.5)
    theirs, _ = sdpa_attention_forward(layer, query, key, value, mask, scaling=d ** -0.5)
    assert ours.shape == theirs.shape == (b, queries, kv * groups, d)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("queries", [3, PACKED_QUERIES + 3])
def test_gradients_under_a_mask_match_hf_sdpa(queries):
    """Training's deeper pass backpropagates through these paths (packed from PACKED_QUERIES on)."""
    gen = torch.Generator().manual_seed(queries)
    b, kv, groups, s, d = 2, 2, 2, 80, 8
    inputs = [torch.randn(b, kv * groups, queries, d, generator=gen), torch.randn(b, kv, s, d, generator=gen),
              torch.randn(b, kv, s, d, generator=gen)]
    visible = torch.rand(b, 1, queries, s, generator=gen) > 0.3
    visible[..., 0] = True
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    upstream = torch.randn(b, queries, kv * groups, d, generator=gen)
    grads = []
    for attention in (tah_sdpa_attention, sdpa_attention_forward):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out, _ = attention(_Layer(groups), *leaves, mask, scaling=d ** -0.5)
        out.backward(upstream)
        grads.append([t.grad for t in leaves])
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)



def test_the_packed_mask_is_made_once_per_mask():
    """Every layer of a pass gets the same mask: its per-head copy is made once, not per layer (under
    autograd each layer would save its own), and remade for another group count."""
    visible = torch.rand(2, 1, PACKED_QUERIES, 9, generator=torch.Generator().manual_seed(0)) > 0.3
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    first = packed_mask(mask, 2)
    assert packed_mask(mask, 2) is first
    assert torch.equal(first.view(2, 2, PACKED_QUERIES, 9), mask.expand(2, 2, PACKED_QUERIES, 9))
    regrouped = packed_mask(mask, 4)
    assert regrouped.shape == (2, 1, 4 * PACKED_QUERIES, 9)
    assert torch.equal(regrouped.view(2, 4, PACKED_QUERIES, 9), mask.expand(2, 4, PACKED_QUERIES, 9))

@pytest.mark.parametrize("groups", [2, 4])
def test_a_single_query_without_a_mask_matches_hf_sdpa(groups):
    """The decode step's path: the heads of a KV group become its queries."""
    gen = torch.Generator().manual_seed(groups)
    b, kv, s, d = 3, 2, 13, 8
    query = torch.randn(b, kv * groups, 1, d, generator=gen)
    key, value = torch.randn(b, kv, s, d, generator=gen), torch.randn(b, kv, s, d, generator=gen)
    layer = _Layer(groups)
    ours, _ = tah_sdpa_attention(layer, query, key, value, None, scaling=d ** -0.5)
    theirs, _ = sdpa_attention_forward(layer, query, key, value, None, scaling=d ** -0.5)
    assert ours.shape == theirs.shape == (b, 1, kv * groups, d)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_wrapping_switches_sdpa_models_and_keeps_their_outputs():
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    bare = Qwen3ForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: HF builds a mask, so the grouped-heads path runs
    expected = bare(ids, attention_mask=mask).logits
    model = TaHForCausalLM.from_base(bare, TaHConfig(max_iter=2, decider="never")).eval()
    assert model.lm.config._attn_implementation == NAME
    got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


def test_other_implementations_are_left_alone():
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    lm = Qwen3ForCausalLM._from_config(config, attn_implementation="eager")
    TaHForCausalLM.from_base(lm, TaHConfig(max_iter=2, decider="never"))
    assert lm.config._attn_implementation == "eager"


@pytest.mark.parametrize("queries", [1, 3, 70])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gpu_masked_path_matches_hf_sdpa_forward_and_backward(queries, groups):
    """The CUDA path (group heads packed as queries, mask cast to the queries' dtype) computes HF's
    sdpa, gradients too; a query that sees nothing (padding) stays finite and passes no NaN back."""
    from tah.kernels.cuda.attention import masked_attention_gpu

    gen = torch.Generator().manual_seed(queries * 10 + groups)
    b, kv, s, d = 2, 2, 40, 8
    inputs = [torch.randn(b, kv * groups, queries, d, generator=gen), torch.randn(b, kv, s, d, generator=gen),
              torch.randn(b, kv, s, d, generator=gen)]
    visible = torch.rand(b, 1, queries, s, generator=gen) > 0.3
    visible[..., 0] = True
    visible[1, :, -1] = False  # a padding query of row 1 sees nothing
    mask = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, -1e300)  # below float32
    upstream = torch.randn(b, queries, kv * groups, d, generator=gen)
    upstream[1, -1] = 0  # nobody reads a padding query's output
    results = []
    for attention in ("ours", "hf"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        if attention == "ours":  # a float64 mask, as autocast's float32 one for bf16 queries: cast inside
            out = masked_attention_gpu(*leaves, mask, groups, scaling=d ** -0.5)
        else:
            lowest = torch.finfo(torch.float32).min
            out, _ = sdpa_attention_forward(_Layer(groups), *leaves, mask.clamp(min=lowest).float(), scaling=d ** -0.5)
        out.backward(upstream)
        results.append([out] + [t.grad for t in leaves])
    for ours, theirs in zip(*results, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
