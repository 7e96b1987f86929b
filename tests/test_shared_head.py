"""The two-pass training step's LM head with products shared between depths (tah.kernels.shared_head):
the same loss and gradients as each pass running its own head, under float32 and bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import left_padded, tiny_tah
from tah.kernels.shared_head import SharedHead
from tah.model.soft_input import soft_embedding, soft_embedding_of_top


def labelled_batch(seed: int = 0):
    ids, mask = left_padded([12, 9, 12], seed=seed)
    labels = ids.masked_fill(mask == 0, -100)
    iter_labels = torch.where(torch.arange(12) % 3 == 0, 2, 1).expand_as(ids).masked_fill(mask == 0, -100)
    return ids, mask, labels, iter_labels


def untie(model):
    """The same model with an LM head of its own (a copy of the tied embedding, then moved off it)."""
    lm = model.lm
    lm.config.tie_word_embeddings = False
    lm.lm_head.weight = torch.nn.Parameter(lm.get_input_embeddings().weight.detach() * 1.5 + 0.01)
    return model


def step_gradients(model, shared: bool, autocast: bool = False):
    ids, mask, labels, iter_labels = labelled_batch()
    model.use_shared_head = shared
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, mask, labels=labels, iter_labels=iter_labels)
    assert (out.iter_count == 2).any()
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
def test_shared_head_gives_each_pass_own_head_gradients(tied):
    model = tiny_tah().train()
    model = model if tied else untie(model)
    loss_apart, apart = step_gradients(model, shared=False)
    loss_shared, shared = step_gradients(model, shared=True)
    torch.testing.assert_close(loss_shared, loss_apart)
    assert shared.keys() == apart.keys() and len(shared) > 10
    for name, grad in apart.items():  # float32 sums in another order: tolerance relative to the scale
        torch.testing.assert_close(shared[name], grad, atol=1e-6 * max(1.0, grad.abs().max().item()), rtol=1e-5,
                                   msg=name)


def test_shared_head_is_used_only_where_it_applies():
    model = tiny_tah().train()
    assert model._shared_head(every_token=True) is not None
    assert model._shared_head(every_token=False) is None  # logits_to_keep, stage 2
    with torch.no_grad():
        assert model._shared_head(every_token=True) is None
    assert tiny_tah(max_iter=3).train()._shared_head(every_token=True) is None
    model.lm.get_output_embeddings().weight.requires_grad_(False)
    assert model._shared_head(every_token=True) is None


@pytest.mark.parametrize("shared", [True, False])
def test_stage1_step_runs_under_bf16_autocast(shared):
    """The recipes train in bf16 (HF Trainer's autocast): our heads' and LoRA's own products must take
    autocast's bf16 outputs with float32 weights. Gradients stay near float32's."""
    model = tiny_tah().train()
    loss32, grads32 = step_gradients(model, shared=shared)
    loss16, grads16 = step_gradients(model, shared=shared, autocast=True)
    torch.testing.assert_close(loss16, loss32, atol=0.05, rtol=0.02)
    assert grads16.keys() == grads32.keys()
    for name, grad in grads32.items():
        assert grads16[name].dtype == grad.dtype and torch.isfinite(grads16[name]).all(), name
        cosine = F.cosine_similarity(grads16[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.95, (name, cosine)


def test_shared_products_match_autograd_even_when_acc_gets_another_gradient():
    """The functions alone, in float64, against plain autograd: with the loss reading only the final
    logits (products shared), and with a second loss on depth 0's logits before the deep rows were
    added (acc's gradient then differs between the heads; they must not share)."""
    gen = torch.Generator().manual_seed(0)
    vocab, width, tokens, k = 11, 4, 6, 3
    index = torch.tensor([1, 4])
    weight0 = torch.randn(vocab, width, generator=gen, dtype=torch.float64)
    hidden0 = torch.randn(1, tokens, width, generator=gen, dtype=torch.float64)
    mix0 = torch.randn(width, width, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    coefficients = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64)

    def gradients(use_shared: bool, early_loss: bool):
        weight, hidden, mix = (t.clone().requires_grad_() for t in (weight0, hidden0, mix0))
        if use_shared:
            shared = SharedHead(weight)
            acc = shared.depth_zero(hidden)
            soft = soft_embedding_of_top(*shared.top_k(acc, index, k), weight)
        else:
            acc = F.linear(hidden.flatten(0, 1), weight)
            soft = soft_embedding(acc[index], weight, k)
        early = (acc * coefficients).sum() if early_loss else 0.0  # saves no acc, which add_deep changes
        deep = torch.tanh(soft @ mix)
        acc = shared.add_deep(acc, deep) if use_shared else acc.index_add(0, index, F.linear(deep, weight))
        (F.cross_entropy(acc, targets) + early).backward()
        return weight.grad, hidden.grad, mix.grad

    for early_loss in (False, True):
        for got, want in zip(gradients(True, early_loss), gradients(False, early_loss), strict=True):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
