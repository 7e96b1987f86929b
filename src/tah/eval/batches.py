"""Feeding evaluation data to a model: batches, supervised positions, forced pass counts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from tah.data.collator import TaHCollator
from tah.errors import InputError

IGNORE = -100


def make_batches(data, batch_size: int = 16, pad_token_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """`iterate_batches` as a list (evaluation sets are small; ids only, so cheap to hold)."""
    return list(iterate_batches(data, batch_size, pad_token_id))


def iterate_batches(data, batch_size: int = 16, pad_token_id: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of (B, T) tensors (input_ids, attention_mask, labels, maybe iter_labels) from `data`:
    a sequence of examples (a `datasets.Dataset` or a list of dicts of lists / 1-D tensors, as
    `tah.data.build_dataset` or `tah label` make them), collated with right padding; or an
    iterable of ready batches (dicts whose input_ids is a 2-D tensor), passed through."""
    if isinstance(data, dict):
        data = [data]
    if iter(data) is data:  # a one-shot iterator: peeking would lose its first item
        data = list(data)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    first = next(iter(data), None)
    if first is None:
        raise InputError("no evaluation data: give at least one example with input_ids and labels")
    if isinstance(first.get("input_ids"), torch.Tensor) and first["input_ids"].dim() == 2:
        for batch in data:
            if "labels" not in batch:
                raise InputError("an evaluation batch has no `labels`; give input_ids and labels (-100 = not scored)")
            if "attention_mask" not in batch:
                batch = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
            yield batch
        return
    collate = TaHCollator(pad_token_id)
    for start in range(0, len(data), batch_size):
        yield collate([data[i] for i in range(start, min(start + batch_size, len(data)))])


def next_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets of the prediction made at each position (labels shifted left
    by one, -100 where nothing is supervised): position t predicts token t+1."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def forced_passes(input_ids: torch.Tensor, passes: int) -> torch.Tensor:
    """(B, T) iter_labels that give every token exactly `passes` passes (padding is masked anyway)."""
    return torch.full_like(input_ids, passes)


def check_depth(model, policy: str) -> None:
    if model.tah_config.max_iter < 2:
        raise InputError(f"policy {policy!r} needs a second pass, but the model has max_iter="
                         f"{model.tah_config.max_iter}; evaluate a model with max_iter >= 2 (TaH, AlwaysIterate)")


@contextmanager
def inference(model):
    """Eval mode and no gradients for the block; the model's training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}
