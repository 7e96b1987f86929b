"""Issue 31, item 2: rerunning `tah train` never silently discards a run. Without --resume or
--overwrite it is refused (before torch loads); --resume says which checkpoint it continues from and
falls back past a truncated one; --overwrite starts again at step 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from conftest import tiny_lm
from tah import TaHForCausalLM
from tah.cli import main
from tah.train.checkpoints import checkpoint_problem
from test_train import RECIPES, char_tokenizer, labelled_rows

TAH = str(Path(sys.executable).with_name("tah"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A finished 4-step stage-1 run with checkpoints at steps 2 and 4, and the command that made it."""
    root = tmp_path_factory.mktemp("rerun")
    tiny_lm("qwen3", seed=0, vocab=64, hidden=32, layers=2).save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    Dataset.from_dict(labelled_rows(16, seed=1)).save_to_disk(root / "labeled")
    out = root / "out"
    sets = {"model": root / "base", "data": root / "labeled", "output_dir": out, "training.max_steps": 4,
            "training.save_steps": 2, "training.effective_batch_size": 4, "training.per_device_batch_size": 4}
    argv = ["train", "--config", str(RECIPES / "stage1.yaml")]
    argv += [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    assert main(argv) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return {"out": out, "argv": argv, "final": weights(out)}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return TaHForCausalLM.from_pretrained(out / "final").state_dict()


def test_a_rerun_without_resume_or_overwrite_is_refused_and_touches_nothing(run):
    before = {p: p.stat().st_mtime_ns for p in run["out"].rglob("*")}
    done = subprocess.run([TAH, *run["argv"]], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 2
    error = next(line for line in done.stderr.splitlines() if line.startswith("tah: error:"))
    assert f"output_dir {run['out']} already holds a run (checkpoint-2, checkpoint-4, final, recipe.json)" in error
    assert "--resume" in error and "--overwrite" in error
    assert "| torch" not in done.stderr  # refused before torch loads
    assert {p: p.stat().st_mtime_ns for p in run["out"].rglob("*")} == before


def test_resume_and_overwrite_together_are_refused(run, capsys):
    assert main([*run["argv"], "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite contradict each other" in capsys.readouterr().err


def test_resume_falls_back_past_a_truncated_checkpoint_and_says_so(run, capsys):
    weights_file = run["out"] / "checkpoint-4" / "model.safetensors"
    size = weights_file.stat().st_size
    with weights_file.open("r+b") as handle:  # what a full disk or a partial copy leaves
        handle.truncate(size // 2)
    assert main([*run["argv"], "--resume"]) == 0
    err = capsys.readouterr().err
    assert (f"checkpoint-4 is incomplete (model.safetensors is truncated ({size // 2} of {size} bytes)): "
            "falling back to the checkpoint before it") in err
    assert f"resuming from {run['out'] / 'checkpoint-2'} (step 2)" in err
    assert checkpoint_problem(run["out"] / "checkpoint-4") is None  # written again, whole
    for name, weight in weights(run["out"]).items():  # steps 3-4 again: the same weights
        assert torch.allclose(weight, run["final"][name], atol=1e-6, rtol=0), name


def test_overwrite_starts_again_at_step_0(run, capsys):
    (run["out"] / "checkpoint-4" / "trainer_state.json").unlink()  # marks the old run's files
    assert main([*run["argv"], "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert f"--overwrite: removed checkpoint-2, checkpoint-4, final, recipe.json from {run['out']}" in err
    assert (run["out"] / "checkpoint-4" / "trainer_state.json").is_file()
    for name, weight in weights(run["out"]).items():  # same seed, same data: the same run again
        assert torch.allclose(weight, run["final"][name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("name, damage, named", [
    ("trainer_state.json", lambda p: p.write_text('{"global_step": 4, "log'), "trainer_state.json is not valid JSON"),
    ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:100]), "optimizer.pt is truncated"),
    ("tah_config.json", lambda p: p.unlink(), "tah_config.json is missing"),
])
def test_checkpoint_problem_names_the_damaged_file(name, damage, named, run, tmp_path):
    import shutil

    copy = tmp_path / "checkpoint-9"
    shutil.copytree(run["out"] / "checkpoint-2", copy)
    assert checkpoint_problem(copy) is None
    damage(copy / name)
    assert checkpoint_problem(copy).startswith(named)
