"""The `gpu` tests' checks, run on CPU: a GPU is lent rarely and briefly, and a check that fails for a
reason a CPU could have shown (an API that moved, a helper renamed) wastes that GPU session. Each
check asserts on CPU what it asserts on CUDA (parity with the original code's fixture, fused ==
unfused, bf16 batches == rows alone, the static engine == the eager one, ...); only what needs CUDA
itself (counting the device's waits) is left out."""

from __future__ import annotations

import inspect

import pytest
import torch

import test_gpu

CUDA_ONLY = {
    "check_stage1_step_waits_like_sft",  # counts cudaStreamSynchronize calls under the CUDA profiler
    "check_compiled_static_equals_eager",  # inductor's compile, ~30 s; tests/test_static_engine.py runs it on CPU
}
CHECKS = sorted(name for name in dir(test_gpu) if name.startswith("check_") and name not in CUDA_ONLY)


def test_every_gpu_test_runs_a_check_dry_run_here():
    """Each `gpu` test is a `check_*(device)` on CUDA, so that this file dry-runs it (or lists it as CUDA-only)."""
    tests = {name: fn for name, fn in vars(test_gpu).items() if name.startswith("test_") and callable(fn)}
    assert tests and CUDA_ONLY <= set(dir(test_gpu))
    for name, fn in tests.items():
        source = inspect.getsource(fn)  # (the parity test picks its check_* from PARITY)
        assert "check_" in source or "PARITY[" in source, f"{name} runs no check_*(device): write it as one"


@pytest.mark.parametrize("check", CHECKS)
def test_gpu_check_holds_on_cpu(check):
    getattr(test_gpu, check)(torch.device("cpu"))
