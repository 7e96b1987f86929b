"""Round 9 (issue 29): the demo's seed with a base pretrained under LayerDrop (Fan et al., 2019).

A 28-layer LM loses little when one layer goes; the demo's 4-layer base, trained without any pressure to spread its
work, can lose most of what it knows (seed 1: loss 0.05 -> 2.4 with its cheapest layer removed). LayerDrop skips each
decoder layer of each training batch with probability P during the pretraining only (the residual stream passes it
unchanged), so that no single layer is indispensable; fine-tunes and evaluation run every layer.

    python layerdrop.py OUT --seeds 0,1 --p 0.1 [--set key=value ...]   (the demo_sweep.py --set keys)
"""
import argparse, json, sys, time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from transformers.models.qwen3 import modeling_qwen3

from tah.toy import pipeline
from tah.toy.demo import run_seed, summarise
from tah.toy.parallel import run_one_seed
from tah.toy.pipeline import DemoSettings
from tah.toy.verdict import verdict_lines

ap = argparse.ArgumentParser()
ap.add_argument("out"); ap.add_argument("--seeds", default="0,1,2"); ap.add_argument("--p", type=float, required=True)
ap.add_argument("--set", action="append", default=[])
ap.add_argument("--top", action="store_true", help="drop only the last decoder layer (deep layers are the redundant ones of LLMs)")
a = ap.parse_args()
torch.set_num_threads(1)
DROP = {"p": 0.0}
plain_forward = modeling_qwen3.Qwen3DecoderLayer.forward


def forward(self, hidden_states, *args, **kwargs):
    top = self.self_attn.layer_idx == self.self_attn.config.num_hidden_layers - 1
    if self.training and DROP["p"] > 0 and (top or not a.top) and torch.rand(()) < DROP["p"]:
        return hidden_states
    return plain_forward(self, hidden_states, *args, **kwargs)


modeling_qwen3.Qwen3DecoderLayer.forward = forward
plain_train = pipeline.Stages.train


def train(self, recipe, out, *args, **kwargs):
    DROP["p"] = a.p if out == "base" else 0.0
    try:
        return plain_train(self, recipe, out, *args, **kwargs)
    finally:
        DROP["p"] = 0.0


pipeline.Stages.train = train
s = DemoSettings()
task = {}
for item in a.set:
    key, value = item.split("=", 1)
    value = json.loads(value) if value[0] in "[{0123456789-.tfn" else value
    if key.startswith("task."):
        task[key[5:]] = tuple(value) if isinstance(value, list) else value
    else:
        setattr(s, key, value)
s.task = replace(s.task, **task)
console = Console(highlight=False, width=160, stderr=True)
runs, t0 = [], time.time()
for seed in map(int, a.seeds.split(",")):
    run = run_one_seed(run_seed, Path(a.out) / f"seed-{seed}", s, seed,
                       lambda name, seconds: console.print(f"  ✓ {name:<34} {seconds:6.1f} s"))
    runs.append(run)
    print(f"seed {seed}: " + "  ".join(f"{n} {m['answer_accuracy']:.3f}/{m['next_token_accuracy']:.4f}/{m['iterated_share']:.3f}"
                                       for n, m in run["models"].items()), flush=True)
results = summarise(runs, s, False, time.time() - t0)
(Path(a.out) / "results.json").write_text(json.dumps(results, indent=1, default=str))
print(f"p={a.p} top={a.top}", a.set, f"{time.time() - t0:.0f}s")
Console(highlight=False, width=160).print(verdict_lines(results))
