"""`tah train`: recipes checked before any model loads, stage 1 / stage 2 / baselines on the tiny CPU
recipe, metrics, atomic checkpoints, SIGKILL + --resume, and a 2-process run matching 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback, TrainingArguments

from conftest import tiny_lm, tiny_tah
from tah import ConfigError, TaHForCausalLM
from tah.cli import main
from tah.train import trainer as trainer_module
from tah.train.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu"
MARKER = 5  # the token after which the next prediction is "hard" in the synthetic data


def char_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(33, 93)])}  # 64 ids
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def labelled_rows(count: int, seed: int, length: int = 24) -> dict[str, list]:
    """Counting sequences (easy to learn) where the prediction after MARKER is labelled hard."""
    gen = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "iter_labels": []}
    for _ in range(count):
        n = int(torch.randint(length - 6, length + 1, (1,), generator=gen))
        start = int(torch.randint(6, 60, (1,), generator=gen))
        ids = [1] + [6 + (start + i) % 58 for i in range(n - 1)]
        for spot in torch.randint(2, n - 1, (2,), generator=gen).tolist():
            ids[spot] = MARKER
        hard = [2 if ids[t] == MARKER else 1 for t in range(n - 1)] + [-100]
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] + ids[1:])
        rows["iter_labels"].append(hard)
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    model_dir = root / "base"
    tiny_lm("qwen3", seed=0, vocab=64, hidden=32, layers=2).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    Dataset.from_dict(labelled_rows(32, seed=1)).save_to_disk(root / "labeled")
    Dataset.from_dict(labelled_rows(16, seed=2)).save_to_disk(root / "heldout")
    return {"root": root, "model": model_dir, "data": root / "labeled", "heldout": root / "heldout"}


def overrides(ws: dict[str, Path], out: Path, model: Path | None = None, **extra) -> list[str]:
    sets = {"model": model or ws["model"], "data": ws["data"], "output_dir": out, **extra}
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def run_train(recipe: str, args: list[str]) -> dict:
    assert main(["train", "--config", str(RECIPES / recipe), *args]) == 0
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
    return json.loads((out / "recipe.json").read_text())


def train_losses(record: dict) -> list[float]:
    return [entry["loss"] for entry in record["log_history"] if "loss" in entry]


# -- recipes ---------------------------------------------------------------------------------------
def test_every_shipped_recipe_loads():
    root = RECIPES.parent
    names = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.yaml") if p.parent.name != "accelerate")
    assert {"qwen3-0.6b/stage1.yaml", "qwen3-1.7b/stage2.yaml", "tiny-cpu/stage1.yaml"} <= set(names)
    for name in names:
        recipe = load_recipe(root / name)
        assert recipe.training.effective_batch_size % recipe.training.per_device_batch_size == 0
    paper = load_recipe(root / "qwen3-1.7b/stage2.yaml")
    assert paper.tah_config().pos_weight == 5.4 and paper.tah_config().decider_layers == [2, 10, 18, 26]


@pytest.mark.parametrize("setting, named", [
    ("trainig.learning_rate=1", "trainig"),
    ("training.learnig_rate=1", "training.learnig_rate"),
    ("training.learning_rate=fast", "training.learning_rate"),
    ("training.epochs=[1]", "training.epochs"),
    ("tah.lora_rnk=4", "tah.lora_rnk"),
    ("tah.max_iter=0", "max_iter"),
    ("stage=3", "stage"),
    ("training.effective_batch_size=6", "effective_batch_size"),
    ("tah.decider_hidden_dims=1.5", "tah.decider_hidden_dims"),  # these were raw TypeErrors
    ("tah.lora_target_modules=7", "tah.lora_target_modules"),
    ("tah.decider_layers=[2", "tah.decider_layers"),  # a raw YAMLError
    ("training.seed=-1", "training.seed"),  # these were accepted, to fail deep inside the run
    ("training.weight_decay=-0.1", "training.weight_decay"),
    ("training.save_total_limit=0", "training.save_total_limit"),
    ("training.dataloader_num_workers=-1", "training.dataloader_num_workers"),
    ("training.stop_at_loss=0", "training.stop_at_loss"),
    ("tah.hard_token_weight=0", "hard_token_weight"),
    ("training.base_lr_ratio=0", "training.base_lr_ratio"),
])
def test_bad_recipe_fails_before_any_model_loads(setting, named, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe was checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    monkeypatch.setattr(TaHForCausalLM, "from_pretrained", no_model)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
        load_recipe(RECIPES / "stage1.yaml", [setting])
    assert main(["train", "--config", str(RECIPES / "stage1.yaml"), "--set", setting]) == 2
    assert named in capsys.readouterr().err


def test_hard_token_weight_is_refused_for_a_baseline_which_trains_without_labels():
    with pytest.raises(ConfigError, match=r"tah\.hard_token_weight.*baseline 'always'"):
        load_recipe(RECIPES / "always.yaml", ["tah.hard_token_weight=3"])
    assert load_recipe(RECIPES / "stage1.yaml", ["tah.hard_token_weight=3"]).tah_config().hard_token_weight == 3.0


def test_numbers_in_any_spelling_are_accepted_from_set():
    sets = ["training.learning_rate=1e-4", "training.max_grad_norm=1", "training.max_steps=1e3",
            "tah.max_iter='3'", "tah.lora_alpha=\"16\""]
    recipe = load_recipe(RECIPES / "stage1.yaml", sets)
    assert recipe.training.learning_rate == 1e-4 and recipe.training.max_grad_norm == 1.0
    assert type(recipe.training.max_grad_norm) is float and recipe.training.max_steps == 1000
    assert recipe.tah["max_iter"] == 3 and recipe.tah["lora_alpha"] == 16.0  # typed for run.py's comparisons
    assert recipe.tah_config().max_iter == 3


def test_yaml_recipe_spellings_are_accepted(tmp_path):
    text = (RECIPES / "stage1.yaml").read_text()
    for old, new in [("learning_rate: 1.0e-2", "learning_rate: 1e-2"), ("max_iter: 2", 'max_iter: "2"'),
                     ("decider_hidden_dims: [32]", "decider_hidden_dims: 32\n  lora_target_modules: q_proj")]:
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "r.yaml").write_text(text)
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.training.learning_rate == 1e-2
    config = recipe.tah_config()
    assert (config.max_iter, config.decider_hidden_dims, config.lora_target_modules) == (2, [32], ["q_proj"])


@pytest.mark.parametrize("key", ["model", "tokenizer", "data", "eval_data"])
def test_a_missing_path_is_named_before_anything_loads(key, tmp_path, capsys):
    paths = {"model": tmp_path, "data": tmp_path, "output_dir": tmp_path / "out", key: tmp_path / "nowhere"}
    args = [arg for name, value in paths.items() for arg in ("--set", f"{name}={value}")]
    assert main(["train", "--config", str(RECIPES / "stage1.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert f"{key}: no such" in err and str(tmp_path / "nowhere") in err
    assert "huggingface" not in err.lower()


def test_stage1_needs_labelled_data(workspace, tmp_path, capsys):
    raw = tmp_path / "raw"
    Dataset.from_dict({"input_ids": [[1, 7, 8]], "labels": [[-100, 7, 8]]}).save_to_disk(raw)
    args = overrides(workspace, tmp_path / "out") + ["--set", f"data={raw}"]
    assert main(["train", "--config", str(RECIPES / "stage1.yaml"), *args]) == 2
    assert "tah label" in capsys.readouterr().err


# -- stage 1 -> stage 2 ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage1(workspace) -> dict:
    out = workspace["root"] / "stage1"
    record = run_train("stage1.yaml", overrides(workspace, out, eval_data=workspace["heldout"]))
    return {"out": out, "record": record}


def test_stage1_loss_falls_and_logs_iterated_share(stage1, workspace):
    losses = train_losses(stage1["record"])
    assert len(losses) == 8  # 32 rows / effective batch 8 x 2 epochs
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses  # from ln(64) = 4.16 at the start
    logged = [e["iterated"] for e in stage1["record"]["log_history"] if "loss" in e]
    data = load_labelled(workspace["data"])
    assert all(0.02 < share < 0.3 for share in logged)  # the oracle's share of real tokens
    total = sum(sum(1 for label in row if label == 2) for row in data["iter_labels"])
    assert abs(sum(logged) / len(logged) - total / sum(len(row) for row in data["input_ids"])) < 0.05
    assert any("eval_loss" in e and "eval_iterated" in e for e in stage1["record"]["log_history"])


def load_labelled(path: Path):
    from datasets import load_from_disk

    return load_from_disk(str(path))


def test_stage1_checkpoints_are_complete_and_rotated(stage1):
    out = stage1["out"]
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-5", "checkpoint-8"]  # save_total_limit 2
    assert not (out / ".staging").exists()
    for name in checkpoints + ["final"]:
        model = TaHForCausalLM.from_pretrained(out / name)
        assert model.tah_config.training_stage == 1
    assert (out / "final" / "tokenizer.json").is_file()


def test_stage2_trains_only_the_decider_and_beats_majority(stage1, workspace):
    before = TaHForCausalLM.from_pretrained(stage1["out"] / "final")
    out = workspace["root"] / "stage2"
    record = run_train("stage2.yaml", overrides(workspace, out, model=stage1["out"] / "final",
                                                 eval_data=workspace["heldout"]))
    after = TaHForCausalLM.from_pretrained(out / "final")
    for name, weight in before.lm.state_dict().items():
        assert torch.equal(weight, after.lm.state_dict()[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(before.decider.state_dict().values(),
                                                      after.decider.state_dict().values(), strict=True))
    last = [e for e in record["log_history"] if "loss" in e][-1]
    assert {"decider_accuracy", "decider_precision", "decider_recall"} <= set(last)
    # Held-out: the decider (at the inference threshold) beats always answering the majority class.
    heldout = load_labelled(workspace["heldout"])
    after.eval()
    right = judged = positives = 0
    for ids, hard in zip(heldout["input_ids"], heldout["iter_labels"], strict=True):
        out_ = after(torch.tensor([ids]))
        predicted = (out_.iter_count[0] > 1).tolist()
        for p, label in zip(predicted, hard, strict=True):
            if label != -100:
                judged += 1
                positives += label == 2
                right += p == (label == 2)
    majority = max(positives, judged - positives) / judged
    assert right / judged > majority + 0.02, (right / judged, majority)


@pytest.mark.parametrize("baseline, passes", [("standard", 1), ("always", 2)])
def test_baselines_run_the_same_recipe(baseline, passes, workspace):
    out = workspace["root"] / baseline
    record = run_train(f"{baseline}.yaml", overrides(workspace, out, **{"training.max_steps": 2}))
    model = TaHForCausalLM.from_pretrained(out / "final")
    assert model.tah_config.max_iter == passes
    shares = [e["iterated"] for e in record["log_history"] if "loss" in e]
    assert shares == [float(passes - 1)] * 2
    assert model(torch.tensor([[1, 7, 8, 9]])).iter_count.tolist() == [[passes] * 4]


def test_stop_at_loss_ends_the_run_at_the_first_log_that_reaches_it(workspace):
    """`training.stop_at_loss`: the same run, stopped at the first logged loss at or below the target,
    still writes its final model (the demo pretrains every seed's base to one loss this way)."""
    steps = {"training.max_steps": 8, "training.logging_steps": 1}
    full = train_losses(run_train("standard.yaml", overrides(workspace, workspace["root"] / "full", **steps)))
    target = min(full[2:5])  # reached at some step in 3..5, never before step 3 unless an earlier one is lower
    stop = next(step for step, loss in enumerate(full, start=1) if loss <= target)
    out = workspace["root"] / "stopped"
    stopped = train_losses(run_train("standard.yaml", overrides(workspace, out, **steps,
                                                                 **{"training.stop_at_loss": target})))
    assert stop < len(full) and stopped == full[:stop]
    assert (out / "final" / "config.json").is_file()


class SkipEveryLayer(TrainerCallback):
    """While training, every decoder layer returns its input (LayerDrop at p = 1); gone at the end."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        self.hooks = [layer.register_forward_hook(lambda module, inputs, output: inputs[0]) for layer in layers]

    def on_train_end(self, args, state, control, **kwargs):
        for hook in self.hooks:
            hook.remove()


def test_callbacks_reach_the_trainer(workspace):
    """`train(recipe, callbacks=[...])` adds them to its Trainer: with every decoder layer skipped on
    every step, the layers get no gradient and keep their weights while the embeddings learn; without
    the callback every layer moves."""
    from tah.train.run import train

    start = AutoModelForCausalLM.from_pretrained(workspace["model"]).state_dict()
    moved = {}
    for name, callbacks in (("plain", []), ("skipped", [SkipEveryLayer()])):
        out = workspace["root"] / f"callbacks-{name}"
        sets = overrides(workspace, out, **{"training.max_steps": 2, "training.save_steps": 2})
        recipe = load_recipe(RECIPES / "standard.yaml", [arg for arg in sets if arg != "--set"])
        final = TaHForCausalLM.from_pretrained(train(recipe, overwrite=True, callbacks=callbacks)).lm.state_dict()
        moved[name] = {key: not torch.equal(final[key], start[key]) for key in start}
    layers = [key for key in start if ".layers." in key]
    assert layers and all(moved["plain"][key] for key in layers if "norm" not in key)
    assert not any(moved["skipped"][key] for key in layers)
    assert moved["skipped"]["model.embed_tokens.weight"]


def test_base_lr_ratio_moves_the_base_weights_at_that_share_of_the_rate(workspace):
    """`training.base_lr_ratio`: the base model's own weights train at that share of the learning rate,
    the LoRA adapters at all of it. One AdamW step from the same start on the same batch: every base
    weight moves by the ratio times what it moves at ratio 1, every adapter by the same amount."""
    from tah.train.trainer import is_base_weight

    one_step = {"training.max_steps": 1, "training.warmup_ratio": 0, "training.save_steps": 1}
    final = {}
    for ratio in (1.0, 0.25):
        out = workspace["root"] / f"ratio-{ratio}"
        run_train("stage1.yaml", overrides(workspace, out, **one_step, **{"training.base_lr_ratio": ratio}))
        final[ratio] = TaHForCausalLM.from_pretrained(out / "final").state_dict()
    base_lm = AutoModelForCausalLM.from_pretrained(workspace["model"])
    start = TaHForCausalLM.from_base(base_lm, load_recipe(RECIPES / "stage1.yaml").tah_config()).state_dict()
    base = [name for name in final[1.0] if is_base_weight(name) and not name.startswith("lm.lm_head")]  # tied
    adapters = [name for name in final[1.0] if ".lora_" in name]
    moved = {ratio: {name: weights[name] - start[name] for name in base} for ratio, weights in final.items()}
    assert base and adapters and all(moved[1.0][name].abs().max() > 0 for name in base)
    for name in base:
        torch.testing.assert_close(moved[0.25][name], 0.25 * moved[1.0][name], rtol=1e-4, atol=1e-7, msg=name)
    for name in adapters:  # the same start (the run's seed) and the same gradient: the same step
        torch.testing.assert_close(final[0.25][name], final[1.0][name], msg=name)


def test_stage1_trains_in_bf16_as_the_paper_recipes_do(workspace):
    """`bf16: true` (the qwen3 recipes) runs the step under autocast: bf16 products, float32 weights."""
    out = workspace["root"] / "bf16"
    record = run_train("stage1.yaml", overrides(workspace, out, **{"training.bf16": "true", "training.max_steps": 3}))
    losses = train_losses(record)
    assert len(losses) == 3 and all(loss == loss and loss < 10 for loss in losses), losses  # finite, sane
    assert TaHForCausalLM.from_pretrained(out / "final").lm.dtype == torch.float32


def test_stage1_with_compiled_deep_passes_logs_the_eager_losses(workspace):
    """`training.compile_deep_passes: true` (for GPUs, issue 26): the Trainer's steps go through the
    compiled deeper passes (inductor, here on CPU) and log the losses of the eager run."""
    steps = {"training.max_steps": 3, "training.logging_steps": 1}
    eager = train_losses(run_train("stage1.yaml", overrides(workspace, workspace["root"] / "eager", **steps)))
    torch._dynamo.reset()
    try:
        compiled = train_losses(run_train("stage1.yaml", overrides(
            workspace, workspace["root"] / "compiled", **steps, **{"training.compile_deep_passes": "true"})))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs >= 1  # the deeper passes did go through torch.compile
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


# -- metrics ---------------------------------------------------------------------------------------
HOST_READS = ("cpu", "item", "tolist", "numpy", "to", "__bool__", "__int__", "__float__")


def test_steps_keep_metrics_on_the_device_and_the_log_reads_them(tmp_path, monkeypatch):
    """compute_loss sums its counters where the batch is, reading nothing back (each read is a host
    sync on a GPU); the next log reads them once and reports the same metrics as counting by hand."""
    model = tiny_tah(training_stage=2).train()  # stage 2: the decider's scores feed all six counters
    trainer = trainer_module.TaHTrainer(model=model, args=TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, logging_strategy="no"))
    gen = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    iter_labels = torch.where(torch.rand(2, 9, generator=gen) < 0.4, 2, 1).masked_fill(mask == 0, -100)
    inputs = {"input_ids": torch.randint(3, 64, (2, 9), generator=gen), "attention_mask": mask,
              "iter_labels": iter_labels}
    reads = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == trainer_module.__file__:
                reads.append(name)
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in HOST_READS:
        spy(name)
    for _ in range(2):
        trainer.compute_loss(model, inputs)
    assert reads == []
    monkeypatch.undo()

    with torch.no_grad():
        out = model(**inputs)
    predicted = torch.sigmoid(out.decider_logits) > model.tah_config.threshold
    target = out.decider_targets.bool()
    trainer.log({"loss": 1.0})
    logged = trainer.state.log_history[-1]
    assert logged["iterated"] == pytest.approx(int((iter_labels == 2).sum()) / int(mask.sum()))
    assert logged["decider_accuracy"] == pytest.approx(float((predicted == target).float().mean()))
    tp = int((predicted & target).sum())
    assert logged["decider_precision"] == pytest.approx(tp / int(predicted.sum()) if predicted.any() else 0.0)
    assert logged["decider_recall"] == pytest.approx(tp / int(target.sum()))
    trainer.log({"loss": 1.0})  # nothing counted since: zeros, not the previous sums
    assert trainer.state.log_history[-1]["iterated"] == 0.0 and "decider_accuracy" not in trainer.state.log_history[-1]


# -- faults ----------------------------------------------------------------------------------------
KILLER = """
import os, signal, sys
from tah.train.trainer import TaHTrainer
where, step = sys.argv[1], int(sys.argv[2])
if where == "step":
    original = TaHTrainer.training_step
    def training_step(self, *args, **kwargs):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    TaHTrainer.training_step = training_step
else:  # while writing checkpoint-<step>: its model files exist, the optimizer state does not
    original = TaHTrainer._save_optimizer_and_scheduler
    def save(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)
    TaHTrainer._save_optimizer_and_scheduler = save
from tah.cli import main
sys.exit(main(sys.argv[3:]))
"""


def killed_run(where: str, step: int, args: list[str]) -> int:
    cmd = [sys.executable, "-c", KILLER, where, str(step), "train", "--config", str(RECIPES / "stage1.yaml"), *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300).returncode


def final_state(out: Path) -> dict[str, torch.Tensor]:
    return TaHForCausalLM.from_pretrained(out / "final").state_dict()


@pytest.fixture(scope="module")
def uninterrupted(workspace) -> dict[str, torch.Tensor]:
    out = workspace["root"] / "straight"
    run_train("stage1.yaml", overrides(workspace, out, **{"tah.lora_dropout": 0.1, "training.save_steps": 3}))
    return final_state(out)


@pytest.mark.parametrize("where", ["step", "save"])
def test_sigkill_then_resume_matches_uninterrupted_run(where, workspace, uninterrupted):
    out = workspace["root"] / f"killed-{where}"
    args = overrides(workspace, out, **{"tah.lora_dropout": 0.1, "training.save_steps": 3})
    assert killed_run(where, 6 if where == "save" else 5, args) == -9
    assert not (out / "final").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]  # 6 died half-written
    TaHForCausalLM.from_pretrained(out / "checkpoint-3")  # the previous checkpoint stays loadable
    assert main(["train", "--config", str(RECIPES / "stage1.yaml"), *args, "--resume"]) == 0
    assert not (out / ".staging").exists()
    resumed = final_state(out)
    for name, weight in uninterrupted.items():
        assert torch.allclose(resumed[name], weight, atol=1e-6, rtol=0), name


def test_resume_without_checkpoint_is_an_error(workspace, tmp_path, capsys):
    args = overrides(workspace, tmp_path / "empty")
    assert main(["train", "--config", str(RECIPES / "stage1.yaml"), *args, "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


# -- distributed -----------------------------------------------------------------------------------
def test_two_processes_follow_the_one_process_loss_curve(workspace, stage1):
    out = workspace["root"] / "two-procs"
    # --multi_gpu (not --cpu, which starts one process without MPI) with no CUDA: 2 CPU processes on gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tah.cli",
           "train", "--config", str(RECIPES / "stage1.yaml"), *overrides(workspace, out, eval_data=workspace["heldout"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((out / "recipe.json").read_text())
    assert two["processes"] == 2 and stage1["record"]["processes"] == 1
    one_losses, two_losses = train_losses(stage1["record"]), train_losses(two)
    assert len(two_losses) == len(one_losses)
    assert max(abs(a - b) for a, b in zip(one_losses, two_losses, strict=True)) < 1e-4, (one_losses, two_losses)
