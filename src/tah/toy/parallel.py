"""The demo's seeds side by side: each in a process of its own, on one CPU thread.

Why one thread: the demo's margins are a point or two, and which model won a seed moved with the
thread count (experiments/toy-depth, round 6: one thread against two changed even Standard's own
training). On one thread a seed's float rounding depends on the CPU alone, so a seed gives the same
figures whether it runs alone or beside others, on a machine with 2 cores or 64. The tiny models gain
little from a second thread anyway, so seeds side by side finish sooner than one after another.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def default_workers(seeds: int) -> int:
    """Every seed at once, at most two per usable core (single-threaded seeds spend part of their
    time writing checkpoints and logs, which leaves their core to a neighbour)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(seeds, 2 * cores))


SeedRun = Callable[[Path, object, int, Callable[[str, float], None]], dict]


def run_seeds(run_seed: SeedRun, stages: int, out: Path, settings, seeds: int, workers: int,
              console: Console) -> list[dict]:
    """`run_seed(OUT/seed-N, settings, N, report)` for seeds 0 .. seeds-1, `workers` at a time, each
    on one torch thread; the runs in seed order. `run_seed` is a module-level function (a worker
    process imports it) that calls `report(stage, seconds)` `stages` times. Prints every stage as
    it ends, under one progress bar. A seed's stderr (warnings, its stages' own bars) goes to
    OUT/seed-N/logs/stderr.log. The first seed to fail stops the others and raises its error here."""
    columns = (TextColumn("stages"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("stages", total=stages * seeds)

        def report(seed: int, name: str, seconds: float) -> None:
            progress.console.print(f"  seed {seed} [green]✓[/] {name:<34} {seconds:6.1f} s")
            progress.advance(bar)

        if workers == 1:
            return [run_one_seed(run_seed, out / f"seed-{seed}", settings, seed, partial(report, seed))
                    for seed in range(seeds)]
        return _in_processes(run_seed, out, settings, seeds, workers, report)


def run_one_seed(run_seed: SeedRun, root: Path, settings, seed: int, report: Callable[[str, float], None]) -> dict:
    """`run_seed` of one seed in this process, on one torch thread, its stderr in ROOT/logs/stderr.log."""
    with _one_thread(), _quiet_into(root / "logs" / "stderr.log"):
        return run_seed(root, settings, seed, report)


def _in_processes(run_seed: SeedRun, out: Path, settings, seeds: int, workers: int, report) -> list[dict]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state shared with ours
    # One seed per process (maxtasksperchild=1); leaving the block terminates any still running.
    with context.Manager() as manager, context.Pool(workers, maxtasksperchild=1) as pool:
        events = manager.Queue()
        pending = [pool.apply_async(_seed_process, (run_seed, out / f"seed-{seed}", settings, seed, events))
                   for seed in range(seeds)]
        while not all(result.ready() for result in pending):
            _drain(events, report)
            for result in pending:
                if result.ready() and not result.successful():
                    result.get()  # raises the seed's error; the pool's exit stops the rest
            time.sleep(0.2)
        _drain(events, report)
        return [result.get() for result in pending]


def _seed_process(run_seed: SeedRun, root: Path, settings, seed: int, events) -> dict:
    return run_one_seed(run_seed, root, settings, seed, lambda name, seconds: events.put((seed, name, seconds)))


def _drain(events, report) -> None:
    while not events.empty():
        report(*events.get())


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _quiet_into(log: Path) -> Iterator[None]:
    """stderr (warnings, the label / prune bars) into `log`; no Trainer bar (it draws at info level)."""
    from transformers.utils import logging as hf_logging

    log.parent.mkdir(parents=True, exist_ok=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with open(log, "a", encoding="utf-8") as sink, contextlib.redirect_stderr(sink):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
