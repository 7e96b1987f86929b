"""Where a TaH stage-1 training step spends its time on a GPU: host (CPU) vs device, per op.

One step of bench_gpu.py's training workload (the Qwen3-0.6B shape, batch 4 x 1024, float32 weights
under bf16 autocast, AdamW) profiled with torch.profiler, at 0% and 10% hard tokens, after warm-up.
Prints, for each: the step's wall time, the summed device-kernel time, the host ops dispatched, the
host syncs (cudaStreamSynchronize / cudaDeviceSynchronize / blocking copies), and the top ops by
self host time and by self device time. When wall time is well above device time, the step waits
on the host (launch-bound). --smoke: a tiny shape on CPU (checks the script, not the GPU).
Usage: python benchmarks/profile_gpu_train.py [--smoke] [--top 15]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import with_small_adapters  # noqa: E402
from bench_train import hard_labels  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from tah import TaHConfig, TaHForCausalLM  # noqa: E402

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize")


def random_qwen3(smoke: bool) -> Qwen3ForCausalLM:
    """A random Qwen3 of the 0.6B shape (bench_gpu.py's), or a tiny one with `smoke`; float32, on the CPU."""
    if smoke:
        shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    else:
        shape = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**shape, tie_word_embeddings=True, max_position_embeddings=4096,
                                        attn_implementation="sdpa"))


def build(smoke: bool, device: str) -> tuple[TaHForCausalLM, int, int]:
    batch, length = (2, 64) if smoke else (4, 1024)
    lm = random_qwen3(smoke)
    config = TaHConfig(max_iter=2, lora_rank=16, lora_alpha=32.0, decider="mlp", training_stage=1)
    model = with_small_adapters(TaHForCausalLM.from_base(lm, config)).to(device).train()
    return model, batch, length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    model, batch, length = build(args.smoke, device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.lm.config.vocab_size, (batch, length), generator=gen).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for share in (0.0, 0.1):
        labels = hard_labels(batch, length, share, gen).to(device)

        def step(labels: torch.Tensor = labels) -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(ids, labels=ids, iter_labels=labels).loss
            loss.backward()
            optimizer.step()

        for _ in range(2):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            started = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - started
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") \
            if device == "cuda" else 0
        host_ops = sum(e.count for e in events if e.key.startswith("aten::"))
        syncs = {e.key: e.count for e in events if any(e.key.startswith(s) for s in SYNC_EVENTS)}
        print(f"\n== stage 1, {share:.0%} hard: wall {wall * 1e3:.1f} ms, device kernels {device_us / 1e3:.1f} ms, "
              f"aten ops {host_ops}, syncs {syncs}", flush=True)
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=45))
        if device == "cuda":
            print(events.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=45))


if __name__ == "__main__":
    main()
