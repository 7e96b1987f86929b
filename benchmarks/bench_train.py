"""Training-step speed of TaH stage 1 (10% of tokens hard) vs plain SFT of the same model.

The ~41M random Qwen3 of bench_decode.py (vocab 32000, hidden 512, 8 layers), float32, 2 threads,
sequence length 1024, batch 2 (2048 tokens a step). One step = forward + backward + AdamW step.
  SFT:     the bare HF model with `labels`; every parameter trains.
  stage 1: `TaHForCausalLM` (max_iter 2, LoRA r16 alpha 32 on every linear, MLP decider, stage 1)
           with `labels` and `iter_labels` (2 at 10% of each row's positions, drawn at random, the
           rest 1); base + LoRA train, the decider is frozen.
  stage 1, 0% hard: the same with every iter_label 1 (no second pass): the wrapper's own cost.
Within a run, each figure is the median of --steps timed steps after --warmup untimed ones, the
rows alternating step by step so that load from other processes hits all alike. The script makes
--runs such runs (3 by default), each in a fresh process: step times are steady within a process
but move by 2-4% from one process to the next (single runs read 0.834-0.859 on 2026-11-23), so
one process is one sample. Prints tokens/s of every row and the ratios to SFT, by
wall clock and by process CPU time (the latter does not count time this process waits for a core):
each run's, and their median.

On Linux the script re-runs itself with glibc malloc settings that keep freed memory for reuse, as
jemalloc or tcmalloc would (--system-malloc turns this off). Every step frees and reallocates
several (2048, 32000) float32 tensors (262 MB each: logits, their log-softmax, its gradient); with
glibc's defaults each comes back as fresh pages, and their page faults cost 0.3 to 1 s on one step
and nothing on the next (one-off measurements on the benchmark machine), for either model, which drowned the ratio in noise.
Usage: python benchmarks/bench_train.py [--runs N] [--quick] [--system-malloc] [--separate-heads]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_decode import base_model, with_small_adapters
from rich.console import Console
from rich.table import Table

from tah import TaHConfig, TaHForCausalLM

# Freed memory stays in the heap (no mmap for big blocks, no trimming), so it is reused without faults.
CACHING_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_TOP_PAD_": str(2**30)}


def caching_malloc_in_use() -> bool:
    return all(os.environ.get(key) == value for key, value in CACHING_MALLOC.items())


def rerun_with_caching_malloc() -> None:
    """Replace this process by the same command under CACHING_MALLOC (glibc reads it at start)."""
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CACHING_MALLOC})


def prefault_heap(gib: float) -> None:
    """Touch `gib` GiB of heap and free it: under CACHING_MALLOC the freed block stays in the heap,
    so the steps' big tensors reuse pages that are already mapped. Without this the heap grows over
    the first steps, and on the benchmark VM a first touch of new heap pages cost ~8 us a page:
    0.5-1 s on some steps, none on others (a one-off cross-entropy timing, 2026-11-24)."""
    block = torch.empty(int(gib * 2**30), dtype=torch.uint8)
    block.fill_(0)
    del block


def page_faults() -> int:
    """Minor page faults of this process so far (each first touch of a fresh page is one)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def stage1_model(lm) -> TaHForCausalLM:
    config = TaHConfig(max_iter=2, lora_rank=16, lora_alpha=32.0, decider="mlp", training_stage=1)
    return with_small_adapters(TaHForCausalLM.from_base(lm, config).train())


def hard_labels(batch: int, length: int, share: float, generator: torch.Generator) -> torch.Tensor:
    """(batch, length) iter_labels: 2 at round(share * length) random positions of each row, else 1.
    Exactly that share, where independent draws at that rate would add their spread to the work (a
    draw at 10% gave 10.8% on 2026-11-24, i.e. 8% more deeper passes than the row claims)."""
    hard = torch.rand(batch, length, generator=generator).argsort(dim=1)[:, :round(share * length)]
    return torch.ones(batch, length, dtype=torch.long).scatter_(1, hard, 2)


