"""What one step of the static decode engine costs on a GPU: plain vs fused step, and the prefill.

bench_gpu.py's decode workload (the Qwen3-0.6B shape in bf16, prompt 256, decider iterating exactly
10% of positions): one `tah.generate` call captures the engine's CUDA graphs, then each step kind is
replayed alone and timed with CUDA events (median of --replays), beside the prefill (the eager model
forward that precedes decoding) and the host read that ends each step. Prints milliseconds at batch
1 and 32, and the ratio fused / plain: where a 10% run's time goes beyond its `never` run. Replays
advance the engine's state (its rows keep decoding), which is what a real step does too. Then, per
step kind, its kernels under torch.profiler (replays of its graph): how many a step launches and
the --top longest by device time a step, to say which kernels make a fused step cost what it does.
--smoke: a tiny shape on CPU, without graphs (checks the script, not the GPU).
Usage: python benchmarks/profile_gpu_decode.py [--smoke] [--replays 30] [--top 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import ExactShareDecider, with_small_adapters  # noqa: E402
from profile_gpu_train import random_qwen3  # noqa: E402

import tah  # noqa: E402
from tah import TaHConfig, TaHForCausalLM  # noqa: E402
from tah.model.cache import TaHCache  # noqa: E402


def build(smoke: bool, device: str) -> tuple[TaHForCausalLM, int, int, list[int]]:
    prompt, new, batches = (16, 8, [1, 2]) if smoke else (256, 128, [1, 32])
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lm = random_qwen3(smoke).to(device, dtype)
    model = with_small_adapters(TaHForCausalLM.from_base(lm, TaHConfig(max_iter=2, lora_rank=16, lora_alpha=32.0,
                                                                       decider="never"))).eval()
    model.decider = ExactShareDecider(0.1, seed=0)
    return model, prompt, new, batches


def timed(fn, device: str, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` calls (CUDA events on a GPU)."""
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--top", type=int, default=8, help="kernels listed per step kind (0: none)")
    args = parser.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    model, prompt, new, batches = build(args.smoke, device)
    vocab = model.lm.config.vocab_size
    for batch in batches:
        ids = torch.randint(3, vocab, (batch, prompt), device=device)
        out = tah.generate(model, ids, max_new_tokens=new, engine="static")  # captures the graphs
        runner = next(reversed(model._static_runners.values()))
        prefill = timed(lambda ids=ids: model(ids, past_key_values=TaHCache(capacity=prompt), use_cache=True,
                                              logits_to_keep=1), device, 5)
        plain = timed(lambda runner=runner: runner.step(False), device, args.replays)
        fused = timed(lambda runner=runner: runner.step(True), device, args.replays)
        read = timed(lambda runner=runner: runner.out.tolist(), device, args.replays)
        stats = out.stats
        print(f"batch {batch}: prefill {prefill:.2f} ms | plain step {plain:.3f} ms | fused step {fused:.3f} ms "
              f"({fused / plain:.2f}x plain) | host read {read:.3f} ms | the generate call: {stats.forwards} steps "
              f"({stats.deep_steps} fused), {stats.seconds * 1e3:.0f} ms, prefill {stats.prefill_seconds * 1e3:.0f} ms",
              flush=True)
        for fused_step in (False, True):
            if args.top:
                print_kernels(lambda runner=runner, f=fused_step: runner.step(f), device, args.replays, args.top,
                              f"batch {batch}, {'fused' if fused_step else 'plain'} step")


def print_kernels(step, device: str, replays: int, top: int, title: str) -> None:
    """Profile `replays` calls of `step`: the kernels a call launches and the `top` longest by device
    time a call (on CPU: the aten ops and their CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(replays):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    on_device = device == "cuda"
    events = [e for e in prof.key_averages()
              if (e.device_type.name == "CUDA") == on_device and (on_device or e.key.startswith("aten::"))]

    def per_call(e) -> float:  # microseconds a step
        return (e.self_device_time_total if on_device else e.self_cpu_time_total) / replays
    total = sum(per_call(e) for e in events)
    print(f"  {title}: {sum(e.count for e in events) / replays:.0f} {'kernels' if on_device else 'aten ops'} "
          f"a step, {total / 1e3:.3f} ms of {'device' if on_device else 'CPU'} time a step; longest:")
    for e in sorted(events, key=per_call, reverse=True)[:top]:
        print(f"    {per_call(e):9.1f} us  x{e.count / replays:5.1f}  {e.key[:100]}")


if __name__ == "__main__":
    main()
