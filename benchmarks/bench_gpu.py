"""GPU decode and training-step speed of tah vs Hugging Face's own paths, as ratios measured in one run.

Model: a random Qwen3-0.6B-shaped model (vocab 151936, hidden 1024, 28 layers, 16 / 8 heads, head_dim
128, MLP 3072, tied embeddings); TaH wraps a copy of it (max_iter 2, LoRA r16 on every linear, small
random adapter weights, as bench_decode.py).

Decode (bf16 weights, prompt 256, 128 new tokens, greedy unless said, no EOS: every run makes all 128 tokens), at
batch 1 and 32: HF `generate` (dynamic cache, no compile; and `cache_implementation="static"`, which
transformers compiles itself, mode reduce-overhead: its compile time is printed and kept out of the
timing), tah with the `never` decider, with exactly 10% of the positions iterated (bench_decode's
ExactShareDecider), and with every token iterated (`always`); at batch 1 also 1, 2 and 4 draft
candidates; and at both batches 10% iterated with sampling (`tah eval bench`'s defaults: temperature
0.6, top-p 0.95, top-k 20; seeded). tah rows run `tah.generate`'s default engine ("auto"), and its "eager" engine where
`tah.generate` takes `engine=`. Each figure: the median of 3 runs after a warm-up (a full run where
something compiles or captures CUDA graphs, else 16 tokens). KV: the entries the engine's cache
held vs the base model's (one per token), and the bytes it allocated vs `never`'s.

Training step (batch 4 x 1024, float32 weights under `torch.autocast(bfloat16)`, AdamW, as a user of
HF Trainer's bf16 would run it): plain SFT of the bare HF model, TaH stage 1 with 0% and 10% of the
tokens hard (oracle iter_labels, exactly 10% of each row), TaH stage 2 (decider only). Median of 5
steps after 2 warm-up steps; peak memory is each row's own (max_memory_allocated above what was
allocated when the row began).

--compiled runs, instead, what torch.compile may speed up beside its eager reference, in one run: SFT,
stage 1 at 10% and the same with `compile_deep_passes`; decoding at both batches with `never` and
10%, eager steps and `compile_decode_steps`; HF's compiled static cache at batch 1 last. Each warm-up
(the compiles) is printed.

The run keeps to --budget-s (default 280 s, counted from the process start): the rows run surest
and most needed first (HF eager and tah's main decode rows, training, then the HF compiles, then the
other tah rows), a row is skipped (and said so) when the budget cannot hold it, a row's repeats stop
early when the next would not fit, and past the budget plus a 12 s grace an alarm stops the row in
flight. A row that fails prints its traceback; the others go on. --smoke runs every row on a tiny
shape in seconds (on CPU the static-cache row runs without compiling). --out writes every figure as JSON.
Usage: python benchmarks/bench_gpu.py [--smoke] [--device cuda] [--budget-s 280] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

import torch
import transformers
from bench_decode import ExactShareDecider, with_small_adapters
from bench_train import hard_labels
from transformers import CompileConfig, Qwen3Config, Qwen3ForCausalLM

import tah
from tah import TaHConfig, TaHForCausalLM
from tah.eval.bench_run import TEMPERATURE, TOP_K, TOP_P
from tah.generation import engine as eager_engine
from tah.model.decider import ConstantDecider

try:
    from tah.generation import static as static_engine  # the static-shape engine, where this tah has it
except ImportError:
    static_engine = None

ENGINE_KEYWORD = "engine" in inspect.signature(tah.generate).parameters
WARMUP_TOKENS = 16  # the warm-up of a row that neither compiles nor captures graphs
GRACE_S = 12.0  # past the budget by this much, an alarm stops the row in flight
GiB = 2**30


@dataclass(frozen=True)
class Setup:
    """The model shape and the workload of a run."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    prompt: int
    new_tokens: int
    batches: tuple[int, int]  # decode: one prompt, and a batch of them
    train_batch: int
    train_length: int
    repeats: int  # timed decode runs per row
    train_warmup: int
    train_steps: int


