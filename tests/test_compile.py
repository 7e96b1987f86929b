"""`compile_deep_passes`: training's deeper passes through torch.compile give eager's numbers, and one
graph serves every count of hard tokens (issue 26: the deeper pass of a GPU training step waits on
the host; compiled, its ops are fused)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import left_padded, tiny_tah

# (lengths of the rows, left-padded; every `every`-th position of a row is hard): the rows' hard counts,
# the deeper pass's width and the sequence length all change from batch to batch
BATCHES = [([24, 30, 17, 30], 3), ([20, 26, 26, 9], 4), ([28, 28, 12, 21], 2), ([30, 7, 30, 18], 5)]


def batch(lengths: list[int], every: int, seed: int, device) -> dict:
    ids, mask = left_padded(lengths, vocab=256, seed=seed)
    iter_labels = torch.ones_like(ids)
    iter_labels[:, ::every] = 2
    iter_labels[0, -1] = 2  # row 0 has a hard token even where the pattern misses its real positions
    return {name: t.to(device) for name, t in dict(
        input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
        iter_labels=iter_labels.masked_fill(mask == 0, -100)).items()}


def check_compiled_matches_eager(device, backend: str, batches=BATCHES, autocast: bool = False,
                                 tol: float = 1e-5) -> None:
    """Stage-1 steps (forward, backward) of a model whose deeper passes are compiled against the same
    steps of an eager copy: the losses and every gradient within `tol` (cosine > 0.999 under autocast,
    where rounding differs), the pass counts equal, and at most two graphs for all the batches (the
    first compile specialises the sequence length; the recompile makes it dynamic), each traced once
    (dynamo restarting its analysis would trace a graph twice: twice the compile time)."""
    device = torch.device(device)
    torch.manual_seed(0)
    eager = tiny_tah(max_iter=2, vocab=256).to(device).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_deep_passes(backend=backend)
    torch._dynamo.reset()
    counters.clear()
    try:
        for i, (lengths, every) in enumerate(batches):
            inputs = batch(lengths, every, seed=i, device=device)
            results = []
            for model in (eager, compiled):
                model.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    out = model(**inputs)
                out.loss.backward()
                grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
                results.append((out.loss.detach().float(), grads, out.iter_count))
            (loss_e, grads_e, count_e), (loss_c, grads_c, count_c) = results
            assert torch.equal(count_c, count_e) and (count_e == 2).any(), f"batch {i}"
            assert abs(loss_c - loss_e) <= tol, f"batch {i}: {loss_c} vs {loss_e}"
            assert grads_c.shape == grads_e.shape, f"batch {i}"
            if autocast:
                assert torch.nn.functional.cosine_similarity(grads_c, grads_e, dim=0) > 0.999, f"batch {i}"
            else:
                torch.testing.assert_close(grads_c, grads_e, atol=tol, rtol=tol, msg=f"batch {i}")
        graphs, traced = counters["stats"]["unique_graphs"], counters["aot_autograd"]["total"]
    finally:
        torch._dynamo.reset()
    assert 1 <= graphs <= 2, f"{graphs} graphs for {len(batches)} batches"
    assert traced == graphs, f"{traced} traces of {graphs} graphs: dynamo restarted its analysis"


def test_compiled_deep_passes_match_eager_over_changing_shapes():
    """aot_eager: dynamo's graph and AOT autograd's backward, with eager kernels (fast to compile)."""
    check_compiled_matches_eager("cpu", "aot_eager")


def test_compiled_deep_passes_with_inductor_match_eager():
    """Inductor's generated kernels (what runs on a GPU), on two batches: the compile takes ~20 s."""
    check_compiled_matches_eager("cpu", "inductor", batches=BATCHES[:2], tol=1e-4)


def test_compiled_deep_passes_under_bf16_autocast_match_eager():
    """GPU training runs under bf16 autocast: the compiled pass traces the autocast regions as eager runs
    them (aot_eager on CPU; the CUDA test below runs inductor's kernels)."""
    check_compiled_matches_eager("cpu", "aot_eager", batches=BATCHES[:3], autocast=True, tol=1e-2)


def test_only_training_deep_passes_are_compiled():
    """Depth 0, inference and stage 2 (no autograd) keep the eager modules: decoding's engines
    choose their own paths, and a compiled inference pass would only add compile time."""
    model = tiny_tah(max_iter=2, vocab=256)
    model.compile_deep_passes(backend="eager")
    decoder = model._decoder()
    assert model._compiled(decoder, 0) is decoder
    with torch.no_grad():
        assert model._compiled(decoder, 1) is decoder
    chosen = model._compiled(decoder, 1)
    assert chosen is not decoder and model._compiled(decoder, 1) is chosen  # compiled once, kept
    assert "_deep_compile" not in "".join(model.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_deep_passes_match_eager_on_cuda_bf16():
    check_compiled_matches_eager("cuda", "inductor", batches=BATCHES[:3], autocast=True, tol=1e-2)
