"""Round 4 (issue 29): the demo's own pipeline (one seed as `tah demo` runs it: tah.toy.parallel.run_one_seed, one thread)
under changed settings.

    python demo_sweep.py OUT --seeds 0,1,2 --set finetune_steps=400 --set task.terms=[3,3] --set hidden=48

Prints each seed's models (answer accuracy, next-token accuracy, iterated share) and the demo's verdicts."""
import argparse, json, sys, time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from tah.toy.demo import run_seed, summarise
from tah.toy.parallel import run_one_seed
from tah.toy.pipeline import DemoSettings
from tah.toy.verdict import verdict_lines

ap = argparse.ArgumentParser()
ap.add_argument("out"); ap.add_argument("--seeds", default="0,1,2"); ap.add_argument("--set", action="append", default=[])
ap.add_argument("--quick", action="store_true")
a = ap.parse_args()
torch.set_num_threads(1)
s = DemoSettings.quick() if a.quick else DemoSettings()
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
results = summarise(runs, s, a.quick, time.time() - t0)
(Path(a.out) / "results.json").write_text(json.dumps(results, indent=1, default=str))
print(a.set, f"{time.time() - t0:.0f}s")
for row in results["models"]:
    print(f"  {row['name']:14s} ans {row['answer_accuracy']:.3f} tok {row['next_token_accuracy']:.4f} it {row['iterated_share']:.3f}")
Console(highlight=False, width=160).print(verdict_lines(results))
