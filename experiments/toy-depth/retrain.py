"""Round 8 (issue 29): retrain only the deeper-pass models of finished demo seeds under changed settings.

The base, the pruned base, Standard, the labels and (unless --always) AlwaysIterate are taken from SRC/seed-N as they
are (symlinked); TaH+ and TaH (stage 1 and 2), and AlwaysIterate with --always, train again from the same base with
`--set` recipe keys added to their training (e.g. training.base_lr_ratio=0.1), and all four are evaluated as the demo
evaluates them. One CPU thread per seed, as `tah demo` runs: the figures of unchanged models equal the demo's.

    python retrain.py SRC OUT --seed 0 --set training.base_lr_ratio=0.1 [--always] [--only TaH+]
"""
import argparse, json, os, sys, time
from pathlib import Path

import torch

from tah.data import load_labeled
from tah.toy.demo import evaluate
from tah.toy.pipeline import DemoSettings, Stages
from tah.toy.task import make_splits
from tah.toy.tokenizer import build_char_tokenizer
from dataclasses import replace

ap = argparse.ArgumentParser()
ap.add_argument("src"); ap.add_argument("out"); ap.add_argument("--seed", type=int, required=True)
ap.add_argument("--set", action="append", default=[]); ap.add_argument("--always", action="store_true")
ap.add_argument("--only", default="TaH+,TaH")
ap.add_argument("--label", action="append", default=[],
                help="relabel with Standard under this DemoSettings change, e.g. label_confidence=null, label_prompt_easy=false")
ap.add_argument("--standard", action="store_true", help="train Standard again too (the labels stay the first one's)")
ap.add_argument("--shield", action="store_true", help="deeper passes read the base weights detached (LoRA alone learns there)")
a = ap.parse_args()
torch.set_num_threads(1)
if a.shield:  # lab only: the deeper passes' gradient reaches the LoRA adapters, never the base linears
    import torch.nn.functional as F
    from tah.model.lora import DepthLoRALinear
    plain = DepthLoRALinear._base_product

    def shielded(self, x):
        depth = self._state.depth
        if torch.is_grad_enabled() and isinstance(depth, int) and depth > 0:
            return F.linear(x, self.base_layer.weight.detach(), None if self.base_layer.bias is None else self.base_layer.bias.detach())
        return plain(self, x)
    DepthLoRALinear._base_product = shielded
s = DemoSettings()
src, root = Path(a.src) / f"seed-{a.seed}", Path(a.out) / f"seed-{a.seed}"
root.mkdir(parents=True, exist_ok=True)
for part in ("models",) + (() if a.label else ("data",)):
    if not (root / part).exists():
        os.symlink((src / part).resolve(), root / part)
(root / "runs").mkdir(exist_ok=True)
for run in ("base", "standard") + (() if a.always else ("always",)):
    if not (root / "runs" / run).exists():
        os.symlink((src / "runs" / run).resolve(), root / "runs" / run)
extra = dict(item.split("=", 1) for item in a.set)
if a.label:  # the problems as they are, the labels made again
    for item in a.label:
        key, value = item.split("=", 1)
        setattr(s, key, json.loads(value))
    (root / "data").mkdir(exist_ok=True)
    for name in ("train.jsonl", "heldout.jsonl", "calibration.jsonl"):
        if not (root / "data" / name).exists():
            os.symlink((src / "data" / name).resolve(), root / "data" / name)
stages = Stages(root, s, a.seed)
if a.label:
    for split in ("train", "heldout"):
        if not (root / "data" / f"labeled-{split}").exists():
            stages.label(root / "runs" / "standard" / "final", split)
lora = {"tah.lora_rank": s.lora_rank, "tah.lora_alpha": 2 * s.lora_rank}
decider = {"tah.pos_weight": s.pos_weight, "tah.threshold": s.threshold, **lora}
labeled = root / "data" / "labeled-train"
finals = {"Standard": root / "runs" / "standard" / "final", "AlwaysIterate": root / "runs" / "always" / "final"}
times = {"Standard": 0.0, "AlwaysIterate": 0.0}
t0 = time.time()
if a.standard:
    finals["Standard"], times["Standard"] = stages.train("standard", "standard-again", root / "runs" / "base" / "final",
                                                        labeled, s.finetune_steps, s.finetune_lr, **extra)
if a.always:
    finals["AlwaysIterate"], times["AlwaysIterate"] = stages.train("always", "always", root / "runs" / "base" / "final",
                                                                  labeled, s.finetune_steps, s.finetune_lr, **lora, **extra)
for name, start in (("TaH+", root / "runs" / "base" / "final"), ("TaH", root / "models" / "pruned")):
    if name not in a.only.split(","):
        continue
    tag = name.lower().replace("+", "-plus")
    stage1, t1 = stages.train("stage1", f"{tag}-stage1", start, labeled, s.finetune_steps, s.finetune_lr, **decider, **extra)
    finals[name], t2 = stages.train("stage2", f"{tag}-stage2", stage1, labeled, s.decider_steps, s.decider_lr, **decider)
    times[name] = t1 + t2
tokenizer = build_char_tokenizer()
data = load_labeled(root / "data" / "labeled-heldout")
_, heldout = make_splits(replace(s.task, seed=a.seed))
models = {n: evaluate(n, p, tokenizer, heldout[:s.eval_problems], data, times.get(n, 0.0)) for n, p in finals.items()}
(root / "models.json").write_text(json.dumps(models, indent=1, default=str))
print(f"seed {a.seed} {a.set}{' always' if a.always else ''}: " + "  ".join(
    f"{n} {m['answer_accuracy']:.3f}/{m['next_token_accuracy']:.4f}/{m['iterated_share']:.3f}" for n, m in models.items()),
    f"{time.time() - t0:.0f}s", flush=True)
