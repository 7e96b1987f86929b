"""`tah.kernels.cpu.few_rows`: decode-sized products in the layout this machine runs fastest, same results."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import tah.kernels.cpu.few_rows as few_rows
from conftest import left_padded
from tah.generation import generate
from test_generation import strong_model


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(few_rows, "_choices", {})
    monkeypatch.setattr(few_rows, "_best", {})


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("features", [700, few_rows.ROW_COPY_FEATURES + 5])  # wide: transposed a row at a time
def test_every_candidate_computes_f_linear(rows, with_bias, features):
    gen = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, 96, generator=gen), torch.randn(features, 96, generator=gen)
    bias = torch.randn(features, generator=gen) if with_bias else None
    expected = F.linear(x, weight, bias)
    for candidate in few_rows._candidates(rows):
        out = candidate(x, weight, bias)
        assert out.shape == expected.shape and out.is_contiguous(), candidate.__name__
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=candidate.__name__)


def test_the_fastest_candidate_is_kept_after_its_trials(monkeypatch):
    def slow(x, weight, bias):  # 20 ms: on a loaded machine 2 ms lost to `fast`'s delayed trials once
        time.sleep(0.02)
        return F.linear(x, weight, bias)

    def fast(x, weight, bias):
        return F.linear(x, weight, bias)

    monkeypatch.setattr(few_rows, "_candidates", lambda rows: [slow, fast])
    x, weight = torch.randn(2, 3, 64), torch.randn(1024, 64)  # 6 rows in a (B, T, in) input
    with torch.no_grad():
        for call in range(2 * few_rows.TRIALS):
            assert few_rows.chosen() == {}, f"chosen after {call} calls"
            out = few_rows.linear(x, weight)
            assert out.shape == (2, 3, 1024)
            torch.testing.assert_close(out, F.linear(x, weight))
        assert few_rows.chosen() == {(6, 1024, 64, torch.float32): "fast"}


def test_training_small_weights_and_many_rows_keep_f_linear():
    weight = torch.randn(1024, 64, requires_grad=True)
    x = torch.randn(4, 64)
    out = few_rows.linear(x, weight)  # under autograd
    assert out.requires_grad and torch.equal(out, F.linear(x, weight))
    with torch.no_grad():
        small = torch.randn(16, 64)
        assert torch.equal(few_rows.linear(x, small), F.linear(x, small))
        many = torch.randn(few_rows.MAX_ROWS + 1, 64)
        assert torch.equal(few_rows.linear(many, weight), F.linear(many, weight))
    assert few_rows.chosen() == {} and few_rows._choices == {} and few_rows._best == {}


@pytest.mark.parametrize("fused", [True, False])
def test_decoding_through_few_rows_gives_the_same_tokens(fused, monkeypatch):
    """With the tiny model's linears and LM head on the few_rows path (every candidate tried, then
    the fastest), greedy decoding gives the tokens and pass counts of plain F.linear."""
    model = strong_model(2, rate=0.3)
    ids, mask = left_padded([5, 9, 3, 7], seed=1)
    monkeypatch.setattr(few_rows, "MAX_ROWS", 0)
    plain = generate(model, ids, mask, max_new_tokens=24, fused=fused)
    monkeypatch.setattr(few_rows, "MAX_ROWS", 16)
    monkeypatch.setattr(few_rows, "MIN_WEIGHT", 0)
    monkeypatch.setattr(few_rows, "TRIALS", 2)
    out = generate(model, ids, mask, max_new_tokens=24, fused=fused)
    assert few_rows._best or few_rows._choices, "the decode never took the few_rows path"
    assert torch.equal(out.sequences, plain.sequences)
    assert torch.equal(out.iter_counts, plain.iter_counts)


def test_a_wrapped_linear_keeps_its_decided_layout_and_sees_new_weights(monkeypatch):
    """DepthLoRALinear keeps few_rows' decided layout per input shape (decode's hot path); a weight
    replaced by assignment, or a cast, must still be used, not the tensor the layout was kept with."""
    from tah.model.lora import DepthLoRALinear, DepthState

    calls = []

    def counted(x, weight, bias):
        calls.append(weight)
        return F.linear(x, weight, bias)

    monkeypatch.setattr(few_rows, "_candidates", lambda rows: [counted])
    layer = DepthLoRALinear(torch.nn.Linear(256, 512), 4, 8.0, 0.0, 1, DepthState())
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        for _ in range(few_rows.TRIALS + 2):  # trials, then the kept layout
            torch.testing.assert_close(layer(x), layer.base_layer(x))
        assert len(calls) == few_rows.TRIALS + 2 and layer._plans, "the decided layout is not used and kept"
        layer.base_layer.weight = torch.nn.Parameter(torch.randn(512, 256))
        torch.testing.assert_close(layer(x), layer.base_layer(x))
        assert calls[-1] is layer.base_layer.weight
        layer.base_layer = torch.nn.Linear(256, 512)  # a new module too
        torch.testing.assert_close(layer(x), layer.base_layer(x))
        layer.double()
        out = layer(x.double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, layer.base_layer(x.double()))
    out = layer(x.double())  # under autograd: F.linear, with gradients
    assert out.requires_grad
