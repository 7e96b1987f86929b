"""`tah prune`: layer importance, greedy removal, a pruned model that saves and reloads as plain HF."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import left_padded, tiny_lm
from tah.errors import ConfigError, InputError
from tah.train.prune import (
    calibration_loss,
    choose_layers,
    layer_importance,
    layers_removed,
    prune_layers,
)

LAYERS, IDLE = 4, 2  # a 4-layer model whose layer 2 passes the residual stream through unchanged


def model_with_idle_layer(arch: str = "qwen3", idle: int = IDLE) -> torch.nn.Module:
    """Tiny random LM; layer `idle` writes nothing to the residual stream (o_proj, down_proj zero)."""
    model = tiny_lm(arch, seed=1, layers=LAYERS)
    with torch.no_grad():
        for p in model.parameters():  # larger weights: every other layer changes predictions a lot
            p.mul_(4.0)
        layer = model.model.layers[idle]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    return model


def calibration(model, lengths=(12, 9, 12, 5), seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two left-padded batches labelled with the full model's own greedy predictions (so removing a
    working layer raises the loss), -100 on padding and on each row's first token."""
    ids, mask = left_padded(list(lengths), seed=seed)
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        guess = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.argmax(-1)
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = guess[:, :-1]
    labels = labels.masked_fill(mask == 0, -100)
    labels[:, :1] = -100
    half = len(lengths) // 2
    return [dict(input_ids=ids[s], attention_mask=mask[s], labels=labels[s]) for s in (slice(0, half), slice(half, None))]


