"""bench_decode.py's measuring parts: the decider (`random` at exactly the share the issue names) and
the lockstep that interleaves the engines' steps."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_decode import ExactShareDecider, lockstep, use_decider  # noqa: E402

from conftest import randomize_lora, tiny_tah  # noqa: E402
from tah.generation import generate  # noqa: E402


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 1.0])
def test_every_block_of_positions_iterates_exactly_the_share(rate):
    decider = ExactShareDecider(rate, seed=3)
    positions = torch.arange(2000)[None]
    go_on, _ = decider(None, None, positions, 0)
    per_block = go_on.view(-1, decider.block).sum(1)
    assert torch.equal(per_block, torch.full_like(per_block, round(rate * decider.block)))


def test_where_it_iterates_is_random_and_a_function_of_seed_position_and_depth():
    positions = torch.arange(1000)[None]
    first = ExactShareDecider(0.1, seed=0)(None, None, positions, 0)[0]
    again = ExactShareDecider(0.1, seed=0)(None, None, positions.flip(1), 0)[0].flip(1)
    assert torch.equal(first, again)  # the same token gets the same verdict in any call
    other_seed = ExactShareDecider(0.1, seed=1)(None, None, positions, 0)[0]
    deeper = ExactShareDecider(0.1, seed=0)(None, None, positions, 1)[0]
    assert not torch.equal(first, other_seed) and not torch.equal(first, deeper)
    offsets = positions[first] % 10  # the place in its block: spread, not one fixed offset
    assert len(set(offsets.tolist())) == 10


def test_its_python_decisions_are_its_tensor_ones():
    decider = ExactShareDecider(0.1, seed=0)
    positions = list(range(0, 3000, 7))
    for depth in (0, 1):
        expected = decider(None, None, torch.tensor([positions]), depth)[0][0].tolist()
        assert decider.decide_positions(positions, depth) == expected


def test_engines_in_lockstep_decode_what_each_decodes_alone():
    """Interleaving the steps of engines that share one model (each step under its own decider) must
    not change what any of them computes: tokens, pass counts and forwards equal a plain generate's."""
    model = tiny_tah(max_iter=2, lora_per_depth=True).eval()
    randomize_lora(model, std=2.0, seed=3)  # deeper passes change tokens: drafts are rejected too
    ids = torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    rates = [None, 0.25, 1.0]
    locked = lockstep(model, rates, ids, repeats=2, max_new_tokens=24)
    for rate in rates:
        times, out = locked[rate]
        alone = generate(use_decider(model, rate), ids, max_new_tokens=24)
        assert torch.equal(out.sequences, alone.sequences), rate
        assert torch.equal(out.iter_counts, alone.iter_counts), rate
        assert out.stats.forwards == alone.stats.forwards
        assert len(times) == 2 and all(t > 0 for t in times)
    assert (locked[1.0][1].iter_counts > 1).any() and (locked[None][1].iter_counts == 1).all()
