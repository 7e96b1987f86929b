"""Round 9 (issue 29): the pruned TaH with its parameters taken from the MLPs' width instead of a whole layer.

At this scale a layer is a quarter of the depth (round 9, 4). Here every layer keeps its place and loses the same
number of MLP neurons, the least important on 256 training rows (mean |silu(gate) * up| times the norm of the neuron's
down_proj column), enough that TaH (all layers' LoRA + the decider) stays under Standard's parameters. TaH then trains
(stage 1 + 2, Standard's labels) from that base; the rest of SRC/seed-N as it is.

    python width_prune.py SRC OUT --seed 0 --keep 124
"""
import argparse, json, os, time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from tah import TaHForCausalLM
from tah.data import load_labeled
from tah.toy.demo import evaluate
from tah.toy.pipeline import DemoSettings, Stages
from tah.toy.task import make_splits
from tah.toy.tokenizer import build_char_tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("src"); ap.add_argument("out"); ap.add_argument("--seed", type=int, required=True)
ap.add_argument("--keep", type=int, required=True, help="MLP neurons kept per layer (of 192)")
a = ap.parse_args()
torch.set_num_threads(1)
s = DemoSettings()
src, root = Path(a.src) / f"seed-{a.seed}", Path(a.out) / f"seed-{a.seed}"
root.mkdir(parents=True, exist_ok=True)
t0 = time.time()
lm = TaHForCausalLM.from_pretrained(src / "runs" / "base" / "final").lm.eval()
rows = load_labeled(src / "data" / "labeled-train")
ids = [torch.tensor(r) for r in rows["input_ids"][:256]]
batch = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=0)
mask = nn.utils.rnn.pad_sequence([torch.ones_like(i) for i in ids], batch_first=True)
scores = {}


def recorder(index):
    def hook(module, inputs, output):
        act = inputs[0]  # down_proj's input: silu(gate) * up, (B, T, I)
        scores[index] = (act.abs() * mask[..., None]).sum((0, 1)) / mask.sum()
    return hook


layers = lm.model.layers
hooks = [layer.mlp.down_proj.register_forward_hook(recorder(i)) for i, layer in enumerate(layers)]
with torch.no_grad():
    lm(input_ids=batch, attention_mask=mask)
for h in hooks:
    h.remove()
with torch.no_grad():
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        importance = scores[i] * mlp.down_proj.weight.norm(dim=0)
        keep = importance.topk(a.keep).indices.sort().values
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = nn.Linear(old.in_features, a.keep, bias=False)
            new.weight.copy_(old.weight[keep])
            setattr(mlp, name, new)
        old = mlp.down_proj
        new = nn.Linear(a.keep, old.out_features, bias=False)
        new.weight.copy_(old.weight[:, keep])
        mlp.down_proj = new
        mlp.intermediate_size = a.keep
lm.config.intermediate_size = a.keep
narrow = root / "models" / "narrow"
lm.save_pretrained(narrow)
build_char_tokenizer().save_pretrained(narrow)
for part in ("data",):
    if not (root / part).exists():
        os.symlink((src / part).resolve(), root / part)
(root / "runs").mkdir(exist_ok=True)
stages = Stages(root, s, a.seed)
lora = {"tah.lora_rank": s.lora_rank, "tah.lora_alpha": 2 * s.lora_rank}
decider = {"tah.pos_weight": s.pos_weight, "tah.threshold": s.threshold, **lora}
labeled = root / "data" / "labeled-train"
stage1, _ = stages.train("stage1", "tah-stage1", narrow, labeled, s.finetune_steps, s.finetune_lr, **decider)
final, _ = stages.train("stage2", "tah-stage2", stage1, labeled, s.decider_steps, s.decider_lr, **decider)
tokenizer = build_char_tokenizer()
data = load_labeled(src / "data" / "labeled-heldout")
_, heldout = make_splits(replace(s.task, seed=a.seed))
finals = {"Standard": src / "runs" / "standard" / "final", "TaH-narrow": final}
models = {n: evaluate(n, p, tokenizer, heldout[:s.eval_problems], data, 0.0) for n, p in finals.items()}
(root / "models.json").write_text(json.dumps(models, indent=1, default=str))
print(f"seed {a.seed} keep {a.keep}: " + "  ".join(
    f"{n} {m['answer_accuracy']:.3f}/{m['next_token_accuracy']:.4f}/{m['iterated_share']:.3f} ({m['parameters']:,})"
    for n, m in models.items()), f"{time.time() - t0:.0f}s", flush=True)