FULL = Setup(vocab=151936, hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072,
             prompt=256, new_tokens=128, batches=(1, 32), train_batch=4, train_length=1024, repeats=3,
             train_warmup=2, train_steps=5)
SMOKE = Setup(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=192,
              prompt=16, new_tokens=8, batches=(1, 2), train_batch=2, train_length=32, repeats=1,
              train_warmup=0, train_steps=1)


# -- time ------------------------------------------------------------------------------------------
def process_age() -> float:
    """Seconds since this process started (imports included), from /proc; 0 where there is none."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


class OutOfTime(BaseException):
    """Raised by the alarm past the budget. A BaseException, so no library's `except Exception` eats it."""


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.origin = time.monotonic() - min(process_age(), 120.0)  # more than 120 s of imports: a misread
        self.expired = False

    def elapsed(self) -> float:
        return time.monotonic() - self.origin

    def allows(self, estimate: float = 0.0) -> bool:
        return not self.expired and self.elapsed() + estimate <= self.seconds

    def arm_alarm(self) -> None:
        """SIGALRM at budget + grace raises OutOfTime in the main thread (where signals exist)."""
        if not hasattr(signal, "setitimer"):
            return

        def expire(signum, frame):
            self.expired = True
            raise OutOfTime(f"past the budget of {self.seconds:.0f} s + {GRACE_S:.0f} s grace")

        signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, max(self.seconds + GRACE_S - self.elapsed(), 1.0))

    def disarm_alarm(self) -> None:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)


