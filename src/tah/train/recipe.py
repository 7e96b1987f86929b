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

`--set training.learning_rate=1e-4` overrides one key (the value is parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tah.config import TaHConfig
from tah.errors import ConfigError

BASELINES = (None, "standard", "always")
SCHEDULERS = ("cosine_with_min_lr", "cosine", "linear", "constant", "constant_with_warmup")


@dataclass
class TrainingSettings:
    """Optimiser, schedule, batch and bookkeeping. The effective batch is split as
    per_device_batch_size x processes x gradient accumulation (which is derived)."""

    learning_rate: float = 4e-5
    lr_scheduler: str = "cosine_with_min_lr"
    min_lr_ratio: float = 0.1  # cosine_with_min_lr: decay to this share of the peak
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    max_grad_norm: float = 0.2
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    per_device_batch_size: int = 1
    effective_batch_size: int = 1
    bf16: bool = False
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    eval_steps: int | None = None
    report_to: list[str] = field(default_factory=list)  # e.g. ["tensorboard"], ["wandb"]
    dataloader_num_workers: int = 0

    def validate(self) -> None:
        _positive(self, "learning_rate", "per_device_batch_size", "effective_batch_size", "logging_steps",
                  "save_steps")
        if self.lr_scheduler not in SCHEDULERS:
            raise ConfigError(f"training.lr_scheduler must be one of {list(SCHEDULERS)}; got {self.lr_scheduler!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"training.min_lr_ratio must lie in [0, 1]; got {self.min_lr_ratio}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"training.warmup_ratio must lie in [0, 1); got {self.warmup_ratio}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("set training.epochs > 0 or training.max_steps > 0")
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
        _positive(self, "max_length")
        self.tah_config()  # raises ConfigError naming a bad tah.* field
        self.training.validate()

    def tah_config(self) -> TaHConfig:
        """The TaHConfig this run trains (baselines pin max_iter / decider)."""
        values = dict(self.tah)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TaHConfig)})
        if unknown:
            raise ConfigError(f"unknown key(s) tah.{', tah.'.join(unknown)}; allowed: "
                              f"{sorted(f.name for f in dataclasses.fields(TaHConfig))}")
        if self.baseline == "standard":
            values.update(max_iter=1, decider="never")
        elif self.baseline == "always":
            values.update(decider="always")
        values["training_stage"] = self.stage
        return TaHConfig(**values)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides (dotted keys), check names, types and values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values")
    for item in overrides or []:
        _apply_override(raw, item)
    raw.setdefault("training", {})
    if not isinstance(raw["training"], dict):
        raise ConfigError("training must be a mapping (training: {learning_rate: ..., ...})")
    training = _build(TrainingSettings, raw.pop("training"), "training.")
    recipe = _build(Recipe, {**raw, "training": training}, "")
    recipe.validate()
    return recipe


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value (e.g. training.learning_rate=1e-4); got {item!r}")
    *parents, leaf = key.split(".")
    node = raw
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {name} is not a section")
    node[leaf] = yaml.safe_load(text)


def _build(cls, values: dict, prefix: str):
    """cls(**values) after checking every key exists and every value has the annotated type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown recipe key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"allowed: {', '.join(prefix + k for k in fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        values[name] = _coerce(value, hints[name], prefix + name)
    missing = [prefix + name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"recipe is missing {', '.join(missing)}")
    return cls(**values)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check `value` against a simple annotation (int, float, str, bool, list, dict, X | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(o for o in options if o is not type(None))
        origin = typing.get_origin(hint)
    if hint is TrainingSettings and isinstance(value, TrainingSettings):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    if (origin or hint) is list and isinstance(value, list | str):
        return [value] if isinstance(value, str) else value
    if (origin or hint) is dict and isinstance(value, dict):
        return value
    kind = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"recipe key {name} must be {kind}; got {value!r} ({type(value).__name__})")


def _positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{name} must be > 0; got {getattr(obj, name)}")
