"""Round 5 (issue 29): the demo's pretraining alone, per seed, logged every 10 steps: when does each
seed's base cross a training-loss level?

    python pretrain_curves.py OUT --seeds 0,1,2 --steps 1500 [--set key=value ...]
"""
import argparse, json, sys, time
from dataclasses import replace
from pathlib import Path

import torch

from tah.toy.pipeline import DemoSettings, Stages

ap = argparse.ArgumentParser()
ap.add_argument("out"); ap.add_argument("--seeds", default="0,1,2"); ap.add_argument("--steps", type=int, default=1500)
ap.add_argument("--set", action="append", default=[])
a = ap.parse_args()
torch.set_num_threads(1)
s = DemoSettings()
for item in a.set:
    key, value = item.split("=", 1)
    setattr(s, key, json.loads(value))
for seed in map(int, a.seeds.split(",")):
    st = Stages(Path(a.out) / f"seed-{seed}", s, seed)
    st.data(); init = st.init_model(); t0 = time.time()
    final, _ = st.train("standard", "base", init, st.root / "data" / "train.jsonl", a.steps, s.pretrain_lr,
                        **{"training.logging_steps": 10})
    h = json.loads((st.root / "runs" / "base" / "recipe.json").read_text())["log_history"]
    losses = [(e["step"], e["loss"]) for e in h if "loss" in e]
    cross = {lvl: next((st_ for st_, l in losses if l <= lvl), None) for lvl in (0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.04)}
    print(f"seed {seed} ({time.time() - t0:.0f}s): first step at loss <=", cross, flush=True)
    print("  every 100:", " ".join(f"{l:.3f}" for st_, l in losses if st_ % 100 == 0), flush=True)
