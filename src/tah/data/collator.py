"""`TaHCollator`: right-pads examples into the batch `TaHForCausalLM.forward` takes."""

from __future__ import annotations

import torch

from tah.errors import InputError

IGNORE = -100


class TaHCollator:
    """Examples (dicts with `input_ids`, `labels`, optional `iter_labels`; lists or tensors) -> dict
    of (B, T) LongTensors: input_ids (padded with `pad_token_id`), attention_mask (1 = real token),
    labels and iter_labels (padded with -100; iter_labels only if every example has them). Right
    padding; T is the longest example, rounded up to `pad_to_multiple_of` when given. Other keys
    are dropped."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise InputError(f"pad_token_id must be a non-negative integer, got {pad_token_id!r}; set the "
                             "tokenizer's pad token (e.g. tokenizer.pad_token = tokenizer.eos_token)")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise InputError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of!r}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise InputError("cannot collate an empty list of examples")
        keys = ["input_ids", "labels"] + (["iter_labels"] if all("iter_labels" in e for e in examples) else [])
        for i, example in enumerate(examples):
            missing = [k for k in ("input_ids", "labels") if k not in example]
            if missing:
                raise InputError(f"example {i} has no `{missing[0]}`; examples need input_ids and labels")
        rows = {key: [torch.as_tensor(e[key], dtype=torch.long).reshape(-1) for e in examples] for key in keys}
        for i, ids in enumerate(rows["input_ids"]):
            for key in keys[1:]:
                if rows[key][i].numel() != ids.numel():
                    raise InputError(f"example {i}: `{key}` has {rows[key][i].numel()} entries but input_ids "
                                     f"has {ids.numel()}; they must have the same length")
        width = max(ids.numel() for ids in rows["input_ids"])
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"attention_mask": torch.zeros(len(examples), width, dtype=torch.long)}
        for key in keys:
            batch[key] = torch.full((len(examples), width), self.pad_token_id if key == "input_ids" else IGNORE,
                                    dtype=torch.long)
            for i, values in enumerate(rows[key]):
                batch[key][i, :values.numel()] = values
        for i, ids in enumerate(rows["input_ids"]):
            batch["attention_mask"][i, :ids.numel()] = 1
        return batch
