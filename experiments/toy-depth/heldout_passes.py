"""Round 4 (issue 29): a demo seed's models on its held-out labels, teacher-forced: with their own decider, with the
labels as an oracle, and with depth 0 alone ("never"). Separates a weak stage 1 from a weak decider.

    python heldout_passes.py OUT/seed-1 standard always tah-plus-stage1 tah-plus-stage2
"""
import sys

import torch

from heldout import heldout_batch

from tah import TaHForCausalLM

root = sys.argv[1]
batch, answer, target = heldout_batch(root)
labels = batch["iter_labels"]


def score(model, iter_labels=None) -> str:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], iter_labels=iter_labels)
    right = out.logits.argmax(-1) == target
    rows = (right | ~answer).all(1).float().mean().item()
    return (f"tokens {right[answer].float().mean():.4f} solutions {rows:.3f} "
            f"iterated {(out.iter_count > 1)[answer].float().mean():.3f}")


print("hard share of the solution labels", round((labels == 2)[answer].float().mean().item(), 4))
for name in sys.argv[2:]:
    model = TaHForCausalLM.from_pretrained(f"{root}/runs/{name}/final").eval()
    line = f"{name:18s} own: {score(model)}"
    if model.tah_config.max_iter > 1:
        line += f" | oracle: {score(model, labels)} | never: {score(model, torch.where(labels == -100, -100, 1))}"
    print(line, flush=True)
