"""Round 9 (issue 29): the pruned TaH labelled by its own one-pass twin.

TaH+'s hard tokens are what Standard (the base, fine-tuned with one pass) still misses. The pruned TaH was labelled by
the same Standard, though its depth 0 has one layer fewer and misses more. Here the pruned base is fine-tuned with one
pass too ("Standard-pruned", the same budget), labels the training data, and TaH trains from the pruned base on those
labels. Everything else of SRC/seed-N (base, pruned base, Standard, AlwaysIterate, TaH+) is reused as it is.

    python pruned_reference.py SRC OUT --seed 0 [--label label_confidence=0.97]
"""
import argparse, json, os, time
from dataclasses import replace
from pathlib import Path

import torch

from tah.data import load_labeled
from tah.toy.demo import evaluate
from tah.toy.pipeline import DemoSettings, Stages
from tah.toy.task import make_splits
from tah.toy.tokenizer import build_char_tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("src"); ap.add_argument("out"); ap.add_argument("--seed", type=int, required=True)
ap.add_argument("--label", action="append", default=[], help="DemoSettings change for the labelling, as JSON")
ap.add_argument("--set", action="append", default=[], help="recipe keys for TaH's stage 1")
a = ap.parse_args()
torch.set_num_threads(1)
s = DemoSettings()
for item in a.label:
    key, value = item.split("=", 1)
    setattr(s, key, json.loads(value))
src, root = Path(a.src) / f"seed-{a.seed}", Path(a.out) / f"seed-{a.seed}"
(root / "data").mkdir(parents=True, exist_ok=True)
(root / "runs").mkdir(exist_ok=True)
for name in ("train.jsonl", "heldout.jsonl", "calibration.jsonl"):
    if not (root / "data" / name).exists():
        os.symlink((src / "data" / name).resolve(), root / "data" / name)
if not (root / "models").exists():
    os.symlink((src / "models").resolve(), root / "models")
stages = Stages(root, s, a.seed)
t0 = time.time()
pruned = root / "models" / "pruned"
twin = root / "runs" / "standard-pruned" / "final"
times = {}
if not twin.exists():
    twin, times["Standard-pruned"] = stages.train("standard", "standard-pruned", pruned, src / "data" / "labeled-train",
                                                  s.finetune_steps, s.finetune_lr)
if not (root / "data" / "labeled-train").exists():
    stages.label(twin, "train")
lora = {"tah.lora_rank": s.lora_rank, "tah.lora_alpha": 2 * s.lora_rank}
decider = {"tah.pos_weight": s.pos_weight, "tah.threshold": s.threshold, **lora}
extra = dict(item.split("=", 1) for item in a.set)
stage1, t1 = stages.train("stage1", "tah-stage1", pruned, root / "data" / "labeled-train", s.finetune_steps,
                          s.finetune_lr, **decider, **extra)
final, t2 = stages.train("stage2", "tah-stage2", stage1, root / "data" / "labeled-train", s.decider_steps, s.decider_lr,
                         **decider)
tokenizer = build_char_tokenizer()
data = load_labeled(src / "data" / "labeled-heldout")
_, heldout = make_splits(replace(s.task, seed=a.seed))
finals = {"Standard": src / "runs" / "standard" / "final", "Standard-pruned": twin, "TaH": final}
models = {n: evaluate(n, p, tokenizer, heldout[:s.eval_problems], data, 0.0) for n, p in finals.items()}
labels = json.loads((root / "data" / "labeled-train" / "stats.json").read_text()) \
    if (root / "data" / "labeled-train" / "stats.json").exists() else {}
(root / "models.json").write_text(json.dumps(models, indent=1, default=str))
print(f"seed {a.seed} {a.label} {a.set} hard {labels.get('assistant_hard_share', float('nan')):.4f}: " + "  ".join(
    f"{n} {m['answer_accuracy']:.3f}/{m['next_token_accuracy']:.4f}/{m['iterated_share']:.3f}" for n, m in models.items()),
    f"{time.time() - t0:.0f}s", flush=True)