def make_step(model, batch: dict[str, torch.Tensor]):
    """A closure running one training step (forward, backward, AdamW) on `batch`."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, sum(p.numel() for p in params)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hard", type=float, default=0.1, help="share of tokens that take a second pass")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3, help="fresh processes to measure in; the ratios' median is reported")
    parser.add_argument("--quick", action="store_true", help="length 256, 1 warmup step, 3 timed steps, 1 run")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default malloc settings (page faults on every big tensor; noisy)")
    parser.add_argument("--prefault-gib", type=float, default=8.0,
                        help="GiB of heap to touch before the models load (caching malloc only; 0 = none)")
    parser.add_argument("--separate-heads", action="store_true",
                        help="each pass runs its own LM head (no kernels/shared_head.py): for comparisons")
    parser.add_argument("--result-file", help=argparse.SUPPRESS)  # a child run writes its figures here
    args = parser.parse_args()
    if args.quick:
        args.length, args.warmup, args.steps, args.runs = 256, 1, 3, 1
    if args.runs < 1 or args.steps < 1:
        parser.error("--runs and --steps must be at least 1")
    return args


def measure(args: argparse.Namespace, console: Console) -> dict:
    """One run in this process: {"wall"/"cpu": {row: median seconds a step}, "params": {row: trainable}}."""
    torch.set_num_threads(2)
    if caching_malloc_in_use() and args.prefault_gib > 0:
        prefault_heap(args.prefault_gib)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (args.batch, args.length), generator=gen)
    iter_labels = hard_labels(args.batch, args.length, args.hard, gen)
    bare = base_model()
    sft = copy.deepcopy(bare).train()
    tah = stage1_model(bare)
    tah.use_shared_head = not args.separate_heads
    steps = {
        "plain SFT": make_step(sft, dict(input_ids=ids, labels=ids)),
        "TaH stage 1": make_step(tah, dict(input_ids=ids, labels=ids, iter_labels=iter_labels)),
        # the same model with no token hard: what the wrapper costs without any extra pass
        "TaH stage 1, 0% hard": make_step(tah, dict(input_ids=ids, labels=ids, iter_labels=torch.ones_like(ids))),
    }
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    faults: dict[str, list[int]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, (step, _) in steps.items():
            start, start_cpu, start_faults = time.perf_counter(), time.process_time(), page_faults()
            step()
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                faults[name].append(page_faults() - start_faults)
        timed = i >= args.warmup
        console.print(f"step {i + 1}/{args.warmup + args.steps}" + ("" if timed else " (warmup)") + "  "
                      + "  ".join(f"{n}: {t[-1]:.2f}s" for n, t in wall.items() if timed), style="dim")
    return {"wall": {n: statistics.median(t) for n, t in wall.items()},
            "cpu": {n: statistics.median(t) for n, t in cpu.items()},
            "faults": {n: statistics.median(f) for n, f in faults.items()},
            "params": {n: count for n, (_, count) in steps.items()}}


def measure_in_fresh_processes(args: argparse.Namespace, console: Console) -> list[dict]:
    """Each run is this script again with --runs 1, in its own process (and its own malloc setup)."""
    forwarded = [f"--length={args.length}", f"--batch={args.batch}", f"--hard={args.hard}",
                 f"--warmup={args.warmup}", f"--steps={args.steps}", f"--prefault-gib={args.prefault_gib}", "--runs=1"]
    forwarded += ["--system-malloc"] if args.system_malloc else []
    forwarded += ["--separate-heads"] if args.separate_heads else []
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            console.print(f"run {run + 1}/{args.runs} (a fresh process)", style="bold")
            path = Path(tmp) / f"run{run}.json"
            subprocess.run([sys.executable, __file__, *forwarded, f"--result-file={path}"], check=True)
            results.append(json.loads(path.read_text()))
    return results


def report(args: argparse.Namespace, results: list[dict], malloc: str, console: Console) -> None:
    tokens = args.batch * args.length
    rows = list(results[0]["wall"])
    ratios = {clock: {name: [r[clock]["plain SFT"] / r[clock][name] for r in results] for name in rows}
              for clock in ("wall", "cpu")}
    runs = f"median of {len(results)} runs" if len(results) > 1 else "1 run"
    table = Table(title=f"training step: batch {args.batch} x {args.length} tokens, float32, 2 threads, "
                        f"{args.hard:.0%} hard, {args.steps} timed steps a run, {runs}, {malloc}")
    for col in ("model", "trainable params", "s/step", "tokens/s", "vs SFT", "CPU s/step", "vs SFT (CPU)",
                "page faults/step"):
        table.add_column(col, justify="right")
    for name in rows:
        seconds = statistics.median(r["wall"][name] for r in results)
        table.add_row(name, f"{results[0]['params'][name] / 1e6:.1f}M", f"{seconds:.3f}", f"{tokens / seconds:.1f}",
                      f"{statistics.median(ratios['wall'][name]):.3f}",
                      f"{statistics.median(r['cpu'][name] for r in results):.3f}",
                      f"{statistics.median(ratios['cpu'][name]):.3f}",
                      f"{statistics.median(r['faults'][name] for r in results):.0f}")
    console.print(table)
    for name in rows[1:]:
        each = {clock: ", ".join(f"{x:.3f}" for x in ratios[clock][name]) for clock in ratios}
        console.print(f"{name} / plain SFT tokens/s: {statistics.median(ratios['wall'][name]):.3f} (wall clock), "
                      f"{statistics.median(ratios['cpu'][name]):.3f} (process CPU time)"
                      + (f"; runs: {each['wall']} (wall), {each['cpu']} (CPU)" if len(results) > 1 else ""))


def main() -> None:
    args = parse_args()
    console = Console(width=140)
    if args.runs > 1:
        results = measure_in_fresh_processes(args, console)
        malloc = "system malloc" if args.system_malloc or sys.platform != "linux" else "caching malloc"
        report(args, results, malloc, console)
        return
    if sys.platform == "linux" and not args.system_malloc and not caching_malloc_in_use():
        rerun_with_caching_malloc()
    result = measure(args, console)
    if args.result_file:  # a child of measure_in_fresh_processes: the parent reports
        Path(args.result_file).write_text(json.dumps(result))
        return
    report(args, [result], "caching malloc" if caching_malloc_in_use() else "system malloc", console)


if __name__ == "__main__":
    main()
