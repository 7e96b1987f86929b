"""`tah serve` under load: N concurrent streaming clients, continuous batching vs one request at a time.

Starts `tah serve` twice on a free loopback port (--max-batch N, then --max-batch 1) and runs the
same workload against each: every client sends --requests streaming completions one after the
other (greedy, --max-tokens each; no new request after --duration seconds). Prints throughput
(generated tokens/s over the wall time), time to first token and inter-token latency (p50/p99;
a chunk of several tokens counts its gap once per token), the iterated share (from the `tah` field)
and the throughput ratio. The model: --model CKPT, or a random Qwen3 built here (hidden 256, 4 layers,
a random decider iterating ~10% of tokens) with the character tokenizer.

    python benchmarks/bench_serve.py                 # 16 clients
    python benchmarks/bench_serve.py --smoke         # a tiny run that checks the script works
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

NAME = "bench"


@dataclass
class Run:
    """What one mode's clients saw."""

    tokens: int = 0
    iterated: int = 0
    requests: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)


def build_model(out: Path, smoke: bool) -> Path:
    """A random TaH checkpoint with the character tokenizer, saved to `out`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tah import TaHConfig, TaHForCausalLM
    from tah.toy.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    hidden, layers = (32, 2) if smoke else (256, 4)
    torch.manual_seed(0)
    lm = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=hidden // 4, max_position_embeddings=2048, tie_word_embeddings=True))
    config = TaHConfig(max_iter=2, lora_rank=8, lora_alpha=16.0, decider="random", random_rate=0.1)
    TaHForCausalLM.from_base(lm, config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, max_batch: int, threads: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """`tah serve` of `model` on a free port, with `extra` options; (its process, its URL) once it answers."""
    port = free_port()
    log = tempfile.TemporaryFile()  # the server's stderr (a file, not a pipe nobody drains), shown if it fails to start
    process = subprocess.Popen([sys.executable, "-m", "tah.cli", "serve", "--model", model, "--port", str(port),
                                "--max-batch", str(max_batch), "--served-name", NAME, "--threads", str(threads), *extra],
                               stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            log.seek(0)
            said = log.read().decode(errors="replace")[-3000:]
            raise SystemExit(f"tah serve exited with {process.returncode}; its last output:\n{said}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("tah serve did not start within 120 s")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, run: Run) -> None:
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    sent = last = time.perf_counter()
    first = True
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            passes = json.loads(line[6:])["tah"]["passes"]
            if not passes:
                continue
            now = time.perf_counter()
            if first:
                run.ttft.append(now - sent)
                first = False
            else:
                run.itl.extend([(now - last) / len(passes)] * len(passes))
            last = now
            run.tokens += len(passes)
            run.iterated += sum(p > 1 for p in passes)
    run.requests += 1


async def load(url: str, clients: int, requests: int, max_tokens: int, duration: float) -> Run:
    run = Run()
    started = time.perf_counter()

    async def client_loop(c: int, client: httpx.AsyncClient) -> None:
        for r in range(requests):
            if time.perf_counter() - started > duration:
                return
            await one_request(client, url, f"Request {r} of client {c}: count the stars.", max_tokens, run)

    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await one_request(client, url, "warm up", 4, Run())
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
    run.seconds = time.perf_counter() - started
    return run


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q < 100 else max(values)


def report(name: str, run: Run) -> str:
    ms = 1000
    return (f"{name:<22} {run.requests:>8} {run.tokens:>7} {run.seconds:>7.2f} {run.tokens / run.seconds:>9.1f} "
            f"{percentile(run.ttft, 50) * ms:>9.1f} {percentile(run.ttft, 99) * ms:>9.1f} "
            f"{percentile(run.itl, 50) * ms:>8.2f} {percentile(run.itl, 99) * ms:>8.2f} "
            f"{run.iterated / max(run.tokens, 1):>9.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a TaH checkpoint directory (default: a random model built here)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default: 16)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after the other (default: 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default: 64)")
    parser.add_argument("--duration", type=float, default=300, help="no new request after this many seconds (default: 300)")
    parser.add_argument("--threads", type=int, default=1,
                        help="the server's torch threads (default: 1; on a small shared CPU more threads stall on "
                             "each other, which hurts batch 1 most)")
    parser.add_argument("--device", default="auto", help="tah serve's --device (default: auto, CUDA when there is one)")
    parser.add_argument("--engine", default="auto", choices=("auto", "eager", "static"),
                        help="tah serve's --engine (default: auto: the static engine on a GPU)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and load: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.requests, args.max_tokens = min(args.clients, 3), 1, 8
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_model(Path(tmp) / "model", args.smoke))
        print(f"model: {args.model or 'random Qwen3 (' + ('smoke' if args.smoke else 'hidden 256, 4 layers') + ')'}; "
              f"{args.clients} clients x {args.requests} requests x {args.max_tokens} tokens; "
              f"server threads {args.threads}, device {args.device}, engine {args.engine}; "
              f"load average before: {os.getloadavg()[0]:.2f}")
        runs = {}
        for name, max_batch in ((f"continuous (batch {args.clients})", args.clients), ("one at a time (batch 1)", 1)):
            process, url = start_server(model, max_batch, args.threads, "--device", args.device, "--engine", args.engine)
            try:
                runs[name] = asyncio.run(load(url, args.clients, args.requests, args.max_tokens, args.duration))
            finally:
                process.terminate()
                process.wait(60)
    print(f"{'mode':<22} {'requests':>8} {'tokens':>7} {'seconds':>7} {'tokens/s':>9} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'iterated':>9}   (times in ms)")
    for name, run in runs.items():
        print(report(name, run))
    batched, single = runs.values()
    ratio = (batched.tokens / batched.seconds) / (single.tokens / single.seconds)
    print(f"throughput ratio, continuous / one at a time: {ratio:.2f}x; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
