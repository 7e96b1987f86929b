"""One decode path: forward's depth loop and every decoder take a pass's inputs and the decisions
after it from the model's step (tah.model.step), and compute them no other way."""

from __future__ import annotations

import pytest
import torch

from conftest import left_padded, randomize_lora, tiny_tah
from tah import generate
from tah.generation import generate_reference
from tah.generation.sampling import Sampler
from tah.generation.slots import BatchDecoder, Request
from tah.model.soft_input import soft_embedding
from tah.model.step import TaggedPasses


def strong_model():
    """max_iter 2 (what the static engine takes), an MLP decider (which the decoders ask through
    `decide`; the random one answers decode steps from positions alone), LoRA strong enough that
    the soft input changes tokens."""
    model = tiny_tah(decider="mlp", max_iter=2, lora_per_depth=True)
    randomize_lora(model, std=2.0, seed=3)
    model.set_threshold(0.4)
    return model


def top_two_only(self, sums: torch.Tensor) -> torch.Tensor:
    """Another soft input: from the top 2 of the sums instead of the top input_topk."""
    return soft_embedding(sums, self.embed.weight, 2)


def the_opposite(decide):
    """Another decider: continue exactly where the model's says stop."""
    def opposite(self, sums, hidden, positions, depth):
        return ~decide(self, sums, hidden, positions, depth)
    return opposite


def batch_decoded(model, ids: torch.Tensor, new: int) -> tuple[list[list[int]], list[list[int]]]:
    """Tokens and passes of each prompt (a row of ids) decoded together by `tah serve`'s batch decoder."""
    decoder = BatchDecoder(model)
    rows = [decoder.join(Request(prompt.tolist(), new, Sampler())) for prompt in ids]
    while decoder.rows:
        decoder.step()
        decoder.leave([row for row in decoder.rows if row.done])
    return [row.tokens for row in rows], [row.passes for row in rows]


@pytest.mark.parametrize("piece", ["soft_input", "decide"])
def test_every_decoding_path_takes_inputs_and_decisions_from_the_model_step(piece, monkeypatch):
    """With the model's `soft_input` or `decide` replaced, the plain loop (forward's depth loop),
    the eager engine (fused, with one and three draft candidates, and unfused), the static engine
    and the batch decoder still decode alike, and unlike before: none makes a deeper input or a
    decision its own way."""
    model = strong_model()
    ids, mask = left_padded([5, 9, 3, 7], seed=1)
    new = 20
    before = generate_reference(model, ids, mask, max_new_tokens=new)
    replacement = top_two_only if piece == "soft_input" else the_opposite(TaggedPasses.decide)
    monkeypatch.setattr(TaggedPasses, piece, replacement)
    after = generate_reference(model, ids, mask, max_new_tokens=new)
    assert not torch.equal(after.sequences, before.sequences) or not torch.equal(after.iter_counts,
                                                                                 before.iter_counts)
    assert (after.iter_counts > 1).any() and (after.iter_counts == 1).any()
    runs = {f"eager, {n} candidates": dict(engine="eager", draft_candidates=n) for n in (1, 3)}
    runs.update({"eager unfused": dict(engine="eager", fused=False), "static": dict(engine="static")})
    for name, options in runs.items():
        out = generate(model, ids, mask, max_new_tokens=new, **options)
        assert torch.equal(out.sequences, after.sequences), name
        assert torch.equal(out.iter_counts, after.iter_counts), name
    square = left_padded([6, 6, 6], seed=2)[0]  # the batch decoder takes unpadded prompts
    expected = generate_reference(model, square, max_new_tokens=new)
    tokens, passes = batch_decoded(model, square, new)
    assert tokens == expected.sequences[:, 6:].tolist()
    assert passes == expected.iter_counts.tolist()
