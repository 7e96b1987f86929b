"""Training recipes: a YAML file mapped onto dataclasses, checked before any model loads.

    stage: 1                      # 1: base + LoRA with oracle labels; 2: the decider only
    baseline: null                # or "standard" (one pass) / "always" (every token iterates)
    model: path/to/base-or-stage1 # HF model dir (stage 1, baselines) or a stage-1 checkpoint (stage 2)
    data: path/to/labeled         # `tah label` output (stage 1/2), or JSONL / a dataset (standard)
    eval_data: null               # optional held-out data, same kinds as `data`
    output_dir: runs/x
    max_length: 4096
    tah: {...}                    # TaHConfig fields (max_iter, lora_rank, decider_layers, ...)
    training: {...}               # TrainingSettings fields below

`--set training.learning_rate=1e-4` overrides one key (the value is parsed as YAML). Numbers may be
written in any common spelling (`1e-4`, `"2"`); a single item stands for a one-item list.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tah.config import TaHConfig, coerce, type_hints
from tah.errors import ConfigError

BASELINES = (None, "standard", "always")
SCHEDULERS = ("cosine_with_min_lr", "cosine", "linear", "constant", "constant_with_warmup")


@dataclass
class TrainingSettings:
    """Optimiser, schedule, batch and bookkeeping. The effective batch is split as
    per_device_batch_size x processes x gradient accumulation (which is derived)."""

    learning_rate: float = 4e-5
    base_lr_ratio: float = 1.0  # the base model's weights at this share of learning_rate (LoRA, decider: all of it)
    lr_scheduler: str = "cosine_with_min_lr"
    min_lr_ratio: float = 0.1  # cosine_with_min_lr: decay to this share of the peak
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    max_grad_norm: float = 0.2
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    stop_at_loss: float | None = None  # stop early once a logged training loss is at or below this
    per_device_batch_size: int = 1
    effective_batch_size: int = 1
    bf16: bool = False
    compile_deep_passes: bool = False  # torch.compile the deeper passes (GPU training: see TaHForCausalLM.compile_deep_passes)
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    eval_steps: int | None = None
    report_to: list[str] = field(default_factory=list)  # e.g. ["tensorboard"], ["wandb"]
    dataloader_num_workers: int = 0

    def validate(self) -> None:
        _positive(self, "learning_rate", "base_lr_ratio", "per_device_batch_size", "effective_batch_size", "logging_steps",
                  "save_steps")
        _at_least_zero(self, "weight_decay", "max_grad_norm", "epochs", "seed", "dataloader_num_workers")
        if self.lr_scheduler not in SCHEDULERS:
            raise ConfigError(f"training.lr_scheduler must be one of {list(SCHEDULERS)}; got {self.lr_scheduler!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"training.min_lr_ratio must lie in [0, 1]; got {self.min_lr_ratio}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"training.warmup_ratio must lie in [0, 1); got {self.warmup_ratio}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("set training.epochs > 0 or training.max_steps > 0")
        if self.stop_at_loss is not None and not self.stop_at_loss > 0:
            raise ConfigError(f"training.stop_at_loss must be > 0 (a training loss), or null; got {self.stop_at_loss}")
        for name in ("save_total_limit", "eval_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be an integer >= 1, or null; got {getattr(self, name)}")
        if self.effective_batch_size % self.per_device_batch_size:
            raise ConfigError(
                f"training.effective_batch_size ({self.effective_batch_size}) must be a multiple of "
                f"training.per_device_batch_size ({self.per_device_batch_size})"
            )

    def accumulation_steps(self, processes: int) -> int:
        """Gradient accumulation that makes per_device x processes x accumulation = effective batch."""
        per_step = self.per_device_batch_size * processes
        if self.effective_batch_size % per_step:
            raise ConfigError(
                f"training.effective_batch_size ({self.effective_batch_size}) is not a multiple of "
                f"per_device_batch_size x processes = {self.per_device_batch_size} x {processes}; "
                "change one of them"
            )
        return self.effective_batch_size // per_step


@dataclass
class Recipe:
    """One training run: what to train (stage / baseline), on what, and how."""

    model: str
    data: str
    output_dir: str
    stage: int = 1
    baseline: str | None = None
    eval_data: str | None = None
    tokenizer: str | None = None  # default: the model dir
    max_length: int = 2048
    tah: dict[str, Any] = field(default_factory=dict)
    training: TrainingSettings = field(default_factory=TrainingSettings)

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2; got {self.stage!r}")
        if self.baseline not in BASELINES:
            raise ConfigError(f"baseline must be one of {list(BASELINES)}; got {self.baseline!r}")
        if self.baseline and self.stage == 2:
            raise ConfigError(f"baseline {self.baseline!r} has no decider to train: use stage 1")
        _positive(self, "max_length", prefix="")
        if self.baseline and self.tah_config().hard_token_weight != 1.0:  # raises ConfigError on a bad tah.* field
            raise ConfigError(f"tah.hard_token_weight weighs the labelled hard tokens, and baseline {self.baseline!r} "
                              "trains without labels: drop the key, or train TaH (no baseline)")
        self.tah_config()  # raises ConfigError naming a bad tah.* field
        self.training.validate()

    def tah_config(self) -> TaHConfig:
        """The TaHConfig this run trains (baselines pin max_iter / decider)."""
        values = _tah_section(self.tah)
        if self.baseline == "standard":
            values.update(max_iter=1, decider="never")
        elif self.baseline == "always":
            values.update(decider="always")
        values["training_stage"] = self.stage
        return TaHConfig(**values)


def _tah_section(values: dict[str, Any]) -> dict[str, Any]:
    """The `tah:` keys with their values in TaHConfig's types (so "2" is 2 and q_proj is [q_proj])."""
    hints = type_hints(TaHConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown key(s) tah.{', tah.'.join(unknown)}; allowed: {sorted(hints)}")
    return {name: coerce(value, hints[name], f"tah.{name}") for name, value in values.items()}


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides (dotted keys), check names, types and values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values")
    for item in overrides or []:
        _apply_override(raw, item)
    for section in ("tah", "training"):  # a section with every key commented out reads as null
        if raw.get(section) is None:
            raw[section] = {}
    if not isinstance(raw["training"], dict):
        raise ConfigError("training must be a mapping (training: {learning_rate: ..., ...})")
    training = _build(TrainingSettings, raw.pop("training"), "training.")
    recipe = _build(Recipe, {**raw, "training": training}, "")
    recipe.tah = _tah_section(recipe.tah)  # typed once: run.py compares these values with a checkpoint's
    recipe.validate()
    return recipe


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value (e.g. training.learning_rate=1e-4); got {item!r}")
    *parents, leaf = key.split(".")
    node = raw
    for name in parents:
        if node.get(name) is None:  # absent, or an empty `tah:` in the YAML
            node[name] = {}
        node = node[name]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {name} is not a section")
    try:
        node[leaf] = yaml.safe_load(text)
    except yaml.YAMLError as err:
        reason = getattr(err, "problem", None) or err
        raise ConfigError(f"--set {key}: the value {text!r} is not valid YAML ({reason}); quote it or fix "
                          "the brackets, e.g. --set tah.decider_layers=[2,10]") from err


def _build(cls, values: dict, prefix: str):
    """cls(**values) after checking every key exists and every value has the annotated type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown recipe key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"allowed: {', '.join(prefix + k for k in fields)}")
    hints = type_hints(cls)
    for name, value in values.items():
        if not (hints[name] is TrainingSettings and isinstance(value, TrainingSettings)):
            values[name] = coerce(value, hints[name], prefix + name)
    missing = [prefix + name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"recipe is missing {', '.join(missing)}")
    return cls(**values)


def _positive(obj, *names: str, prefix: str = "training.") -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{prefix}{name} must be > 0; got {getattr(obj, name)}")


def _at_least_zero(obj, *names: str, prefix: str = "training.") -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ConfigError(f"{prefix}{name} must be >= 0; got {getattr(obj, name)}")
