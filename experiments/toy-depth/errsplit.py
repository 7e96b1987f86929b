"""Round 7 (issue 29): where a demo seed's models err on held-out solutions, teacher-forced: on the tokens the
labels mark hard (Standard missed them or gave the truth < 0.9) or elsewhere; which tokens TaH+ iterates; what TaH+
breaks that Standard had right and fixes that Standard had wrong.

    python errsplit.py OUT/seed-0
"""
import sys
import torch
from heldout import heldout_batch

from tah import TaHForCausalLM
root = sys.argv[1]
batch, answer, target = heldout_batch(root)
hard = (batch["iter_labels"] >= 2) & answer
def right(name, **kw):
    m = TaHForCausalLM.from_pretrained(f"{root}/runs/{name}/final").eval()
    with torch.no_grad():
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    return out.logits.argmax(-1) == target, out.iter_count > 1
s, _ = right("standard")
a, _ = right("always")
t, it = right("tah-plus-stage2")
for name, r in (("standard", s), ("always", a), ("tah+", t)):
    print(f"{name:9s} errors on labelled {(~r & hard).sum().item():4d} / {hard.sum().item()}  unlabelled {(~r & answer & ~hard).sum().item():4d}")
print("tah+ iterated & unlabelled", (it & answer & ~hard).sum().item(), " labelled not iterated", (hard & ~it).sum().item())
print("tah+ wrong where standard right:", (~t & s & answer).sum().item(), " of them labelled", (~t & s & hard).sum().item())
print("standard wrong where tah+ right:", (~s & t & answer).sum().item())
