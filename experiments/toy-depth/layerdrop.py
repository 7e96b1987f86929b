"""Round 9 (issue 29): the demo's seed with a base pretrained under LayerDrop (Fan et al., 2019).

A 28-layer LM loses little when one layer goes; the demo's 4-layer base, trained without any pressure to spread its
work, can lose most of what it knows (seed 1: loss 0.05 -> 2.4 with its cheapest layer removed). LayerDrop skips each
decoder layer of each training batch with probability P during the pretraining only (the residual stream passes it
unchanged), so that no single layer is indispensable; fine-tunes and evaluation run every layer. The callback goes in
through `tah.train.run.train(recipe, callbacks=...)` for the run named "base".

    python layerdrop.py OUT --seeds 0,1 --p 0.05 [--top] [--set key=value ...]   (the demo_sweep.py --set keys)

(Round 9's rows 2-3 ran this script's first version, commit 2989dad, which drew the skips from torch's generator;
row 2b and later runs draw them from random.Random(seed), as below.)
"""
import argparse, json, random, time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from transformers import TrainerCallback

import tah.train.run as run
from tah.toy.demo import run_seed, summarise
from tah.toy.parallel import run_one_seed
from tah.toy.pipeline import DemoSettings
from tah.toy.verdict import verdict_lines

ap = argparse.ArgumentParser()
ap.add_argument("out"); ap.add_argument("--seeds", default="0,1,2"); ap.add_argument("--p", type=float, required=True)
ap.add_argument("--top", action="store_true", help="drop only the last decoder layer (deep layers are the redundant ones of LLMs)")
ap.add_argument("--set", action="append", default=[])
a = ap.parse_args()
torch.set_num_threads(1)


class LayerDrop(TrainerCallback):
    """While training, a decoder layer's forward in training mode returns its input with probability p (draws from
    random.Random(seed), one per layer call); eval mode runs every layer; the hooks go when training ends."""

    def __init__(self, p: float, seed: int, top: bool = False) -> None:
        self.p, self.random, self.top, self.hooks = p, random.Random(seed), top, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        self.hooks = [layer.register_forward_hook(self.skip, with_kwargs=True) for layer in (layers[-1:] if self.top else layers)]

    def on_train_end(self, args, state, control, **kwargs):
        for hook in self.hooks:
            hook.remove()

    def skip(self, module, args, kwargs, output):
        if module.training and self.random.random() < self.p:
            return args[0] if args else kwargs["hidden_states"]
        return None


plain_train = run.train


def train(recipe, resume=False, overwrite=False, callbacks=()):
    if Path(recipe.output_dir).name == "base":
        callbacks = [*callbacks, LayerDrop(a.p, recipe.training.seed, a.top)]
    return plain_train(recipe, resume, overwrite, callbacks)


run.train = train
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
    r = run_one_seed(run_seed, Path(a.out) / f"seed-{seed}", s, seed,
                     lambda name, seconds: console.print(f"  ✓ {name:<34} {seconds:6.1f} s"))
    runs.append(r)
    print(f"seed {seed}: " + "  ".join(f"{n} {m['answer_accuracy']:.3f}/{m['next_token_accuracy']:.4f}/{m['iterated_share']:.3f}"
                                       for n, m in r["models"].items()), flush=True)
results = summarise(runs, s, False, time.time() - t0)
(Path(a.out) / "results.json").write_text(json.dumps(results, indent=1, default=str))
print(f"p={a.p} top={a.top}", a.set, f"{time.time() - t0:.0f}s")
Console(highlight=False, width=160).print(verdict_lines(results))