def rebuilt_without(model, drop: list[int]) -> torch.nn.Module:
    """The model with layers `drop` removed, built independently of prune.py: a fresh HF model of
    fewer layers loaded with the renumbered weights."""
    config = copy.deepcopy(model.config)
    kept = [i for i in range(config.num_hidden_layers) if i not in drop]
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    fresh = type(model)(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            if int(index) not in kept:
                continue
            key = f"model.layers.{kept.index(int(index))}.{rest}"
        state[key] = value
    fresh.load_state_dict(state)
    return fresh


def mean_ce(model, batches) -> float:
    """Mean next-token CE over all labelled tokens, padding removed row by row (no masks involved)."""
    logits, targets = [], []
    with torch.no_grad():
        for batch in batches:
            for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
                real = mask.bool()
                logits.append(model(input_ids=ids[real][None]).logits[0, :-1])
                targets.append(labels[real][1:])
    return F.cross_entropy(torch.cat(logits).float(), torch.cat(targets), ignore_index=-100).item()


# -- measuring -------------------------------------------------------------------------------------
def test_calibration_loss_is_mean_ce_over_labelled_tokens_for_any_padding():
    model = model_with_idle_layer()
    batches = calibration(model)
    assert calibration_loss(model, batches) == pytest.approx(mean_ce(model, batches), rel=1e-5)


def test_idle_layer_is_cheapest_and_increases_match_independent_losses():
    model = model_with_idle_layer()
    batches = calibration(model)
    base = mean_ce(model, batches)
    expected = [mean_ce(rebuilt_without(model, [i]), batches) - base for i in range(LAYERS)]
    assert all(e > 0.05 for i, e in enumerate(expected) if i != IDLE), "fixture: working layers must matter"

    increases = layer_importance(model, batches)
    assert increases == pytest.approx(expected, abs=1e-5)
    assert abs(increases[IDLE]) < 1e-5
    assert min(range(LAYERS), key=increases.__getitem__) == IDLE
    # The model is left as it was.
    assert len(model.model.layers) == LAYERS and model.config.num_hidden_layers == LAYERS
    assert mean_ce(model, batches) == base


def test_greedy_removes_the_idle_layer_then_re_measures():
    model = model_with_idle_layer()
    batches = calibration(model)
    report = choose_layers(model, batches, k=2)
    assert report.removed[0] == IDLE
    base = mean_ce(model, batches)
    after_idle = mean_ce(rebuilt_without(model, [IDLE]), batches)
    second = {j: mean_ce(rebuilt_without(model, [IDLE, j]), batches) - after_idle for j in range(LAYERS) if j != IDLE}
    assert report.rounds[1] == pytest.approx(second, abs=1e-5)
    assert report.removed[1] == min(second, key=second.get)
    assert report.base_loss == pytest.approx(base, rel=1e-5)
    assert report.final_loss == pytest.approx(mean_ce(rebuilt_without(model, report.removed), batches), rel=1e-5)
    assert report.layer_increase == pytest.approx(list(report.rounds[0].values()))


def test_layers_removed_restores_the_model_on_error():
    model = model_with_idle_layer()
    before = [m.self_attn.layer_idx for m in model.model.layers]
    with pytest.raises(RuntimeError), layers_removed(model, [0]):
        assert model.model.layers[0].self_attn.layer_idx == 0 and model.config.num_hidden_layers == LAYERS - 1
        raise RuntimeError("boom")
    assert [m.self_attn.layer_idx for m in model.model.layers] == before
    assert model.config.num_hidden_layers == LAYERS and len(model.config.layer_types) == LAYERS


# -- the pruned model ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_pruned_model_round_trips_and_keeps_logits_of_an_idle_layer(arch, tmp_path):
    full = model_with_idle_layer(arch)
    pruned = prune_layers(copy.deepcopy(full), [IDLE])
    assert pruned.config.num_hidden_layers == LAYERS - 1 and len(pruned.model.layers) == LAYERS - 1
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == list(range(LAYERS - 1))
    if getattr(full.config, "layer_types", None):
        assert len(pruned.config.layer_types) == LAYERS - 1

    pruned.save_pretrained(tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert loaded.config.num_hidden_layers == LAYERS - 1
    ids, mask = left_padded([10, 7], seed=3)
    with torch.no_grad():
        want = full(input_ids=ids, attention_mask=mask).logits
        got = pruned(input_ids=ids, attention_mask=mask).logits
        again = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(again, got, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_pruned_model_decodes_with_a_kv_cache_like_the_full_model():
    # A stale layer_idx would make the cache index past its last layer (or mix two layers' KV).
    full = model_with_idle_layer()
    pruned = prune_layers(copy.deepcopy(full), [0, IDLE])
    rebuilt = rebuilt_without(full, [0, IDLE])
    ids, mask = left_padded([6, 4], seed=5)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(pruned.generate(ids, **kwargs), rebuilt.generate(ids, **kwargs))
    no_idle = prune_layers(copy.deepcopy(full), [IDLE])
    assert torch.equal(no_idle.generate(ids, **kwargs), full.generate(ids, **kwargs))


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, -1, LAYERS, LAYERS + 1])
def test_choose_layers_rejects_k_outside_one_to_layers_minus_one(k):
    model = model_with_idle_layer()
    with pytest.raises(ConfigError, match=r"--layers .* \[1, 3\]"):
        choose_layers(model, calibration(model), k=k)


@pytest.mark.parametrize("layers", [[LAYERS], [-1], [1, 1], list(range(LAYERS))])
def test_prune_layers_rejects_bad_indices(layers):
    with pytest.raises(InputError):
        prune_layers(model_with_idle_layer(), layers)


def test_calibration_without_labels_is_an_input_error():
    model = model_with_idle_layer()
    batches = calibration(model)
    for batch in batches:
        batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(InputError, match="no labelled token"):
        calibration_loss(model, batches)


def test_report_json_names_layers_by_original_index():
    model = model_with_idle_layer()
    report = choose_layers(model, calibration(model), k=2)
    values = json.loads(report.to_json())
    assert values["removed"] == report.removed and len(values["layer_increase"]) == LAYERS
    assert set(values["rounds"][1]) == {str(i) for i in range(LAYERS) if i != IDLE}
