"""The host's share of a training step, measured on a CPU: what a GPU step waits on when it is host-bound.

On a GPU a TaH stage-1 step with 10% hard tokens was bound by the host (issue 26: 57,491 host ops
and 926 ms of wall time for 171 ms of kernels on an H200), and GPUs are seldom at hand. This script
measures that host work where any machine can: a model of the Qwen3-0.6B's depth (28 layers) but
tiny width (hidden 32), so that a step's kernels cost next to nothing and its time is its dispatch,
run on one CPU thread in float32, with the masked attention on its CUDA path (`GPU_PATH_ON_CPU`) and
AdamW's foreach kernels (CUDA's default). Rows: plain SFT of the bare HF model; TaH stage 1 with 0%
and 10% hard tokens (exact shares, bench_train's labels); with --compiled also 10% with
`compile_deep_passes` (inductor: its first step compiles, minutes at 28 layers on 2 cores).

Per row: the aten ops dispatched by forward and backward (each at least one kernel launch on a
GPU) and their host reads (each a wait for the device on a GPU: `tah.kernels.host_reads`; AdamW's
reads are left out, as they read its step counts, which stay on the CPU on a GPU too), and the wall
milliseconds of a whole step (forward, backward, AdamW; median of --steps after 2 warm-up steps, rows
interleaved), each also as a ratio to SFT's. What the wall ratio predicts on a GPU is the host-bound case; a GPU step that is bound by its
kernels instead moves less.
Usage: python benchmarks/bench_host.py [--layers 28] [--steps 7] [--compiled]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from bench_train import hard_labels
from rich.console import Console
from rich.table import Table
from transformers import Qwen3Config, Qwen3ForCausalLM

import tah.kernels.choose as kernels
from tah import TaHConfig, TaHForCausalLM
from tah.kernels.host_reads import HostReads

BATCH, LENGTH, VOCAB = 4, 256, 512
COMPILED = "deeper passes compiled"


def narrow_qwen3(layers: int) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=16, tie_word_embeddings=True, max_position_embeddings=4096,
                                        attn_implementation="sdpa"))


def tah_model(lm: Qwen3ForCausalLM, compiled: bool) -> TaHForCausalLM:
    config = TaHConfig(max_iter=2, lora_rank=8, lora_alpha=16.0, decider="mlp", training_stage=1)
    model = TaHForCausalLM.from_base(copy.deepcopy(lm), config).train()
    if compiled:
        model.compile_deep_passes()
    return model


def make_step(model, ids: torch.Tensor, iter_labels: torch.Tensor | None):
    """One training step of `model` on `ids` (labels = ids); TaH's with these oracle pass counts.
    step(update=False) runs forward and backward only."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    extra = {} if iter_labels is None else {"iter_labels": iter_labels}

    def step(update: bool = True) -> None:
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids, **extra).loss.backward()
        if update:
            optimizer.step()

    return step


def rows(layers: int, compiled: bool) -> dict:
    lm = narrow_qwen3(layers).train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=generator)
    made = {"plain SFT of the base model": make_step(lm, ids, None)}
    model = tah_model(lm, compiled=False)
    for share in (0.0, 0.1):
        made[f"TaH stage 1, {share:.0%} hard tokens"] = make_step(model, ids, hard_labels(BATCH, LENGTH, share,
                                                                                            generator))
    if compiled:
        made[f"TaH stage 1, 10% hard, {COMPILED}"] = make_step(
            tah_model(lm, compiled=True), ids, hard_labels(BATCH, LENGTH, 0.1, generator))
    return made


def measure(steps: dict, repeats: int, console: Console) -> dict:
    figures = {}
    for name, step in steps.items():
        started = time.perf_counter()
        step()
        step()
        console.print(f"{name}: warm-up {time.perf_counter() - started:.1f} s")
        figures[name] = {"ops": None, "reads": None, "times": []}
    for _ in range(repeats):  # interleaved, so that the machine's drift hits every row alike
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            figures[name]["times"].append(time.perf_counter() - started)
    for name, step in steps.items():
        if COMPILED in name:  # compiled graphs run no aten ops one by one (and a dispatch mode would unhook them)
            continue
        with HostReads() as reads:  # forward and backward: AdamW's reads are of its step counts, CPU tensors on a GPU too
            step(update=False)
        figures[name].update(ops=reads.ops, reads=reads.count)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--compiled", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kernels.GPU_PATH_ON_CPU = True  # the masked attention a GPU runs
    console = Console(width=150)
    figures = measure(rows(args.layers, args.compiled), args.steps, console)
    sft = next(iter(figures.values()))
    sft_ms = statistics.median(sft["times"]) * 1e3
    table = Table(title=f"one training step, host work: {args.layers} layers of hidden 32, batch {BATCH} x {LENGTH}, "
                        f"float32, 1 thread; ms: median of {args.steps}")
    for column in ("row", "aten ops (fwd + bwd)", "vs SFT", "host reads", "ms a step", "vs SFT (speed)"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for name, f in figures.items():
        ms = statistics.median(f["times"]) * 1e3
        counted = f["ops"] is not None
        table.add_row(name, f"{f['ops']:,}" if counted else "-", f"{f['ops'] / sft['ops']:.2f}x" if counted else "-",
                      str(f["reads"]) if counted else "-", f"{ms:.1f}", f"{sft_ms / ms:.3f}x")
    console.print(table)


if __name__ == "__main__":
    main()
