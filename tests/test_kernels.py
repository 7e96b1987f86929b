"""`tah.kernels`: the chooser picks the CPU layouts on CPU and never on CUDA, each device kernel
computes what its plain fallback does, and model/ and generation/ reach the device modules only
through the chooser. (The training-step tricks shared_head and rows_grad are held against plain
autograd in test_shared_head.py and test_training.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import tah.kernels.choose as choose
import tah.kernels.cpu.few_rows as few_rows
import tah.kernels.plain as plain
from tah.kernels.cuda.attention import masked_attention_gpu

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing is allocated on it
SRC = Path(__file__).resolve().parents[1] / "src" / "tah"


class _Layer(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def test_cpu_layouts_are_chosen_on_cpu_only(monkeypatch):
    assert choose.linear_layouts(CPU) is few_rows
    assert choose.attention_kernels(CPU) == (None, choose.cpu_attention.grouped_attention_cpu)
    for device in (CUDA, torch.device("cuda", 1), torch.device("meta")):
        assert choose.linear_layouts(device) is plain, device
        assert choose.attention_kernels(device) == (masked_attention_gpu, None), device
    monkeypatch.setattr(choose, "GPU_PATH_ON_CPU", True)  # how tests run CUDA's masked path on CPU
    assert choose.attention_kernels(CPU).masked is masked_attention_gpu
    assert choose.attention_kernels(CUDA).grouped is None


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(few_rows, "_choices", {})
    monkeypatch.setattr(few_rows, "_best", {})


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_linear_layouts_compute_the_plain_linear(device, rows):
    """Every chosen layout, on trial and once decided (also kept as a plan), gives F.linear's result
    to float rounding; the tensors are on CPU, the layouts are the ones chosen for `device`."""
    layouts = choose.linear_layouts(device)
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(few_rows.MIN_WEIGHT // 64, 64, generator=gen)
    bias = torch.randn(weight.shape[0], generator=gen)
    x = torch.randn(rows, 64, generator=gen)
    expected = plain.linear(x, weight, bias)
    with torch.no_grad():
        for _ in range(3 * few_rows.TRIALS + 1):
            torch.testing.assert_close(layouts.linear(x, weight, bias), expected, rtol=1e-5, atol=1e-5)
        product = layouts.plan(x, weight, bias)
        assert product is not None, "decided layouts are offered as a plan"
        torch.testing.assert_close(product(x), expected, rtol=1e-5, atol=1e-5)
        assert layouts.handles(rows, weight) == (device.type == "cpu")
    assert bool(few_rows.chosen()) == (device.type == "cpu"), "a layout was tried and chosen on CPU only"


def _masked_inputs(queries: int, groups: int, gen: torch.Generator):
    b, kv, s, d = 2, 2, 40, 8
    inputs = [torch.randn(b, kv * groups, queries, d, generator=gen), torch.randn(b, kv, s, d, generator=gen),
              torch.randn(b, kv, s, d, generator=gen)]
    visible = torch.rand(b, 1, queries, s, generator=gen) > 0.3
    visible[..., 0] = True  # every query sees something
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    return inputs, mask, d ** -0.5


@pytest.mark.parametrize("kernel", ["cpu grouped", "cuda masked"])
@pytest.mark.parametrize("queries", [1, 3, 70])
@pytest.mark.parametrize("groups", [2, 4])
def test_attention_kernels_compute_hf_sdpa_forward_and_backward(kernel, queries, groups):
    """Each attention kernel the chooser hands out, run on CPU, against HF's sdpa (the plain path)."""
    attention = (choose.attention_kernels(CPU).grouped if kernel == "cpu grouped"
                 else choose.attention_kernels(CUDA).masked)
    inputs, mask, scale = _masked_inputs(queries, groups, torch.Generator().manual_seed(queries * 10 + groups))
    upstream = torch.randn(2, queries, inputs[0].shape[1], inputs[0].shape[3])
    results = []
    for ours in (True, False):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = attention(*leaves, mask, groups, 0.0, scale) if ours else \
            plain.attention(_Layer(groups), *leaves, mask, scaling=scale)[0]
        out.backward(upstream)
        results.append([out] + [t.grad for t in leaves])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_cpu_grouped_single_query_without_a_mask_computes_hf_sdpa():
    inputs, _, scale = _masked_inputs(1, 4, torch.Generator().manual_seed(3))
    ours = choose.attention_kernels(CPU).grouped(*inputs, None, 4, 0.0, scale)
    theirs, _ = plain.attention(_Layer(4), *inputs, None, scaling=scale)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_model_and_generation_reach_device_kernels_only_through_the_chooser():
    device_module = re.compile(r"tah\.kernels\.(cpu|cuda)\b|from tah\.kernels(\.cpu|\.cuda)? import")
    offenders = [str(path.relative_to(SRC)) for room in ("model", "generation") for path in (SRC / room).rglob("*.py")
                 if device_module.search(path.read_text())]
    assert not offenders, f"import tah.kernels.choose instead of the device modules in {offenders}"
