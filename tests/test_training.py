"""Training behaviour: which parameters learn in each stage, the two losses, oracle routing, padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import left_padded, tiny_tah
from tah.kernels.host_reads import HostReads
from tah.model.lora import DepthLoRALinear

MAX_ITER = 2


def batch(lengths=(12, 12, 12), seed: int = 0):
    """ids, attention mask, labels (= ids, -100 on padding) and oracle pass counts for a tiny batch.

    iter_labels: -100 on the first two positions of each row and on padding, 2 on every third token,
    1 elsewhere, so some but not all tokens take a second pass.
    """
    ids, mask = left_padded(list(lengths), seed=seed)
    labels = ids.masked_fill(mask == 0, -100)
    iter_labels = torch.ones_like(ids)
    iter_labels[:, ::3] = 2
    iter_labels[:, :2] = -100
    iter_labels = iter_labels.masked_fill(mask == 0, -100)
    return ids, mask, labels, iter_labels


def lora_params(model):
    return [p for module in model.lora.values() for p in [*module.lora_A, *module.lora_B]]


def base_params(model):
    lora = {id(p) for p in lora_params(model)}
    return [p for p in model.lm.parameters() if id(p) not in lora]


def q_proj(model) -> DepthLoRALinear:
    module = model.lm.model.layers[0].self_attn.q_proj
    assert isinstance(module, DepthLoRALinear)
    return module


# -- stage 1 ---------------------------------------------------------------------------------------
def test_stage1_gradients_reach_lora_and_base_but_not_decider():
    model = tiny_tah(max_iter=MAX_ITER).train()
    ids, mask, labels, iter_labels = batch()
    out = model(ids, mask, labels=labels, iter_labels=iter_labels)
    assert (out.iter_count == 2).any(), "the oracle labels must send some tokens to depth 1"
    out.loss.backward()

    assert model.lora, "the tiny model must have LoRA modules"
    for path, module in model.lora.items():
        for name, p in [("lora_A", module.lora_A[0]), ("lora_B", module.lora_B[0])]:
            assert p.requires_grad, f"{path}.{name} must train in stage 1"
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {path}.{name}"

    embed = model.lm.get_input_embeddings().weight
    assert embed.grad is not None and embed.grad.abs().sum() > 0
    q_base = q_proj(model).base_layer.weight
    assert q_base.requires_grad and q_base.grad is not None and q_base.grad.abs().sum() > 0

    decider_params = list(model.decider.parameters())
    assert decider_params
    for p in decider_params:
        assert not p.requires_grad
        assert p.grad is None


def _our_loss(out, labels):
    return out.loss


def _our_loss_plus_a_term_on_the_logits(out, labels):
    return out.loss + out.logits.square().mean()


def _user_cross_entropy(out, labels):
    logits = out.logits[:, :-1].flatten(0, 1)
    return F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)


def _user_sum_with_a_logits_shaped_term(out, labels, shift):
    # autograd hands the very same gradient tensor to both sides of the sum: adding into it in place
    # would corrupt `shift`'s gradient, whose backward runs later (it was made before the forward)
    return (out.logits + shift).sin().sum()


@pytest.mark.parametrize("shared_head", [True, False])
@pytest.mark.parametrize("loss_fn", [_our_loss, _our_loss_plus_a_term_on_the_logits, _user_cross_entropy,
                                     _user_sum_with_a_logits_shaped_term])
def test_stage1_gradients_equal_plain_autograd_indexing(monkeypatch, loss_fn, shared_head):
    """Gathering the hard tokens' depth-0 logits through rows_grad (their gradient added in place when
    only autograd holds acc's gradient), or through the shared head (shared_head.py), changes no
    gradient, whatever loss reads the logits."""
    import tah.kernels.rows_grad as rows_grad

    ids, mask, labels, iter_labels = batch()

    def gradients(shared: bool):
        torch.manual_seed(0)
        model = tiny_tah(max_iter=MAX_ITER).train()
        model.use_shared_head = shared
        for module in model.lora.values():  # non-zero adapters, so every path carries gradient
            torch.nn.init.normal_(module.lora_B[0], std=0.1)
        given = labels if loss_fn in (_our_loss, _our_loss_plus_a_term_on_the_logits) else None
        leaf = torch.nn.Parameter(torch.linspace(-1, 1, ids.numel() * model.config.vocab_size).view(*ids.shape, -1))
        shift = leaf * 2
        out = model(ids, mask, labels=given, iter_labels=iter_labels)
        loss = loss_fn(out, labels, shift) if loss_fn is _user_sum_with_a_logits_shaped_term else loss_fn(out, labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return grads | ({"shift": leaf.grad} if leaf.grad is not None else {})

    fast = gradients(shared_head)
    monkeypatch.setattr(rows_grad.GatherRows, "apply", staticmethod(lambda acc, index, rows: acc[index]))
    monkeypatch.setattr(rows_grad.DepthZeroLogits, "apply", staticmethod(lambda logits, rows: logits.flatten(0, 1)))
    plain = gradients(False)
    assert fast.keys() == plain.keys() and len(fast) > 10
    for name, grad in plain.items():  # float32 sums in another order: tolerance relative to the scale
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(fast[name], grad, atol=1e-6 * scale, rtol=1e-5, msg=name)


def test_stage1_backward_adds_the_hard_rows_in_place(monkeypatch):
    """With our loss, the rows' gradient goes into acc's gradient in place (no full-size copy);
    when a loss of the user's reads the logits (a view), it is added out of place."""
    import tah.kernels.rows_grad as rows_grad

    seen = []
    original = rows_grad._only_autograd_holds
    monkeypatch.setattr(rows_grad, "_only_autograd_holds", lambda grad: seen.append(original(grad)) or seen[-1])
    model = tiny_tah(max_iter=MAX_ITER).train()
    model.use_shared_head = False  # which gathers no rows (see test_shared_head.py)
    ids, mask, labels, iter_labels = batch()
    model(ids, mask, labels=labels, iter_labels=iter_labels).loss.backward()
    assert seen == [True]
    _user_cross_entropy(model(ids, mask, iter_labels=iter_labels), labels).backward()
    assert seen == [True, False]


