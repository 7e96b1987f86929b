"""Decode speed of TaH vs the same engine at one pass vs HF `generate` on the bare base model.

A random-init Qwen3 of ~41M parameters (vocab 32000, hidden 512, 8 layers, 8 heads / 4 KV heads,
head_dim 64, MLP 1536, tied embeddings), float32, 2 threads; greedy; the `random` decider makes a
chosen share of tokens iterate (max_iter 2), exactly that share of every few positions
(`ExactShareDecider`). Every figure is a ratio measured in this one run
(the median over --repeats repeats, after a warm-up, of the ratio within each repeat, with its
range in brackets; tokens/s are medians). TaH engines (`never`, and `random` at each rate) run in
lockstep: their decode steps interleave, one step of each in turn, so the noise of a shared
machine hits all alike (`lockstep`); `never` vs HF `generate` compares whole runs, round-robin.
--breakdown adds where each TaH row's extra time goes, from the engine's step timings
(DecodeStats) of the last lockstep repeat. Usage: python benchmarks/bench_decode.py [--quick] [--breakdown]
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import time
from fractions import Fraction
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table
from transformers import Qwen3Config, Qwen3ForCausalLM

import tah.kernels.cpu.few_rows as few_rows
from tah import TaHConfig, TaHForCausalLM
from tah.generation import engine, generate
from tah.generation.generate import MAX_DRAFT_CANDIDATES
from tah.model import lora
from tah.model.decider import ConstantDecider, RandomDecider


def base_model(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=4096, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    return Qwen3ForCausalLM(config).eval()


def tah_model(lm) -> TaHForCausalLM:
    """The TaH model every engine row runs (max_iter 2, LoRA r16 on every linear); `use_decider`
    switches what iterates, so all rows read the same weights from the same memory."""
    config = TaHConfig(max_iter=2, decider="never", seed=0, lora_rank=16, lora_alpha=32.0)
    return with_small_adapters(TaHForCausalLM.from_base(lm, config).eval())


def use_decider(model: TaHForCausalLM, rate: float | None) -> TaHForCausalLM:
    """rate None: the `never` decider (the engine at one pass); else `random` at exactly that share."""
    model.decider = ConstantDecider(False) if rate is None else ExactShareDecider(rate, seed=0)
    return model


class ExactShareDecider(RandomDecider):
    """`random` at an exact share: of every block of n consecutive positions (rate = k / n, n <= 100),
    the k whose (seed, position, depth) draws are lowest continue. A draw per token, as
    `RandomDecider` makes, iterates 5.1-11.7% of the 256 tokens generated after a 64-token prompt
    for seeds 0-9 (11.7% with seed 0), so the ratios would measure that seed's share, not the
    issue's 10%; here it is 10% of every 10 positions."""

    def __init__(self, rate: float, seed: int) -> None:
        super().__init__(rate, seed)
        share = Fraction(rate).limit_denominator(100)
        self.block, self.per_block = share.denominator, share.numerator

    def draw(self, positions: torch.Tensor, depth: int | torch.Tensor) -> torch.Tensor:
        depth = torch.as_tensor(depth, device=positions.device)
        start = positions - positions % self.block
        block = start[..., None] + torch.arange(self.block, device=positions.device)  # (..., n) its block
        below = self.score(block, depth[..., None]) < self.score(positions, depth)[..., None]
        return below.sum(-1) < self.per_block  # among the block's per_block lowest draws


