"""The decider bench_decode.py measures with: `random`, at exactly the share the issue names."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_decode import ExactShareDecider  # noqa: E402


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