def test_stage1_loss_is_shifted_cross_entropy_of_returned_logits():
    model = tiny_tah(max_iter=MAX_ITER).train()
    ids, mask, labels, iter_labels = batch(lengths=(10, 12, 7))
    labels = labels.clone()
    labels[0, 5] = -100  # an ignored label in the middle of a row, too
    out = model(ids, mask, labels=labels, iter_labels=iter_labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(),
                               labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    # Labels are shifted inside: the first label of a row is nobody's target, changing it changes nothing.
    changed = labels.clone()
    changed[:, 0] = 5
    again = model(ids, mask, labels=changed, iter_labels=iter_labels)
    torch.testing.assert_close(again.loss, out.loss, atol=1e-6, rtol=1e-6)


def test_stage1_training_lowers_the_loss():
    torch.manual_seed(0)
    model = tiny_tah(max_iter=MAX_ITER).train()
    ids, mask, labels, iter_labels = batch(lengths=(16, 16), seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    initial = model(ids, mask, labels=labels, iter_labels=iter_labels).loss.item()
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(ids, mask, labels=labels, iter_labels=iter_labels).loss
        loss.backward()
        optimizer.step()
    final = model(ids, mask, labels=labels, iter_labels=iter_labels).loss.item()
    assert final < 0.8 * initial, (initial, final)


# -- stage 2 ---------------------------------------------------------------------------------------
def assert_stage2_gradients(model, out):
    assert not out.logits.requires_grad, "stage 2 must not build a graph through the frozen LM"
    out.loss.backward()
    decider_params = list(model.decider.parameters())
    assert all(p.requires_grad for p in decider_params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in decider_params)
    for p in [*base_params(model), *lora_params(model)]:
        assert not p.requires_grad
        assert p.grad is None


def test_stage2_only_the_decider_learns_after_set_training_stage():
    model = tiny_tah(max_iter=MAX_ITER, decider="mlp").train()
    model.set_training_stage(2)
    assert model.tah_config.training_stage == 2
    ids, mask, labels, iter_labels = batch()
    assert_stage2_gradients(model, model(ids, mask, labels=labels, iter_labels=iter_labels))


def test_stage2_only_the_decider_learns_from_config():
    model = tiny_tah(max_iter=MAX_ITER, decider="mlp", training_stage=2).train()
    ids, mask, labels, iter_labels = batch()
    assert_stage2_gradients(model, model(ids, mask, labels=labels, iter_labels=iter_labels))


def test_back_to_stage1_unfreezes_the_model():
    model = tiny_tah(max_iter=MAX_ITER, training_stage=2)
    model.set_training_stage(1)
    assert all(p.requires_grad for p in model.lm.parameters())
    assert not any(p.requires_grad for p in model.decider.parameters())


def test_stage2_loss_is_weighted_bce_of_depth0_decider_scores():
    pos_weight = 3.0
    model = tiny_tah(max_iter=2, decider="mlp", training_stage=2, pos_weight=pos_weight).train()
    ids, mask, labels, iter_labels = batch(lengths=(12, 9, 12))
    iter_labels = iter_labels.clone()
    iter_labels[1, -1] = 3  # above max_iter: still "continue" at depth 0
    out = model(ids, mask, labels=labels, iter_labels=iter_labels)

    # The depth-0 pass of a TaH model is the base model: its logits and hidden states feed the decider.
    with torch.no_grad():
        base = model.lm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        scores = model.decider.scores(base.logits, base.hidden_states)
    keep = mask.bool() & (iter_labels != -100)
    targets = (iter_labels[keep] > 1).float()
    assert 0 < targets.sum() < targets.numel()
    expected = F.binary_cross_entropy_with_logits(scores[keep], targets, pos_weight=torch.tensor(pos_weight))
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-5, rtol=1e-5)
    # pos_weight matters: the unweighted BCE is a different number.
    unweighted = F.binary_cross_entropy_with_logits(scores[keep], targets)
    assert abs(unweighted.item() - out.loss.item()) > 1e-3


def test_stage2_training_lowers_the_bce():
    torch.manual_seed(0)
    model = tiny_tah(max_iter=MAX_ITER, decider="mlp", training_stage=2).train()
    ids, mask, labels, iter_labels = batch(lengths=(16, 16), seed=5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert all(id(p) in {id(q) for q in model.decider.parameters()}
               for group in optimizer.param_groups for p in group["params"])
    initial = model(ids, mask, labels=labels, iter_labels=iter_labels).loss.item()
    for _ in range(20):
        optimizer.zero_grad()
        model(ids, mask, labels=labels, iter_labels=iter_labels).loss.backward()
        optimizer.step()
    final = model(ids, mask, labels=labels, iter_labels=iter_labels).loss.item()
    assert final < 0.8 * initial, (initial, final)


# -- routing and padding ---------------------------------------------------------------------------
def test_iter_labels_choose_who_iterates():
    max_iter = 3
    # "always" would send everyone to depth 2: the oracle labels must override any decider.
    model = tiny_tah(max_iter=max_iter, decider="always")
    ids, mask = left_padded([10, 10])
    iter_labels = torch.tensor([
        [-100, -100, 1, 2, 3, 5, 1, 3, 2, 1],
        [2, 1, -100, 3, 1, 1, 2, -100, 4, 2],
    ])
    with torch.no_grad():
        out = model(ids, mask, iter_labels=iter_labels)
    expected = torch.where(iter_labels != -100, iter_labels.clamp(max=max_iter), torch.ones_like(iter_labels))
    assert torch.equal(out.iter_count, expected)


def test_padding_never_iterates_even_if_labelled():
    model = tiny_tah(max_iter=2, decider="never")
    ids, mask = left_padded([6, 9])
    iter_labels = torch.full_like(ids, 2)  # says "iterate" on padding too
    with torch.no_grad():
        out = model(ids, mask, iter_labels=iter_labels)
    assert torch.equal(out.iter_count, torch.where(mask.bool(), 2, 1))


def test_left_padded_batch_gives_finite_gradients_stage1():
    model = tiny_tah(max_iter=3).train()
    ids, mask, labels, iter_labels = batch(lengths=(5, 11, 0, 8))  # row 2 is nothing but padding
    iter_labels = iter_labels.clone()
    iter_labels[:, -1] = torch.where(mask[:, -1].bool(), 3, -100)  # some tokens reach depth 2 as well
    out = model(ids, mask, labels=labels, iter_labels=iter_labels)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(out.logits[mask.bool()]).all()
    assert (out.iter_count == 3).any()
    out.loss.backward()
    grads = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    assert grads
    for name, grad in grads:
        assert torch.isfinite(grad).all(), f"non-finite gradient in {name}"


def test_left_padded_batch_gives_finite_gradients_stage2():
    model = tiny_tah(max_iter=2, training_stage=2).train()
    ids, mask, labels, iter_labels = batch(lengths=(5, 11, 0, 8))
    out = model(ids, mask, labels=labels, iter_labels=iter_labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.decider.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_valid_rows_do_not_depend_on_a_padding_row():
    """A fully padded row in the batch must not change the other rows' loss contribution."""
    model = tiny_tah(max_iter=2).train()
    ids, mask, labels, iter_labels = batch(lengths=(7, 7))
    alone = model(ids, mask, labels=labels, iter_labels=iter_labels)
    pad = torch.zeros(1, ids.shape[1], dtype=torch.long)
    padded = model(torch.cat([ids, pad]), torch.cat([mask, pad]), labels=torch.cat([labels, pad - 100]),
                   iter_labels=torch.cat([iter_labels, pad - 100]))
    torch.testing.assert_close(padded.loss, alone.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.logits[:2], alone.logits, atol=1e-5, rtol=1e-5)


def test_our_lm_head_linear_has_linears_gradients():
    """Depth >= 1 runs the LM head through `_HeadLinear` (a weight gradient of its own, not a view):
    its gradients are F.linear's, with and without a bias."""
    from tah.model.step import _HeadLinear

    torch.manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_HeadLinear.apply, (hidden, weight, bias))
    assert torch.autograd.gradcheck(lambda h, w: _HeadLinear.apply(h, w, None), (hidden, weight))
    grad_weight = torch.autograd.grad(_HeadLinear.apply(hidden, weight, None).square().sum(), weight)[0]
    assert grad_weight.is_contiguous() and grad_weight._base is None


@pytest.mark.parametrize("num_items", [None, 40])
def test_hard_token_weight_scales_the_ce_of_the_labelled_hard_tokens(num_items):
    """Stage 1 with `hard_token_weight` w: (sum of CE over supervised tokens, the hard ones counted w
    times) / (their count, or HF's num_items_in_batch), the original code's weighted loss."""

    ids, mask = left_padded([12, 9, 12])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt
    gen = torch.Generator().manual_seed(3)
    iter_labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, 2, 1).masked_fill(mask == 0, -100)
    model = tiny_tah(decider="oracle").train()
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    plain = model(input_ids=ids, attention_mask=mask, labels=labels, iter_labels=iter_labels, **extra)
    model.tah_config = model.tah_config.replace(hard_token_weight=3.0)
    weighted = model(input_ids=ids, attention_mask=mask, labels=labels, iter_labels=iter_labels, **extra)

    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    ce = F.cross_entropy(weighted.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                         reduction="none").view_as(targets)
    hard = (iter_labels >= 2) & (targets != -100)
    count = (targets != -100).sum() if num_items is None else num_items
    torch.testing.assert_close(weighted.logits, plain.logits)  # the forward is the same; only the loss weighs
    torch.testing.assert_close(plain.loss, ce.sum() / count)
    torch.testing.assert_close(weighted.loss, (ce.sum() + 2.0 * ce[hard].sum()) / count)
    assert hard.any() and weighted.loss > plain.loss


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("max_iter", [2, 3])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_a_training_forward_reads_the_device_once(max_iter, padding, stage):
    """Issue 26: on a GPU every read of a tensor's value makes the host wait for the device, and a
    stage-1 step read 14 times (stage 2: 8). With oracle labels every pass's tokens are known from
    one read (the forward's plan): forward and backward read nothing else, padded or not, at any
    depth, in either stage (stage 2's frozen passes run without autograd)."""
    model = tiny_tah(max_iter=max_iter, decider="mlp").train()
    model.set_training_stage(stage)
    lengths = [24, 30, 17, 30] if padding != "none" else [30] * 4
    ids, mask = left_padded(lengths, seed=0)
    if padding == "right":
        ids, mask = ids.flip(1), mask.flip(1)
    iter_labels = torch.ones_like(ids)
    iter_labels[:, ::3] = 2
    iter_labels[:, ::6] = max_iter
    iter_labels = iter_labels.masked_fill(mask == 0, -100)
    with HostReads() as reads:
        out = model(ids, attention_mask=mask if padding != "none" else None, labels=ids, iter_labels=iter_labels)
        out.loss.backward()
    assert reads.count == 1, reads.where
    assert int(out.iter_count.max()) == max_iter  # every depth ran
