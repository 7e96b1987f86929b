"""The demo's seeds side by side (`tah.toy.parallel`): a seed gives the same figures in a process of
its own, beside another seed, as alone in ours, so the demo's results do not depend on --workers."""

from __future__ import annotations

import pytest
from rich.console import Console

from tah.toy.demo import STAGES, run_seed
from tah.toy.parallel import run_seeds
from tah.toy.pipeline import DemoSettings
from tah.toy.task import TaskConfig


def tiny_settings() -> DemoSettings:
    """Every stage of the demo on a two-layer, hidden-32 model, in seconds."""
    return DemoSettings(task=TaskConfig.quick(terms=(2, 2), train_size=400, heldout_size=12, width=4), hidden=32,
                        layers=2, heads=2, pretrain_steps=12, pretrain_loss=None, finetune_steps=6, decider_steps=4,
                        batch_size=16, eval_problems=8, samples=1, label_reference="base", label_confidence=0.99)


def figures(runs: list[dict]) -> list[dict]:
    keys = ("answer_accuracy", "next_token_accuracy", "iterated_share", "parameters")
    return [{name: {k: model[k] for k in keys} for name, model in run["models"].items()} for run in runs]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    console = Console(record=True, width=120)
    alone = run_seeds(run_seed, STAGES, root / "alone", tiny_settings(), seeds=2, workers=1, console=console)
    side_by_side = run_seeds(run_seed, STAGES, root / "pool", tiny_settings(), seeds=2, workers=2, console=console)
    return {"alone": alone, "pool": side_by_side, "printed": console.export_text(), "root": root}


def test_seeds_side_by_side_give_the_figures_of_seeds_run_alone(both):
    assert figures(both["pool"]) == figures(both["alone"])
    assert [run["seed"] for run in both["pool"]] == [0, 1]
    assert figures(both["pool"])[0] != figures(both["pool"])[1]  # the seeds differ: the comparison can fail


def test_every_stage_of_every_seed_is_reported_once(both):
    for seed in (0, 1):
        done = [line for line in both["printed"].splitlines() if line.strip().startswith(f"seed {seed} ✓")]
        assert len(done) == 2 * STAGES  # once alone, once in the pool


def test_a_seeds_warnings_and_bars_go_to_its_log(both):
    for mode in ("alone", "pool"):
        assert (both["root"] / mode / "seed-1" / "logs" / "stderr.log").is_file()


def test_a_failing_seed_raises_its_error_in_the_caller(tmp_path):
    from tah.errors import TaHError

    broken = tiny_settings()
    broken.label_reference = "standard"
    broken.finetune_lr = -1.0  # the recipe refuses it at Standard's fine-tune, after pretraining and pruning
    with pytest.raises(TaHError, match="learning_rate must be > 0"):
        run_seeds(run_seed, STAGES, tmp_path, broken, seeds=2, workers=2, console=Console(quiet=True))
