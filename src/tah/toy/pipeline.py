"""The demo's experiment, stage by stage, through the library functions behind the commands a researcher
runs on Qwen3 (`tah label`: `run_label`; `tah prune`: `prune`; `tah train`: `load_recipe`, then `train`):

    data      train.jsonl / heldout.jsonl of the arithmetic task, the char tokenizer
    pretrain  `tah train` (baseline standard) of a random tiny Qwen3 to a training loss: the base, good but imperfect
    prune     `tah prune --mlp-keep N` of the base, N the widest that keeps "TaH" under Standard's parameters
    train     Standard: the base fine-tuned with one pass
    label     `tah label --prompt-easy --confidence 0.9` of train and held-out data, Standard as the reference
    train     AlwaysIterate, TaH+ (stage 1 + 2), TaH (pruned, stage 1 + 2), each from the base: equal budgets
    evaluate  answers by greedy generation, teacher-forced next-token accuracy, iterated share

Each stage's own output (what the command prints, Trainer logs and the like) goes to
OUT/logs/<stage>.log.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from tah.errors import InputError, TaHError
from tah.toy.task import TaskConfig, make_splits, to_jsonl
from tah.toy.tokenizer import build_char_tokenizer

T = TypeVar("T")
LABEL_REFERENCES = ("standard", "base")
PRUNE_KINDS = ("mlp", "layer")
RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "tiny-cpu"


@dataclass
class DemoSettings:
    """Sizes and budgets of one demo run. Fine-tuning budgets are equal across the four models;
    stage 2 (decider only) gets `decider_steps` on top, as in the paper.

    Why these (experiments/toy-depth/README.md, rounds 4-8):
    - The base is pretrained to a training loss (`pretrain_loss`, at most `pretrain_steps`), not for
      a number of steps: every seed starts fine-tuning from a base of one quality (with 700 steps,
      seed 0's base sat on a plateau at loss 0.23 while seeds 1-2 reached 0.03, and the seeds'
      spread, not the models', decided the verdict).
    - 4 layers to loss 0.05 (round 8): past the plateau where the carries are not yet learnt (at 0.1
      a 4-layer base can still sit on it, and which model leaves it in the fine-tune is a lottery of
      the data order), reached at steps 590-750 of the 3,000-step cosine. With 3 layers to loss 0.1,
      Standard's seeds spread 4.5 points and TaH+'s margin over it (+1.3) stayed under the error.
    - 30,000 training problems: the whole run sees each about once. With 3,000 it saw each 14
      times; the models memorised, and which one generalised best became a lottery of overfitting.
    - LoRA rank 8: the depth-1 pass's only weights of its own (rank 4: TaH+ within a point of
      Standard); TaH's parameters stay below Standard's.
    - TaH's parameters come from every layer's MLP width (`prune="mlp"`: `tah prune --mlp-keep`, the
      most neurons that keep TaH under Standard's parameters: 125 of 192), not from a layer: one of
      four layers is a quarter of the depth (the paper removes one of 28), and three layers after
      pruning relearnt the task on some seeds only (round 9: TaH -9.2 points under Standard; with
      the width pruned, +0.5 on the same seeds' bases).
    - 1,000 held-out problems: 400 left ~1.3 points of sampling noise per seed and model.
    - Labels by the fine-tuned Standard model (`label_reference="standard"`): hard = what one pass
      still misses or is unsure of after the same training, the class the extra pass is for. The
      base's labels, taken before fine-tuning, go stale as depth 0 keeps learning.
    - `--prompt-easy`: the question's operands are random, so a reference cannot predict them and
      would label them hard; the decider then learned "random-digit context" and iterated the
      copies of those digits in the answer.
    """

    task: TaskConfig = field(default_factory=lambda: TaskConfig.quick(train_size=30_000, heldout_size=1000, width=4))
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    pretrain_steps: int = 3000  # with `pretrain_loss`: the most steps (and the length of the cosine schedule)
    pretrain_loss: float | None = 0.05  # pretrain until the training loss is this low (`training.stop_at_loss`)
    prune: str = "mlp"  # TaH's parameters come from: "mlp" (every layer's MLP width) or "layer" (one layer)
    finetune_steps: int = 600
    decider_steps: int = 150
    batch_size: int = 32
    pretrain_lr: float = 3e-3
    finetune_lr: float = 3e-3
    decider_lr: float = 3e-3
    lora_rank: int = 8  # AlwaysIterate's and TaH's depth-1 adapters (alpha = 2 x rank, as the recipes)
    pos_weight: float = 5.0  # the paper's: a missed hard token costs more than a wasted pass
    hard_token_weight: float = 1.0  # TaH stage 1's CE weight of the labelled hard tokens (`tah.hard_token_weight`)
    threshold: float = 0.5
    label_confidence: float | None = 0.9  # `tah label --confidence`: the tokens the reference is unsure of are hard too
    label_prompt_easy: bool = True  # `tah label --prompt-easy`
    label_reference: str = "standard"  # the model `tah label` runs: "standard" (fine-tuned, one pass) or "base"
    max_length: int = 96
    eval_problems: int = 1000
    samples: int = 6

    def __post_init__(self) -> None:
        if self.prune not in PRUNE_KINDS:
            raise InputError(f"DemoSettings.prune must be one of {PRUNE_KINDS}; got {self.prune!r}")
        if self.label_reference not in LABEL_REFERENCES:
            raise InputError(f"DemoSettings.label_reference must be one of {LABEL_REFERENCES}; "
                             f"got {self.label_reference!r}")

    @classmethod
    def quick(cls) -> DemoSettings:
        """Two to three minutes (148 s on one thread here): two-operand problems, a narrower model, a few hundred steps. It checks the
        pipeline, not the method: one pass nearly solves this task, and the fine-tuned Standard misses
        ~1% of its tokens, too few to train a decider on, so the base labels them."""
        return cls(task=TaskConfig.quick(terms=(2, 2), train_size=20_000, heldout_size=100, width=4), hidden=48,
                   layers=3, pretrain_steps=650, pretrain_loss=None, finetune_steps=400, decider_steps=60, eval_problems=100, samples=4,
                   label_reference="base")


def recipe_path(name: str) -> Path:
    """recipes/tiny-cpu/<name>.yaml, from the source tree or the installed package's data."""
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        raise TaHError(f"the demo needs {path}; run it from a checkout of the repository (pip install -e .)")
    return path


class Stages:
    """Runs the pipeline stages of one seed under `root`, logging each to root/logs/<stage>.log."""

    def __init__(self, root: Path, settings: DemoSettings, seed: int) -> None:
        self.root, self.settings, self.seed = root, settings, seed
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def logged(self, log: str, command: str, work: Callable[[], T]) -> tuple[T, float]:
        """Run `work` (what `tah COMMAND` runs) with its stdout in logs/<log>.log; returns its result and
        the seconds it took. A `TaHError` comes back naming the stage and its log."""
        started = time.perf_counter()
        path = self.root / "logs" / f"{log}.log"
        with open(path, "a") as sink, contextlib.redirect_stdout(sink):
            try:
                result = work()
            except TaHError as err:
                raise TaHError(f"demo stage `tah {command}` failed: {err} (its output: {path})") from err
        return result, time.perf_counter() - started

    def data(self) -> tuple[list, list]:
        train, heldout = make_splits(replace(self.settings.task, seed=self.seed))
        to_jsonl(train, self.root / "data" / "train.jsonl")
        to_jsonl(heldout, self.root / "data" / "heldout.jsonl")
        to_jsonl(train[:256], self.root / "data" / "calibration.jsonl")
        return train, heldout

    def init_model(self) -> Path:
        """A random tiny Qwen3 with the char tokenizer, saved as an HF model directory."""
        s = self.settings
        tokenizer = build_char_tokenizer()
        torch.manual_seed(self.seed)
        config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=s.hidden, intermediate_size=3 * s.hidden,
                             num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads // 2,
                             head_dim=s.hidden // s.heads, max_position_embeddings=4 * s.max_length,
                             tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        path = self.root / "models" / "init"
        Qwen3ForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    def train(self, recipe: str, out: str, model: Path, data: Path, steps: int, lr: float, **extra) -> tuple[Path, float]:
        """`tah train --config recipes/tiny-cpu/RECIPE.yaml --overwrite --set ...` into runs/OUT."""
        from tah.train.recipe import load_recipe
        from tah.train.run import train

        s = self.settings
        sets = {"model": model, "data": data, "output_dir": self.root / "runs" / out, "max_length": s.max_length,
                "training.max_steps": steps, "training.learning_rate": lr, "training.seed": self.seed,
                "training.per_device_batch_size": s.batch_size, "training.effective_batch_size": s.batch_size,
                "training.logging_steps": max(steps // 10, 1), "training.save_steps": steps,
                "training.save_total_limit": 1, "training.warmup_ratio": 0.05, **extra}
        overrides = [f"{key}={value}" for key, value in sets.items()]

        def work() -> Path:
            final = train(load_recipe(recipe_path(recipe), overrides), overwrite=True)  # a rerun starts afresh
            print(f"final model: {final}")
            return final

        return self.logged(out, "train", work)

    def label(self, model: Path, split: str) -> tuple[Path, float]:
        """`tah label` of data/SPLIT.jsonl with `model` as the reference, into data/labeled-SPLIT."""
        from tah.data.label_run import run_label

        out = self.root / "data" / f"labeled-{split}"
        _, seconds = self.logged(f"label-{split}", "label", lambda: run_label(
            str(model), str(self.root / "data" / f"{split}.jsonl"), str(out), max_length=self.settings.max_length,
            batch_size=64, confidence=self.settings.label_confidence, prompt_easy=self.settings.label_prompt_easy))
        return out, seconds

    def prune(self, model: Path) -> tuple[Path, float]:
        """`tah prune` of `model` on data/calibration.jsonl, into models/pruned: with `prune="mlp"`,
        `--mlp-keep` of the most neurons that leave TaH's parameters under Standard's; with "layer",
        `--layers 1`."""
        from tah.train.prune import print_report, prune
        from tah.train.prune_width import print_width_report, prune_width

        out, data = self.root / "models" / "pruned", str(self.root / "data" / "calibration.jsonl")
        common = {"max_length": self.settings.max_length, "batch_size": 32}

        def work() -> None:
            if self.settings.prune == "layer":
                print_report(prune(str(model), data, str(out), layers=1, **common), out)
            else:
                keep = self.mlp_keep(model)
                print_width_report(prune_width(str(model), data, str(out), keep=keep, **common), out)

        _, seconds = self.logged("prune", "prune", work)
        return out, seconds

    def mlp_keep(self, model: Path) -> int:
        """The most MLP neurons per layer that leave TaH (every layer's LoRA and the decider, on the
        narrowed model) with fewer parameters than Standard (the model at `model`). InputError when
        no width does."""
        from transformers import AutoModelForCausalLM

        from tah import TaHForCausalLM
        from tah.train.prune_width import gated_mlps, prune_mlp_width
        from tah.train.recipe import load_recipe

        s = self.settings
        recipe = load_recipe(recipe_path("stage1"), [f"tah.lora_rank={s.lora_rank}", f"tah.lora_alpha={2 * s.lora_rank}"])
        lm = AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
        size = gated_mlps(lm)[0].down_proj.in_features

        def tah_parameters(width: int) -> int:
            narrow = prune_mlp_width(copy.deepcopy(lm), [torch.arange(width)] * len(gated_mlps(lm)))
            return sum(p.numel() for p in TaHForCausalLM.from_base(narrow, recipe.tah_config()).parameters())

        standard = sum(p.numel() for p in lm.parameters())
        full, one_less = tah_parameters(size), tah_parameters(size - 1)  # each neuron costs the same
        keep = size - ((full - standard) // (full - one_less) + 1)
        if keep < 1:
            raise InputError(f"no MLP width leaves TaH under Standard's {standard:,} parameters; lower lora_rank")
        return keep
