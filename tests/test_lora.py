"""Depth-aware LoRA: depth 0 is the base layer, adapters chosen per token, merge/unmerge, targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import left_padded, randomize_lora, tiny_lm, tiny_tah
from tah import ConfigError, TaHConfig, TaHForCausalLM
from tah.model.lora import DepthLoRALinear, DepthState, add_depth_lora


def random_lora_linear(num_adapters: int, seed: int = 0, bias: bool = True) -> tuple[DepthLoRALinear, DepthState]:
    torch.manual_seed(seed)
    state = DepthState()
    module = DepthLoRALinear(nn.Linear(12, 10, bias=bias), rank=3, alpha=6.0, dropout=0.0,
                             num_adapters=num_adapters, state=state)
    with torch.no_grad():
        for b in module.lora_B:
            b.normal_(std=0.5)
    return module, state


def by_hand(module: DepthLoRALinear, x: torch.Tensor, adapter: int) -> torch.Tensor:
    a, b = module.lora_A[adapter], module.lora_B[adapter]
    return module.base_layer(x) + (x @ a.T @ b.T) * module.scaling


@pytest.mark.parametrize("num_adapters", [1, 2])
def test_depth0_is_exactly_the_base_linear(num_adapters):
    module, state = random_lora_linear(num_adapters)
    x = torch.randn(2, 5, 12)
    state.set(0)
    assert torch.equal(module(x), module.base_layer(x))
    state.set(1)
    assert not torch.allclose(module(x), module.base_layer(x), atol=1e-3), "randomized adapters must matter"


def test_depth0_of_a_wrapped_model_is_the_base_model():
    model = tiny_tah(max_iter=3, lora_per_depth=True)  # randomized LoRA B
    reference = tiny_lm()
    ids, mask = left_padded([9, 6])
    model.depth_state.set(0)
    with torch.no_grad():
        wrapped = model.lm(input_ids=ids, attention_mask=mask).logits
        plain = reference(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(wrapped, plain)


SCATTERED = [[0, 1, 2, 0, 2, 1, 0], [2, 2, 2, 2, 2, 2, 2], [0, 0, 1, 0, 0, 0, 0]]  # masks
COLUMNS = [[1, 2, 0], [1, 2, 0], [1, 2, 0]]  # a fused decode step: one column per depth
ONE_COLUMN = [[0, 2, 0], [0, 2, 0]]  # the deeper queries in one column (a fused step's shortest path)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("tags", [SCATTERED, COLUMNS, ONE_COLUMN], ids=["scattered", "columns", "one_column"])
@pytest.mark.parametrize("num_adapters", [1, 2], ids=["shared", "per_depth"])
def test_per_token_depth_equals_each_depth_run_separately(num_adapters, tags, grad):
    module, state = random_lora_linear(num_adapters)
    module.train(grad)  # decoding: eval mode and no autograd
    depth = torch.tensor(tags)
    x = torch.randn(*depth.shape, 12)
    with torch.set_grad_enabled(grad):
        state.set(depth)
        mixed = module(x)
    assert state.one_column == ((1, 2) if tags is ONE_COLUMN and not grad else None)

    separate = {}
    for d in range(3):
        state.set(d)
        separate[d] = module(x)
    expected = torch.where((depth == 0)[..., None], separate[0],
                           torch.where((depth == 1)[..., None], separate[1], separate[2]))
    torch.testing.assert_close(mixed, expected, atol=1e-6, rtol=1e-6)

    # Which adapter each depth uses: shared -> adapter 0 for every depth >= 1; per depth -> d - 1.
    torch.testing.assert_close(separate[1], by_hand(module, x, 0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(separate[2], by_hand(module, x, num_adapters - 1), atol=1e-6, rtol=1e-6)
    if num_adapters == 2:
        assert not torch.allclose(separate[1], separate[2], atol=1e-3)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(2, 5), (7,)], ids=["3d", "2d"])
def test_a_deeper_training_pass_has_the_adapters_output_and_gradients(shape, bias):
    """A deeper training pass (an int depth under autograd, its own out-of-place form) gives the
    adapted linear's output and the gradients of x, the base weights and the adapter it uses, and
    none to the adapter of another depth."""
    module, state = random_lora_linear(2, bias=bias)
    x = torch.randn(*shape, 12, requires_grad=True)
    upstream = torch.randn(*shape, 10)
    state.set(2)
    out = module(x)
    grads = torch.autograd.grad(out, [x, *module.parameters()], upstream, allow_unused=True)
    expected = by_hand(module, x, 1)
    expected_grads = torch.autograd.grad(expected, [x, *module.parameters()], upstream, allow_unused=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    names = ["x", *(name for name, _ in module.named_parameters())]
    for name, got, want in zip(names, grads, expected_grads, strict=True):
        if want is None:
            assert got is None or not got.any(), name
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    assert module.lora_A[0].grad is None and grads[names.index("lora_A.0")] is None


def test_decoding_sees_adapters_changed_after_a_forward():
    """Without autograd the adapters' transposes are kept between calls: a change in place (an
    optimizer step, load_state_dict) or a cast must reach the next forward."""
    module, state = random_lora_linear(1)
    x = torch.randn(2, 2, 12)
    state.set(torch.tensor([[1, 0], [1, 0]]))
    with torch.no_grad():
        module(x)
        module.lora_B[0].mul_(3.0)
        module.lora_A[0].add_(0.5)
        torch.testing.assert_close(module(x)[:, 0], by_hand(module, x[:, 0], 0), atol=1e-5, rtol=1e-5)
        module.load_state_dict({**module.state_dict(), "lora_B.0": torch.randn(10, 3)})
        torch.testing.assert_close(module(x)[:, 0], by_hand(module, x[:, 0], 0), atol=1e-5, rtol=1e-5)
        module.double()
        out = module(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out[:, 0], by_hand(module, x[:, 0].double(), 0))


# (B, T) = (3, 2) queries, 4 real: a decode step that is one third padding
REAL = [[False, True], [True, True], [False, True]]
ONE_DEEP = [[0, 0], [1, 0], [0, 0]]  # the deep query is packed row 1, not flat row 2
TWO_DEEP = [[0, 1], [1, 0], [0, 0]]  # packed rows 0 and 1: an (N, 1) mask
TWO_DEPTHS = [[0, 2], [1, 0], [0, 0]]  # one query at each depth: a packed row each


@pytest.mark.parametrize("tags", [ONE_DEEP, TWO_DEEP, TWO_DEPTHS, 1], ids=["one", "two", "two_depths", "int"])
def test_a_mostly_padded_decode_step_runs_only_its_real_queries(tags):
    """The linears skip padding queries (DepthState.rows): the real ones get what the whole step
    would give them, the padding ones zeros."""
    module, state = random_lora_linear(2)
    depth = tags if isinstance(tags, int) else torch.tensor(tags)
    real = torch.tensor(REAL)
    x = torch.randn(3, 2, 12)
    with torch.no_grad():
        state.set(depth)
        whole = module(x)
        state.set(depth, real=real)
        assert state.rows is not None and state.rows.tolist() == [1, 2, 3, 5]
        packed = module(x)
    torch.testing.assert_close(packed[real], whole[real], atol=1e-6, rtol=1e-6)
    assert torch.equal(packed[~real], torch.zeros(2, 10))


def test_training_and_mostly_real_steps_are_not_packed():
    _, state = random_lora_linear(1)
    real = torch.tensor(REAL)
    state.set(torch.tensor(TWO_DEEP), real=real)  # under autograd
    assert state.rows is None
    with torch.no_grad():
        state.set(torch.tensor(TWO_DEEP), real=torch.tensor([[False, True], [True, True], [True, True]]))
        assert state.rows is None  # 5 of 6 real
        state.set(0, real=real)
        assert state.rows is not None
        state.set(0)
        assert state.rows is None


def test_per_token_depth_without_deep_tokens_is_the_base_layer():
    module, state = random_lora_linear(2)
    x = torch.randn(2, 4, 12)
    state.set(torch.zeros(2, 4, dtype=torch.long))
    assert torch.equal(module(x), module.base_layer(x))


@pytest.mark.parametrize("per_depth", [False, True], ids=["shared", "per_depth"])
def test_merge_and_unmerge_keep_the_logits(per_depth):
    model = tiny_tah(max_iter=3, lora_per_depth=per_depth, decider="always")
    ids, mask = left_padded([10, 7, 10])
    with torch.no_grad():
        before = model(ids, mask)
        model.merge_lora()
        merged = model(ids, mask)
        model.unmerge_lora()
        after = model(ids, mask)
    assert (before.iter_count[mask.bool()] == 3).all()
    torch.testing.assert_close(merged.logits, before.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=0)
    assert torch.equal(merged.iter_count, before.iter_count)


def test_merged_adapters_are_really_used():
    """The merged forward must read the merged weights (not silently fall back to the base layer)."""
    module, state = random_lora_linear(2)
    x = torch.randn(2, 3, 12)
    state.set(2)
    unmerged = module(x)
    module.merge()
    torch.testing.assert_close(module(x), unmerged, atol=1e-5, rtol=0)
    with torch.no_grad():  # after merging, the merged copy is what runs
        module.lora_B[1].zero_()
    torch.testing.assert_close(module(x), unmerged, atol=1e-5, rtol=0)
    module.unmerge()
    torch.testing.assert_close(module(x), module.base_layer(x), atol=1e-6, rtol=0)


def test_unknown_target_names_raise_config_error_naming_them():
    state = DepthState()
    with pytest.raises(ConfigError, match="nope_proj"):
        add_depth_lora(tiny_lm(), ["nope_proj"], 4, 8.0, 0.0, 1, state)
    with pytest.raises(ConfigError, match="typo_proj"):
        TaHForCausalLM.from_base(tiny_lm(), TaHConfig(lora_target_modules=["typo_proj"], decider_hidden_dims=[16]))


def test_a_misspelled_name_among_good_ones_is_an_error():
    """['q_proj', 'v_prj'] must not silently train q_proj only."""
    lm = tiny_lm()
    with pytest.raises(ConfigError, match="v_prj"):
        add_depth_lora(lm, ["q_proj", "v_prj"], 4, 8.0, 0.0, 1, DepthState())


def test_all_linear_wraps_every_linear_except_lm_head():
    lm = tiny_lm(layers=2)
    linears = {path for path, m in lm.named_modules() if isinstance(m, nn.Linear) and path != "lm_head"}
    assert len(linears) == 2 * 7
    wrapped = add_depth_lora(lm, ["all-linear"], 4, 8.0, 0.0, 1, DepthState())
    assert set(wrapped) == linears
    for path in linears:
        assert isinstance(lm.get_submodule(path), DepthLoRALinear)
    assert type(lm.lm_head) is nn.Linear
    assert lm.get_output_embeddings() is lm.lm_head


def test_named_targets_wrap_only_those():
    lm = tiny_lm(layers=3)
    wrapped = add_depth_lora(lm, ["q_proj", "down_proj"], 4, 8.0, 0.0, 1, DepthState())
    assert sorted(wrapped) == sorted([f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
                                     + [f"model.layers.{i}.mlp.down_proj" for i in range(3)])
    assert type(lm.model.layers[0].self_attn.k_proj) is nn.Linear


def test_fresh_lora_changes_nothing_at_depth1():
    config = TaHConfig(max_iter=3, lora_rank=4, lora_alpha=8.0, decider_hidden_dims=[16], lora_per_depth=True)
    model = TaHForCausalLM.from_base(tiny_lm(), config).eval()
    for module in model.lora.values():
        assert all(torch.count_nonzero(b) == 0 for b in module.lora_B)
        assert all(torch.count_nonzero(a) > 0 for a in module.lora_A)
    ids, mask = left_padded([8, 5])
    with torch.no_grad():
        base = model.lm(input_ids=ids, attention_mask=mask).logits
        for depth in (1, 2):
            model.depth_state.set(depth)
            deeper = model.lm(input_ids=ids, attention_mask=mask).logits
            assert torch.equal(deeper, base), depth
        model.depth_state.set(0)
    # And after a randomization the same comparison does see the adapters.
    randomize_lora(model)
    with torch.no_grad():
        model.depth_state.set(1)
        deeper = model.lm(input_ids=ids, attention_mask=mask).logits
        model.depth_state.set(0)
    assert not torch.allclose(deeper, base, atol=1e-4)
