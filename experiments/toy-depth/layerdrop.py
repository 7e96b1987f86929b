"""Round 9 (issue 29): the demo's seed with a base pretrained under LayerDrop (Fan et al., 2019).

A 28-layer LM loses little when one layer goes; the demo's 4-layer base, trained without any pressure to spread its
work, can lose most of what it knows (seed 1: loss 0.05 -> 2.4 with its cheapest layer removed). LayerDrop skips each
decoder layer of each training batch with probability P during the pretraining only (the residual stream passes it
unchanged), so that no single layer is indispensable; fine-tunes and evaluation run every layer. The callback goes in
through `tah.train.run.train(recipe, callbacks=...)` for the run named "base"; the rest is demo_sweep.py's.

    python layerdrop.py OUT --p 0.05 [--top] --seeds 0,1 [--set key=value ...]   (demo_sweep.py's arguments)

(Round 9's rows 2-3 ran this script's first version, commit 2989dad, which drew the skips from torch's generator;
row 2b and later runs draw them from random.Random(seed), as below.)
"""
import argparse, random, runpy, sys
from pathlib import Path

from transformers import TrainerCallback

import tah.train.run as run

ap = argparse.ArgumentParser()
ap.add_argument("--p", type=float, required=True)
ap.add_argument("--top", action="store_true", help="drop only the last decoder layer (deep layers are the redundant ones of LLMs)")
a, rest = ap.parse_known_args()


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
print(f"LayerDrop p={a.p} top={a.top}", flush=True)
sys.argv = [str(Path(__file__).with_name("demo_sweep.py")), *rest]
runpy.run_path(sys.argv[0], run_name="__main__")
