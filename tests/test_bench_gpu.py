"""bench_gpu.py --smoke: every row of both tables runs on CPU on a tiny shape, its figures sane.

Timings are not checked (a smoke run's figures are noise); that every row is there, ran as asked (no
EOS stop, the share it claims iterated) and gave positive finite figures is."""

import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tah

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu") / "figures.json"
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", "--device", "cpu", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run.stdout, json.loads(out.read_text())


def expected_decode_rows(batches):
    one, many = batches
    rows = {(b, key) for b in batches for key in ("hf_eager", "hf_static", "never", "10%", "10%_sampled", "always")}
    rows |= {(one, f"10%_drafts{k}") for k in (1, 2, 4)}
    if "engine" in inspect.signature(tah.generate).parameters:
        rows |= {(b, key) for b in batches for key in ("10%_eager", "never_eager")}
    return rows


def positive(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


def test_every_row_of_both_tables_is_measured(smoke):
    stdout, figures = smoke
    assert figures["errors"] == []
    assert all("engine=" in s["reason"] for s in figures["skipped"])  # only rows this tah cannot run
    setup = figures["environment"]["setup"]
    decode = {(r["batch"], r["key"]): r for r in figures["decode"]}
    assert set(decode) == expected_decode_rows(setup["batches"])
    assert [r["key"] for r in figures["train"]] == ["sft", "stage1_0%", "stage1_10%", "stage2"]
    assert "decode: prompt" in stdout and "training step: batch" in stdout
    for r in figures["decode"]:
        assert r["label"] in stdout


def test_decode_figures_are_sane_ratios(smoke):
    _, figures = smoke
    new = figures["environment"]["setup"]["new_tokens"]
    for r in figures["decode"]:
        name = f"batch {r['batch']} {r['key']}"
        assert r["new_tokens_made"] == new, name  # no EOS stop: every run makes them all
        assert r["runs"] >= 1 and positive(r["tokens_per_s"]), name
        assert positive(r["vs_hf_eager"]) and positive(r["vs_hf_static"]), name
        if r["kind"] == "tah":
            assert r["engine_used"] in ("eager", "static"), name
            assert positive(r["kv_vs_base"]), name
            if r["key"] != "never":
                assert positive(r["vs_never"]), name
            if r["rate"] is not None and r["key"] != "never_eager":
                assert positive(r["kv_bytes_vs_never"]), name
        else:
            assert r["engine_used"] == "hf"
    decode = {(r["batch"], r["key"]): r for r in figures["decode"]}
    for batch in figures["environment"]["setup"]["batches"]:
        assert decode[batch, "never"]["iterated"] == 0.0
        assert decode[batch, "always"]["iterated"] == 1.0
        assert 0.0 < decode[batch, "10%"]["iterated"] < 0.5
        assert "compiled" not in decode[batch, "hf_static"] and "compile skipped on cpu" in decode[batch, "hf_static"]["note"]


def test_training_figures_are_sane_ratios(smoke):
    _, figures = smoke
    rows = {r["key"]: r for r in figures["train"]}
    for key, r in rows.items():
        assert r["steps"] >= 1 and positive(r["tokens_per_s"]) and positive(r["vs_sft"]), key
        assert math.isfinite(r["loss"]), key
        assert r["peak_bytes"] is None and r["peak_vs_sft"] is None  # CPU: no allocator peak
    assert rows["sft"]["vs_sft"] == 1.0
    assert rows["stage1_10%"]["trainable_params"] > rows["sft"]["trainable_params"]  # the base and the LoRA
    assert rows["stage2"]["loss"] != rows["stage1_10%"]["loss"]  # the decider's BCE, not the LM's CE


def test_compiled_rows_run_beside_their_references(tmp_path):
    """--compiled: compile_deep_passes and compile_decode_steps (inductor, here on CPU) each measured
    beside the eager row it is a ratio of, in one run."""
    out = tmp_path / "compiled.json"
    # its compiles took 289 s of the default 280 s budget on a loaded 2-core machine, and rows were skipped
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", "--device", "cpu", "--compiled", "--budget-s", "800",
                          "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures["errors"] == [] and figures["skipped"] == []
    assert [r["key"] for r in figures["train"]] == ["sft", "stage1_10%", "stage1_10%_compiled"]
    compiled_train = figures["train"][-1]
    assert positive(compiled_train["vs_sft"]) and compiled_train["warmup_s"] > 0
    batches = figures["environment"]["setup"]["batches"]
    decode = {(r["batch"], r["key"]): r for r in figures["decode"]}
    keys = ("never", "10%", "never_compiled", "10%_compiled")
    assert set(decode) == {(b, k) for b in batches for k in keys} | {(batches[0], "hf_static")}
    for b in batches:
        assert decode[b, "10%_compiled"]["vs_never_engine"] == "compiled"
        for key in keys:
            assert decode[b, key]["engine_used"] == "static", (b, key)
            assert decode[b, key]["new_tokens_made"] == figures["environment"]["setup"]["new_tokens"]
            assert key == "never" or positive(decode[b, key]["vs_never"]), (b, key)
        assert decode[b, "10%_compiled"]["iterated"] == decode[b, "10%"]["iterated"] > 0


@pytest.mark.parametrize("script, args, expected", [
    ("profile_gpu_decode.py", ["--replays", "2", "--top", "3"],
     ["batch 1: prefill", "batch 2: prefill", "fused step", "batch 1, plain step: ", "batch 2, fused step: "]),
    ("profile_gpu_train.py", ["--top", "3"], ["== stage 1, 0% hard", "== stage 1, 10% hard", "aten ops"]),
])
def test_gpu_profiles_run_in_smoke_mode(script, args, expected):
    """The profiling scripts gpu_session.sh runs on a GPU (PROFILE=1) work end to end on a tiny shape."""
    run = subprocess.run([sys.executable, str(BENCH.parent / script), "--smoke", *args],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    for text in expected:
        assert text in run.stdout
    if script == "profile_gpu_decode.py":  # the kernel lists: a fused step (two passes' queries) does more
        counts = {kind: float(re.search(rf"batch 1, {kind} step: (\d+) aten ops a step", run.stdout).group(1))
                  for kind in ("plain", "fused")}
        assert counts["fused"] > counts["plain"] > 0, counts


def test_gpu_session_script_dry_runs_on_cpu(tmp_path):
    """`bash benchmarks/gpu_session.sh`, the one call a lent GPU gets, dry-run on CPU (tiny shapes, the
    compiled run skipped): the `gpu` tests are collected (and skip without CUDA), the full run writes its
    figures, and each part says how it ended."""
    env = {**os.environ, "OUT": str(tmp_path), "BENCH_ARGS": "--smoke --device cpu", "COMPILED_BUDGET_S": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # python3: this venv's
    run = subprocess.run(["bash", str(BENCH.parent / "gpu_session.sh")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    if not torch.cuda.is_available():  # (with CUDA the `gpu` tests run for real)
        skips = re.findall(r"SKIPPED \[(\d+)\] (tests/\S+?):\d+: needs CUDA", (tmp_path / "pytest_gpu.log").read_text())
        assert {path for _, path in skips} == {"tests/test_gpu.py", "tests/test_compile.py"}, run.stdout[-4000:]
        assert sum(int(n) for n, _ in skips) >= 14  # every `gpu` test, each skipped for want of CUDA
    assert "bench_gpu.py: exit 0" in run.stdout, run.stdout[-4000:]
    figures = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert figures["decode"] and figures["train"] and not figures["errors"]
