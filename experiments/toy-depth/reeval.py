"""Round 5 (issue 29): a finished demo_sweep run's models, evaluated again on a larger held-out set (the
first problems of the larger set are the old ones), labelled by the run's own Standard.

    python reeval.py OUT --heldout 1000 [--set key=value ...]   (the --set of the run)
"""
import argparse, json, statistics
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from tah.data import load_labeled
from tah.toy.demo import evaluate, summarise
from tah.toy.pipeline import DemoSettings, Stages
from tah.toy.task import make_splits, to_jsonl
from tah.toy.tokenizer import build_char_tokenizer
from tah.toy.verdict import verdict_lines

ap = argparse.ArgumentParser()
ap.add_argument("out"); ap.add_argument("--heldout", type=int, default=1000); ap.add_argument("--seeds", default="0,1,2")
a = ap.parse_args()
torch.set_num_threads(1)
old = json.loads((Path(a.out) / "results.json").read_text())
runs = []
for seed in map(int, a.seeds.split(",")):
    run = next(r for r in old["runs"] if r["seed"] == seed)
    root = Path(a.out) / f"seed-{seed}"
    s = DemoSettings()
    s.task = replace(s.task, heldout_size=a.heldout, train_size=0, seed=seed)
    s.eval_problems = a.heldout
    _, heldout = make_splits(s.task)
    to_jsonl(heldout, root / "data" / "heldout.jsonl")
    st = Stages(root, s, seed)
    __import__("shutil").rmtree(root / "data" / "labeled-heldout", ignore_errors=True)
    labeled, _ = st.label(Path(run["models"]["Standard"]["path"]), "heldout")
    data, tok = load_labeled(labeled), build_char_tokenizer()
    run["models"] = {n: evaluate(n, Path(m["path"]), tok, heldout, data, m["train_time_s"]) for n, m in run["models"].items()}
    print(f"seed {seed}: " + "  ".join(f"{n} {m['answer_accuracy']:.4f}/{m['next_token_accuracy']:.4f}/{m['iterated_share']:.3f}"
                                       for n, m in run["models"].items()), flush=True)
    runs.append(run)
results = summarise(runs, s, False, 0.0)
Console(highlight=False, width=160).print(verdict_lines(results))