def log(budget: Budget, message: str) -> None:
    print(f"[{budget.elapsed():6.1f}s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- models ----------------------------------------------------------------------------------------
def base_model(setup: Setup, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Qwen3ForCausalLM:
    """The random base model, built on `device` (initialising 0.6B weights there takes a moment, on the
    CPU many seconds). The same seed gives the same weights in every row."""
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=setup.vocab, hidden_size=setup.hidden, intermediate_size=setup.intermediate,
                         num_hidden_layers=setup.layers, num_attention_heads=setup.heads,
                         num_key_value_heads=setup.kv_heads, head_dim=setup.head_dim, tie_word_embeddings=True,
                         max_position_embeddings=4096, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def wrap(lm, device: torch.device, **config) -> TaHForCausalLM:
    """TaH around `lm`, all of it on `device` (the MLP decider is built on the CPU), checked: a row that
    silently ran part of the model on the CPU would time the wrong thing."""
    model = with_small_adapters(TaHForCausalLM.from_base(lm, tah_config(**config))).to(device)
    strays = {name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != device.type}
    if strays:
        raise RuntimeError(f"not on {device}: {sorted(strays)[:5]}")
    return model


def tah_config(**changes) -> TaHConfig:
    return TaHConfig(max_iter=2, lora_rank=16, lora_alpha=32.0, seed=0, **changes)


def decider_for(rate: float | None):
    """None: `never`; 1.0: `always`; else exactly that share of positions (bench_decode's)."""
    if rate is None:
        return ConstantDecider(False)
    return ConstantDecider(True) if rate == 1.0 else ExactShareDecider(rate, seed=0)


# -- decode ----------------------------------------------------------------------------------------
@dataclass
class DecodeRow:
    """One decode row: `run(ids, new_tokens)` generates; `compiles`: its first run compiles or captures."""

    batch: int
    key: str
    label: str
    run: Callable
    compiles: bool = False
    kind: str = "tah"  # "hf" or "tah"
    engine: str = "auto"
    rate: float | None = None
    note: list[str] = field(default_factory=list)


class Decode:
    """The decode models (one bare HF model, one TaH model on a copy) and the runners of every row."""

    def __init__(self, setup: Setup, device: torch.device, dtype: torch.dtype) -> None:
        self.setup, self.device = setup, device
        self.bare = base_model(setup, device, dtype)
        self.model = wrap(copy.deepcopy(self.bare), device, decider="never").eval()
        self.deciders = {rate: decider_for(rate) for rate in (None, 0.1, 1.0)}  # one each: graphs may hold them
        self.compile_config = CompileConfig() if device.type == "cuda" else None  # mode reduce-overhead
        gen = torch.Generator().manual_seed(0)
        self.prompts = {b: torch.randint(3, setup.vocab, (b, setup.prompt), generator=gen).to(device)
                        for b in setup.batches}

    def hf(self, static: bool) -> Callable:
        def run(ids: torch.Tensor, new: int):
            options = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new, pad_token_id=0)
            if static:
                options["cache_implementation"] = "static"
                if self.compile_config is not None:  # transformers' default; passed to be explicit
                    options["compile_config"] = self.compile_config
            return self.bare.generate(ids, **options)

        return run

    def tah(self, rate: float | None, engine: str, candidates: int | None = None, compiled: bool = False,
            sampling: bool = False) -> Callable:
        def run(ids: torch.Tensor, new: int):
            self.model.decider = self.deciders[rate]
            if hasattr(self.model, "compile_decode_steps"):
                self.model.compile_decode_steps(enabled=compiled)
            options = dict(max_new_tokens=new, eos_token_id=None, draft_candidates=candidates)
            if sampling:
                options.update(SAMPLING)
            if ENGINE_KEYWORD:
                options["engine"] = engine
            return tah.generate(self.model, ids, torch.ones_like(ids), **options)

        return run


def dynamo_graphs() -> int:
    """Graphs torch.compile has built in this process (rises on every compile and recompile)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def spy_engine(call: Callable) -> tuple[object, str]:
    """call() and the tah engine that decoded in it ("eager", "static", "-" for none), told by which
    decoder's `run` it entered: `tah.generate` does not say which engine "auto" took."""
    decoders = {"eager": eager_engine.Decoder}
    if static_engine is not None:
        decoders["static"] = static_engine.StaticDecoder
    entered = []

    def spy(name: str, run: Callable) -> Callable:
        def entering(self, *args, **kwargs):
            entered.append(name)
            return run(self, *args, **kwargs)
        return entering

    with contextlib.ExitStack() as stack:
        for name, cls in decoders.items():
            stack.enter_context(mock.patch.object(cls, "run", spy(name, cls.run)))
        result = call()
    return result, "+".join(dict.fromkeys(entered)) or "-"


def measure_decode(decode: Decode, row: DecodeRow, budget: Budget) -> dict:
    """Warm up, then up to `repeats` timed runs (fewer when the next would not fit the budget)."""
    setup, device = decode.setup, decode.device
    ids, new = decode.prompts[row.batch], setup.new_tokens
    graphs = dynamo_graphs()
    start = time.perf_counter()
    _, engine_used = spy_engine(lambda: row.run(ids, new if row.compiles else min(new, WARMUP_TOKENS)))
    sync(device)
    warmup = time.perf_counter() - start
    record = dict(batch=row.batch, key=row.key, label=row.label, kind=row.kind, engine=row.engine,
                  rate=row.rate, warmup_seconds=warmup, engine_used="hf" if row.kind == "hf" else engine_used)
    if row.kind == "hf" and row.compiles:
        record["compiled"] = compiled = hasattr(decode.bare, "_compiled_call") and dynamo_graphs() > graphs
        record["compile_seconds"] = warmup
        log(budget, f"  compile warm-up {warmup:.1f} s, compiled: {compiled}")
        row.run(ids, new)  # a second warm-up: CUDA graphs are recorded on a later call than the compile
        sync(device)
        graphs = dynamo_graphs()
    times, out = [], None
    for _ in range(setup.repeats):
        if times and not budget.allows(times[-1]):
            row.note.append(f"{len(times)} of {setup.repeats} runs (budget)")
            break
        start = time.perf_counter()
        out = row.run(ids, new)
        sync(device)
        times.append(time.perf_counter() - start)
    record.update(seconds=times, runs=len(times), tokens_per_s=row.batch * new / statistics.median(times))
    if row.kind == "hf":
        made = out.shape[1] - setup.prompt
        if row.compiles:
            record["recompiles_while_timed"] = recompiles = dynamo_graphs() - graphs
            if recompiles:
                row.note.append(f"{recompiles} recompiles while timed")
    else:
        made = out.sequences.shape[1] - setup.prompt
        stats = out.stats
        made = min(made, int((out.iter_counts > 0).sum(1).min()))  # a row that stopped early has zeros
        record.update(iterated=(out.iter_counts > 1).float().mean().item(),
                      kv_entries=stats.kv_entries, kv_bytes=stats.kv_bytes,
                      kv_vs_base=stats.kv_entries / (row.batch * (setup.prompt + new)),
                      draft_candidates=stats.draft_candidates, drafts=stats.drafts,
                      acceptance=stats.acceptance if stats.drafts else None, forwards=stats.forwards)
    record["new_tokens_made"] = made
    if made != new:
        row.note.append(f"made {made} tokens, not {new}")
    record["note"] = "; ".join(row.note)
    return record


SAMPLING = dict(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K, seed=0)  # `tah eval bench`'s defaults
DECODE_ORDER = ("hf_eager", "hf_static", "never", "10%", "10%_sampled", "always", "never_eager", "10%_eager", "10%_drafts1",
                "10%_drafts2", "10%_drafts4", "never_compiled", "10%_compiled")  # the table's order (rows run in decode_rows' order)


def decode_rows(decode: Decode, compiled: bool = False) -> tuple[list[DecodeRow], list[DecodeRow]]:
    """(core, extra) decode rows, most important first; training runs between the two lists. With
    `compiled`: the static engine's compiled steps (`compile_decode_steps`) beside its eager steps,
    then HF's compiled static cache at batch 1."""
    one, many = decode.setup.batches
    on_cpu = decode.device.type != "cuda"
    static_label = "HF generate, static cache, " + ("not compiled (cpu)" if on_cpu else "compiled")

    def hf_static(batch: int) -> DecodeRow:
        note = ["compile skipped on cpu (too slow for a smoke run)"] if on_cpu else []
        return DecodeRow(batch, "hf_static", static_label, decode.hf(static=True), compiles=not on_cpu,
                         kind="hf", engine="static", note=note)

    def tah_row(batch: int, key: str, label: str, rate: float | None, engine: str = "auto",
                candidates: int | None = None, steps_compiled: bool = False, sampling: bool = False) -> DecodeRow:
        # an "auto" engine may capture CUDA graphs on its first run: a full warm-up then
        return DecodeRow(batch, key, label, decode.tah(rate, engine, candidates, steps_compiled, sampling),
                         rate=rate, engine=engine, compiles=ENGINE_KEYWORD and engine != "eager")

    if compiled:  # engine "static" (what "auto" takes on CUDA), so that a CPU smoke run compiles its steps too
        static = "static" if ENGINE_KEYWORD else "auto"
        core = [row for batch in (one, many) for row in (
            tah_row(batch, "never", "tah, decider never", None, static),
            tah_row(batch, "10%", "tah, 10% iterated", 0.1, static),
            tah_row(batch, "never_compiled", "tah, decider never, steps compiled", None, static, steps_compiled=True),
            tah_row(batch, "10%_compiled", "tah, 10% iterated, steps compiled", 0.1, static, steps_compiled=True))]
        return core, [hf_static(one)]

    core = []
    for batch in (one, many):
        core += [DecodeRow(batch, "hf_eager", "HF generate, eager, dynamic cache", decode.hf(static=False), kind="hf",
                           engine="eager"),
                 tah_row(batch, "never", "tah, decider never", None),
                 tah_row(batch, "10%", "tah, 10% iterated", 0.1)]
    extra = [hf_static(one), hf_static(many)]  # after training: the compiles are the longest, least certain rows
    extra += [tah_row(batch, "10%_sampled", "tah, 10% iterated, sampling (T 0.6, top-p 0.95, top-k 20)", 0.1,
                      sampling=True) for batch in (one, many)]
    eager = "eager" if ENGINE_KEYWORD else "auto"  # without the keyword, the auto rows are the eager engine's
    for batch in (one, many):
        if ENGINE_KEYWORD:
            extra.append(tah_row(batch, "10%_eager", "tah, 10% iterated, engine eager", 0.1, "eager"))
        extra.append(tah_row(batch, "always", "tah, every token iterated", 1.0))
    extra += [tah_row(one, f"10%_drafts{k}", f"tah, 10%, engine {eager}, {k} draft candidate{'s' * (k > 1)}", 0.1,
                      eager, k) for k in (1, 2, 4)]
    if ENGINE_KEYWORD:
        extra += [tah_row(b, "never_eager", "tah, decider never, engine eager", None, "eager") for b in (one, many)]
    return core, extra


def decode_estimate(row: DecodeRow, done: dict, repeats: int) -> float:
    """Seconds the row will likely take, from the rows measured so far (0 when nothing to go by): a
    static-cache recompile about what the first compile took; a tah row what a measured row of its
    share took, of its engine where one ran (an underestimate is caught by the per-run budget check)."""
    if row.key == "hf_static":
        first = next((r for (b, k), r in done.items() if k == "hf_static" and r.get("compiled")), None)
        return first["compile_seconds"] if first else 0.0
    if row.kind != "tah":
        return 0.0
    share = "10%" if row.rate == 0.1 else "never"
    eager = ("10%_eager" if row.rate == 0.1 else "never_eager") if row.engine == "eager" else None
    reference = done.get((row.batch, eager)) or done.get((row.batch, share))
    if reference is None:
        return 0.0
    factor = 2.5 if row.rate == 1.0 else 1.0  # every token iterated: about 2.5x never's time on the eager engine
    return (repeats + 0.2) * factor * statistics.median(reference["seconds"])


# -- training --------------------------------------------------------------------------------------
COMPILED = "stage1_10%_compiled"  # `compile_deep_passes`: its first step compiles (minutes); --compiled runs it
TRAIN_ROWS = {  # key: (label, hard share or None for SFT, stage)
    "sft": ("plain SFT of the base model", None, 1),
    "stage1_0%": ("TaH stage 1, 0% hard tokens", 0.0, 1),
    "stage1_10%": ("TaH stage 1, 10% hard tokens", 0.1, 1),
    "stage2": ("TaH stage 2 (decider only), 10% hard labels", 0.1, 2),
    COMPILED: ("TaH stage 1, 10% hard tokens, deeper passes compiled", 0.1, 1),
}


def measure_train(key: str, setup: Setup, device: torch.device, dtype: torch.dtype, budget: Budget) -> dict:
    """One row in its own phase: build, warm up, time, free. The peak is this row's own."""
    label, hard, stage = TRAIN_ROWS[key]
    free_memory(device)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, setup.vocab, (setup.train_batch, setup.train_length), generator=gen)
    batch = dict(input_ids=ids, labels=ids)
    model = base_model(setup, device, torch.float32).train()
    if hard is not None:
        model = wrap(model, device, decider="mlp").train()
        model.set_training_stage(stage)
        batch["iter_labels"] = hard_labels(setup.train_batch, setup.train_length, hard, gen)
        if key == COMPILED:
            model.compile_deep_passes()
    batch = {name: t.to(device) for name, t in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    started = time.perf_counter()
    for _ in range(max(setup.train_warmup, 1 if key == COMPILED else 0)):  # the compile happens here
        step()
    sync(device)
    warmup = time.perf_counter() - started
    times, losses = [], []
    for _ in range(setup.train_steps):
        if times and not budget.allows(times[-1]):
            break
        start = time.perf_counter()
        losses.append(step())
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None
    seconds = statistics.median(times)
    return dict(key=key, label=label, steps=len(times), seconds=times, step_seconds=seconds, warmup_s=warmup,
                tokens_per_s=setup.train_batch * setup.train_length / seconds, peak_bytes=peak,
                trainable_params=sum(p.numel() for p in params), loss=float(losses[-1]))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- report ----------------------------------------------------------------------------------------
def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def decode_ratios(rows: list[dict]) -> None:
    """Add each row's ratios (to HF eager, HF static, and `never` of its engine) in place."""
    by = {(r["batch"], r["key"]): r for r in rows}
    for r in rows:
        speed = r["tokens_per_s"]
        hf_eager, hf_static = by.get((r["batch"], "hf_eager")), by.get((r["batch"], "hf_static"))
        r["vs_hf_eager"] = ratio(speed, hf_eager and hf_eager["tokens_per_s"])
        r["vs_hf_static"] = ratio(speed, hf_static and hf_static["tokens_per_s"])
        r["vs_never"] = r["kv_bytes_vs_never"] = None
        if r["kind"] == "tah" and r["key"] not in ("never", "never_eager"):
            never = by.get((r["batch"], "never_eager" if r["engine"] == "eager" else "never"))
            never = never or by.get((r["batch"], "never"))
            if never:
                r["vs_never"] = ratio(speed, never["tokens_per_s"])
                r["vs_never_engine"] = never["engine"]
                r["kv_bytes_vs_never"] = ratio(r["kv_bytes"], never["kv_bytes"])
        if r["key"] == "never_eager":
            never = by.get((r["batch"], "never"))
            r["vs_never"] = ratio(speed, never and never["tokens_per_s"])
            r["vs_never_engine"] = "auto"
        if r["key"].endswith("_compiled"):  # against never with the steps compiled alike; that one against never
            never = by.get((r["batch"], "never" if r["key"] == "never_compiled" else "never_compiled"))
            r["vs_never"] = ratio(speed, never and never["tokens_per_s"])
            r["vs_never_engine"] = "auto" if r["key"] == "never_compiled" else "compiled"


def train_ratios(rows: list[dict]) -> None:
    sft = next((r for r in rows if r["key"] == "sft"), None)
    for r in rows:
        r["vs_sft"] = ratio(r["tokens_per_s"], sft and sft["tokens_per_s"])
        r["peak_vs_sft"] = ratio(r["peak_bytes"], sft and sft["peak_bytes"])


def cell(value: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown_table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A title line and a Markdown table: compact in a log, and pasteable into an issue note."""
    widths = [max(len(col), *(len(row[i]) for row in rows)) for i, col in enumerate(columns)]
    left = [col in ("row", "note") for col in columns]

    def line(cells) -> str:
        return "| " + " | ".join(c.ljust(w) if lf else c.rjust(w) for c, w, lf in zip(cells, widths, left, strict=True)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + "-") if lf else ("-" * (w + 1) + ":") for w, lf in zip(widths, left, strict=True)) + "|"
    return "\n".join([title, "", line(columns), rule, *(line(row) for row in rows)])


def decode_table(setup: Setup, dtype: torch.dtype, rows: list[dict]) -> str:
    order = {key: i for i, key in enumerate(DECODE_ORDER)}
    lines = []
    for r in sorted(rows, key=lambda r: (r["batch"], order.get(r["key"], len(order)))):
        vs_never = cell(r["vs_never"])
        if r["vs_never"] is not None and r.get("vs_never_engine") != r["engine"]:
            vs_never += f" ({r['vs_never_engine']})"
        drafts = "-" if not r.get("drafts") else f"{r['draft_candidates']} ({r['acceptance']:.0%})"
        note = r["note"]
        if r.get("compile_seconds") is not None:
            note = f"compile {r['compile_seconds']:.0f} s, compiled: {r['compiled']}" + (f"; {note}" if note else "")
        lines.append((str(r["batch"]), r["label"], f"{r['tokens_per_s']:.1f}", cell(r["vs_hf_eager"]),
                      cell(r["vs_hf_static"]), vs_never, cell(r.get("iterated"), "{:.1%}"), cell(r.get("kv_vs_base")),
                      cell(r["kv_bytes_vs_never"]), drafts, str(r["runs"]), r["engine_used"], note))
    return markdown_table(
        f"decode: prompt {setup.prompt}, {setup.new_tokens} new tokens, greedy (but the sampling rows), no EOS, {dtype_name(dtype)}; tokens/s: "
        f"median of up to {setup.repeats} runs after a warm-up; ratios: of those medians; vs never: the `never` row "
        "of the same engine; KV vs base: cache entries / one per token",
        ("batch", "row", "tokens/s", "vs HF eager", "vs HF static", "vs never", "iterated", "KV vs base",
         "KV bytes vs never", "drafts (accept)", "runs", "engine", "note"), lines)


def train_table(setup: Setup, dtype: torch.dtype, rows: list[dict]) -> str:
    lines = [(r["label"], f"{r['tokens_per_s']:.0f}", cell(r["vs_sft"]), f"{r['step_seconds']:.3f}",
              cell(r["peak_bytes"] and r["peak_bytes"] / GiB, "{:.2f}"), cell(r["peak_vs_sft"]),
              f"{r['trainable_params'] / 1e6:.1f}M", f"{r['loss']:.3f}", str(r["steps"])) for r in rows]
    return markdown_table(
        f"training step: batch {setup.train_batch} x {setup.train_length}, float32 weights, autocast "
        f"{dtype_name(dtype)}, AdamW; median of up to {setup.train_steps} steps after {setup.train_warmup} warm-up; "
        "peak: the row's own max_memory_allocated",
        ("row", "tokens/s", "vs SFT", "s/step", "peak GiB", "peak vs SFT", "trainable", "loss", "steps"), lines)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def environment(device: torch.device, setup: Setup, dtype: torch.dtype, budget: Budget) -> dict:
    env = dict(device=str(device), torch=torch.__version__, transformers=transformers.__version__,
               python=platform.python_version(), tah=tah.__version__, engine_keyword=ENGINE_KEYWORD,
               dtype=dtype_name(dtype), setup=asdict(setup), budget_s=budget.seconds)
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


# -- main ------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny shape, one repeat: every row in seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                        help="decode weights and the training autocast dtype")
    parser.add_argument("--budget-s", type=float, default=280.0,
                        help="seconds from the process start; rows that would not fit are skipped")
    parser.add_argument("--repeats", type=int, default=None, help="timed decode runs per row (default 3; smoke 1)")
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    parser.add_argument("--compiled", action="store_true",
                        help="instead of the full run: the compiled rows (training's deeper passes, decoding's "
                             "static steps) beside their eager references")
    return parser.parse_args()


class Run:
    """The rows of one run, each attempted in turn under the budget, and what they gave (`results`)."""

    def __init__(self, setup: Setup, device: torch.device, dtype: torch.dtype, budget: Budget,
                 compiled: bool = False) -> None:
        self.setup, self.device, self.dtype, self.budget = setup, device, dtype, budget
        self.compiled = compiled
        self.results = dict(environment=environment(device, setup, dtype, budget), decode=[], train=[],
                            skipped=[], errors=[])
        self.decode: Decode | None = None
        self.failed: set[str] = set()  # decode row keys that raised (at one batch size)

    def skip(self, name: str, reason: str) -> None:
        log(self.budget, f"SKIPPED {name} ({reason})")
        self.results["skipped"].append(dict(row=name, reason=reason))

    def attempt(self, name: str, fn: Callable, estimate: float = 0.0, summary: Callable = lambda value: "done") -> object:
        """fn() unless the budget cannot hold `estimate` more seconds; a failure printed and recorded, a
        success by summary(value)."""
        budget = self.budget
        if not budget.allows(estimate):
            more = f", about {estimate:.0f} s more needed" if estimate else ""
            self.skip(name, f"budget: {budget.elapsed():.0f} s used{more} of {budget.seconds:.0f} s")
            return None
        log(budget, f"{name} ...")
        started = time.monotonic()
        try:
            value = fn()
        except OutOfTime as err:
            log(budget, f"STOPPED {name}: {err}")
            self.results["errors"].append(dict(row=name, error=str(err)))
            return None
        except Exception:
            log(budget, f"FAILED {name}:")
            traceback.print_exc()
            sys.stderr.flush()
            self.results["errors"].append(dict(row=name, error=traceback.format_exc()))
            return None
        log(budget, f"  {summary(value)} ({time.monotonic() - started:.1f} s)")
        return value

    def decode_rows(self, rows: list[DecodeRow]) -> None:
        done = {(r["batch"], r["key"]): r for r in self.results["decode"]}
        for row in rows:
            name = f"decode batch {row.batch}: {row.label}"
            if row.key in self.failed:  # e.g. the static-cache compile: it would fail again, slowly
                self.skip(name, "it failed at the other batch size")
                continue
            errors = len(self.results["errors"])
            record = self.attempt(name, lambda row=row: measure_decode(self.decode, row, self.budget),
                                  decode_estimate(row, done, self.setup.repeats), decode_summary)
            if len(self.results["errors"]) > errors and not self.budget.expired:
                self.failed.add(row.key)
            if record:
                done[row.batch, row.key] = record
                self.results["decode"].append(record)

    def train_rows(self, keys) -> None:
        for key in keys:
            label = TRAIN_ROWS[key][0]
            record = self.attempt(f"training: {label}",
                                  lambda key=key: measure_train(key, self.setup, self.device, self.dtype, self.budget),
                                  summary=train_summary)
            free_memory(self.device)  # the row's model and optimizer, also after a failure
            if record:
                self.results["train"].append(record)

    def all_rows(self) -> None:
        """The rows, most important and surest first: HF eager and tah's own decode rows, training, the
        HF static-cache compiles, the rest. `--compiled` runs the compiled rows (`compile_deep_passes`,
        `compile_decode_steps`) with their references instead: their compiles may take minutes."""
        self.decode = self.attempt("build the decode models", lambda: Decode(self.setup, self.device, self.dtype))
        core, extra = decode_rows(self.decode, self.compiled) if self.decode else ([], [])
        if self.compiled:  # the compiled rows and their eager references, training first
            self.train_rows(["sft", "stage1_10%", COMPILED])
            self.decode_rows(core + extra)
            return
        self.decode_rows(core)
        if not ENGINE_KEYWORD:
            for b in self.setup.batches:
                self.results["skipped"].append(dict(row=f"decode batch {b}: engine eager rows", reason=(
                    "tah.generate takes no engine= keyword: its one engine is the auto rows'")))
        self.train_rows([key for key in TRAIN_ROWS if key != COMPILED])
        self.decode_rows(extra)


def decode_summary(record: dict) -> str:
    share = f", iterated {record['iterated']:.1%}" if "iterated" in record else ""
    note = f"; {record['note']}" if record["note"] else ""
    return f"{record['tokens_per_s']:.1f} tokens/s over {record['runs']} runs{share}, {record['engine_used']}{note}"


def train_summary(record: dict) -> str:
    peak = f", peak {record['peak_bytes'] / GiB:.2f} GiB" if record["peak_bytes"] else ""
    return f"{record['tokens_per_s']:.0f} tokens/s{peak}, loss {record['loss']:.3f}, warm-up {record['warmup_s']:.1f} s"


def report(run: Run) -> None:
    results, budget = run.results, run.budget
    decode_ratios(results["decode"])
    train_ratios(results["train"])
    results["environment"]["elapsed_s"] = budget.elapsed()
    if results["decode"]:
        print("\n" + decode_table(run.setup, run.dtype, results["decode"]) + "\n")
    print(train_table(run.setup, run.dtype, results["train"]) + "\n")
    for skipped in results["skipped"]:
        print(f"skipped: {skipped['row']}: {skipped['reason']}")
    for failed in results["errors"]:
        print(f"failed: {failed['row']}: {failed['error'].strip().splitlines()[-1]}")
    print(f"total {budget.elapsed():.0f} s of a {budget.seconds:.0f} s budget", flush=True)


def main() -> int:
    args = parse_args()
    budget = Budget(args.budget_s)
    budget.arm_alarm()
    setup = SMOKE if args.smoke else FULL
    if args.repeats is not None:
        setup = Setup(**{**asdict(setup), "repeats": max(args.repeats, 1)})
    run = Run(setup, torch.device(args.device), getattr(torch, args.dtype), budget, args.compiled)
    log(budget, f"bench_gpu on {run.results['environment'].get('gpu', args.device)}: torch {torch.__version__}, "
                f"transformers {transformers.__version__}, tah.generate engine= keyword: {ENGINE_KEYWORD}")
    try:
        run.all_rows()
    except OutOfTime as err:  # the alarm between two rows
        log(budget, f"STOPPED: {err}")
    budget.disarm_alarm()
    report(run)
    if args.out:
        args.out.write_text(json.dumps(run.results, indent=1, default=str))
    return 1 if run.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