def with_small_adapters(model: TaHForCausalLM, seed: int = 0) -> TaHForCausalLM:
    """Give every LoRA B small random weights: a trained-looking adapter (zero would skip no work,
    but would make depth >= 1 an exact copy of depth 0). Seeded: how often depth 1 changes the
    depth-0 token (the draft acceptance, hence the speed) depends on these weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.lora.values():
            for b in module.lora_B:
                b.copy_(torch.randn(b.shape, generator=generator) * 0.01)
    return model


def interleaved_runs(runs: dict, repeats: int) -> dict:
    """{name: fn} -> {name: (seconds of each repeat, last result)}. Round-robin repeats after one
    warm-up each, the first engine rotating from repeat to repeat, so that a slow spell of this
    noisy machine, or a drift over minutes, hits every engine alike instead of one."""
    for fn in runs.values():
        fn()
    names = list(runs)
    times = {name: [] for name in runs}
    results = {}
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            start = time.perf_counter()
            results[name] = runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: (times[name], results[name]) for name in runs}


class _Started(Exception):
    """Raised by `started` to leave `tah.generate` once its decoder has prefilled."""


def started(model, ids: torch.Tensor, **kwargs) -> engine.Decoder:
    """The decoder `tah.generate(model, ids, **kwargs)` runs, after its prefill: generate builds it
    (its argument checks and defaults, e.g. the draft count), and only its step loop is left to
    `lockstep`."""
    box = []

    def begin_only(decoder, input_ids, attention_mask, capacity):
        decoder.begin(input_ids, attention_mask, capacity)
        box.append(decoder)
        raise _Started

    with mock.patch.object(engine.Decoder, "run", begin_only):
        try:
            generate(model, ids, **kwargs)
        except _Started:
            pass
    return box[0]


def lockstep(model, rates: list, ids: torch.Tensor, repeats: int, steps: int = 1, **kwargs) -> dict:
    """{rate: (seconds of each repeat, last output)} for TaH engines at `rates` (None: `never`),
    their decode steps interleaved: `steps` steps of each engine in turn, so that whatever this noisy
    machine does in a stretch of time (slow spells of 10-30% come and go within a run) hits every
    engine alike. An engine's seconds are its prefill and its own steps. Ratios of whole runs, even
    paired, swung 0.90-0.99 over repeats where these read 0.94-0.95 (batch 1, context 64). One
    warm-up repeat first."""
    times = {rate: [] for rate in rates}
    outputs = {}
    for repeat in range(repeats + 1):
        order = rates[repeat % len(rates):] + rates[:repeat % len(rates)]
        decoders, deciders = {}, {}
        for rate in order:
            decoders[rate] = started(use_decider(model, rate), ids, **kwargs)
            deciders[rate] = model.decider
        while not all(decoder.finished for decoder in decoders.values()):
            for rate, decoder in decoders.items():
                model.decider = deciders[rate]
                for _ in range(steps):
                    if not decoder.finished:
                        decoder.step()
        for rate, decoder in decoders.items():
            outputs[rate] = decoder.end()
            stats = outputs[rate].stats
            if repeat:
                times[rate].append(own_seconds(stats))
    return {rate: (times[rate], outputs[rate]) for rate in rates}


def speed_ratio(engine: list[float], reference: list[float]) -> tuple[float, float, float]:
    """engine's speed vs reference's from their seconds in each repeat: the median, min and max
    of reference_i / engine_i. Pairing the two runs of one repeat cancels what the machine's own
    speed does between repeats (on a noisy machine whole runs move by 10-30% over minutes), which a
    ratio of two separate medians does not."""
    ratios = [r / e for e, r in zip(engine, reference, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def ratio_cell(ratio: tuple[float, float, float]) -> str:
    median, low, high = ratio
    return f"{median:.3f} ({low:.2f}-{high:.2f})" if high > low else f"{median:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 2048])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    parser.add_argument("--draft-candidates", type=int, choices=range(1, MAX_DRAFT_CANDIDATES + 1), default=None,
                        help="drafts beside a hard token (tah.generate's draft_candidates: 2 or more add the "
                             "depth-0 runner-ups; default: tah.generate's, 2 at batch 1 and 1 above)")
    parser.add_argument("--pack-real-share", type=float, default=lora.PACK_REAL_SHARE,
                        help="decode steps with at most this share of real queries run the linears on "
                             "those only (tah.model.lora.PACK_REAL_SHARE; 0 = never)")
    parser.add_argument("--few-rows-max", type=int, default=few_rows.MAX_ROWS,
                        help="products over at most this many rows take the layout this machine runs fastest "
                             "(tah.kernels.cpu.few_rows.MAX_ROWS; 0 = always F.linear, as HF does)")
    parser.add_argument("--lockstep-steps", type=int, default=1,
                        help="TaH engines take turns of this many decode steps (see `lockstep`)")
    parser.add_argument("--quick", action="store_true", help="64 new tokens, 1 repeat, batch 1, context 64")
    parser.add_argument("--breakdown", action="store_true", help="also print where TaH's extra time goes")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.batches, args.contexts = 64, 1, [1], [64]
    lora.PACK_REAL_SHARE = args.pack_real_share
    few_rows.MAX_ROWS = args.few_rows_max
    torch.set_num_threads(2)
    console = Console(width=150)
    bare = base_model()
    model = tah_model(copy.deepcopy(bare))
    rates = [None, *args.rates]
    drafts = "tah.generate's default" if args.draft_candidates is None else args.draft_candidates
    table = Table(title=f"decode: {args.new_tokens} new tokens, greedy, float32, 2 threads, draft candidates: {drafts}; "
                        f"ratios: median (range) over {args.repeats} repeats of the ratio within each; TaH engines "
                        f"in lockstep (turns of {args.lockstep_steps} steps; tokens/s: prefill and own steps), "
                        "HF and `never` by whole runs")
    for col in ("batch", "context", "engine", "tokens/s", "vs never", "never vs HF", "iterated", "KV vs base",
                "draft accept (candidates)"):
        table.add_column(col, justify="right")
    breakdown = breakdown_table()
    gen = torch.Generator().manual_seed(0)
    for batch in args.batches:
        for context in args.contexts:
            ids = torch.randint(3, 32000, (batch, context), generator=gen)
            new = args.new_tokens
            options = dict(max_new_tokens=new, draft_candidates=args.draft_candidates)
            # never vs HF: whole runs, HF's loop cannot be interleaved; TaH vs never: steps interleaved
            measured = interleaved_runs({
                "HF": lambda ids=ids, new=new: bare.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                    min_new_tokens=new, pad_token_id=0),
                None: lambda ids=ids, options=options: generate(use_decider(model, None), ids, **options)}, args.repeats)
            locked = lockstep(model, rates, ids, args.repeats, args.lockstep_steps, **options)
            never_times = locked[None][0]
            for rate in rates:
                label = "never" if rate is None else f"random {rate:.0%}"
                times, out = locked[rate]
                stats = out.stats
                iterated = (out.iter_counts > 1).float().mean().item()
                row = (str(batch), str(context), label, f"{batch * new / statistics.median(times):.1f}",
                       ratio_cell(speed_ratio(times, never_times)),
                       ratio_cell(speed_ratio(measured[None][0], measured["HF"][0])) if label == "never" else "",
                       f"{iterated:.1%}", f"{kv_ratio(out, batch, context, new):.3f}",
                       f"{stats.acceptance:.1%} ({stats.draft_candidates})" if stats.drafts else "-")
                table.add_row(*row)
                console.print("  ".join(row), style="dim")  # progress, before the table at the end
                if rate is not None:
                    breakdown.add_row(str(batch), str(context), label, *extra_time(stats, locked[None][1].stats))
            hf_speed = batch * new / statistics.median(measured["HF"][0])
            table.add_row(str(batch), str(context), "HF generate (bare)", f"{hf_speed:.1f}", "", "", "", "1.000", "")
            never_alone = batch * new / statistics.median(measured[None][0])
            table.add_row(str(batch), str(context), "never (whole runs)", f"{never_alone:.1f}", "", "", "", "", "")
    console.print(table)
    layouts = collections.Counter(few_rows.chosen().values())
    console.print("few_rows layouts chosen (per product shape): "
                  + (", ".join(f"{name} x{count}" for name, count in sorted(layouts.items())) or "none"))
    if args.breakdown:
        console.print(breakdown)


def breakdown_table() -> Table:
    table = Table(title="where TaH's extra time goes: ms vs the `never` engine (last lockstep repeat), "
                        "each part's share of never's time in brackets")
    for col, note in (("batch", ""), ("context", ""), ("engine", ""), ("prefill", "hard prompt tokens"),
                      ("deep steps", "count x extra each"), ("extra steps", "rolled-back drafts"),
                      ("shallow steps", "count x extra each"), ("total", "")):
        table.add_column(f"{col}\n({note})" if note else col, justify="right")
    return table


def extra_time(tah, never) -> tuple[str, ...]:
    """TaH's extra seconds over the `never` engine (own time), split into parts that sum to the whole. A step
    is priced at never's mean step: a deeper pass costs what its step takes beyond that, a rolled-back
    draft costs one more step (fusing saves one per kept draft), and a depth-0-only step costs what
    the decider and the masked attention add."""
    step = never.shallow_seconds / max(never.shallow_steps, 1)
    parts = {
        "prefill": tah.prefill_seconds - never.prefill_seconds,
        "deep": tah.deep_seconds - tah.deep_steps * step,
        "steps": (tah.forwards - never.forwards) * step,
        "shallow": tah.shallow_seconds - tah.shallow_steps * step,
    }
    total, never_seconds = sum(parts.values()), own_seconds(never)

    def cell(seconds: float, count: int | None = None) -> str:
        each = f"{count} x {seconds / count * 1e3:+.2f} = " if count else ""
        return f"{each}{seconds * 1e3:+.0f} ({seconds / never_seconds:+.1%})"

    return (cell(parts["prefill"]), cell(parts["deep"], tah.deep_steps),
            f"{tah.forwards - never.forwards:+d} = {cell(parts['steps'])}", cell(parts["shallow"], tah.shallow_steps),
            cell(total))


def own_seconds(stats) -> float:
    """An engine's own time: its prefill and its steps (in lockstep, not the other engines' steps)."""
    return stats.prefill_seconds + stats.shallow_seconds + stats.deep_seconds


def kv_ratio(out, batch: int, context: int, new: int) -> float:
    """KV entries TaH kept vs the base model's (one per token), from the engine's cache."""
    entries = out.stats.kv_entries
    return entries / (batch * (context + new))


if __name__ == "__main__":
    main()
