"""A demo seed's labelled held-out solutions as one teacher-forced batch (shared by heldout_passes.py, errsplit.py
and errkind.py).

    batch, answer, target = heldout_batch("OUT/seed-0")

batch: the collated rows (input_ids, attention_mask, labels, iter_labels); answer (B, T): True where position t
predicts a solution token; target (B, T): the token position t should predict (-1 past the end)."""
import torch

from tah.data import TaHCollator, load_labeled


def heldout_batch(root: str):
    torch.set_num_threads(1)
    data = load_labeled(f"{root}/data/labeled-heldout")
    batch = TaHCollator(0)([data[i] for i in range(len(data))])
    answer = torch.zeros_like(batch["labels"], dtype=torch.bool)
    answer[:, :-1] = batch["labels"][:, 1:] != -100
    target = torch.full_like(batch["labels"], -1)
    target[:, :-1] = batch["input_ids"][:, 1:]
    return batch, answer, target
