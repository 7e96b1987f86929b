"""`TaHConfig`: every setting of a Think-at-Hard model in one validated dataclass."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tah.errors import ConfigError

DECIDERS = ("mlp", "oracle", "always", "never", "random")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TaHConfig:
    """Settings of the depth loop, the LoRA adapters, the decider and the training stage.

    Depth d = 0 is the base model's own pass; depths 1 .. max_iter-1 are latent iterations.
    A token makes at most `max_iter` passes.
    """

    max_iter: int = 2
    input_topk: int = 100  # soft input: softmax over the top-k accumulated logits
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    lora_per_depth: bool = False  # one adapter per depth >= 1, or one shared by all of them
    decider: str = "mlp"
    random_rate: float = 0.1  # "random" decider: chance that a token continues at each depth
    seed: int = 0  # "random" decider: the draw depends only on (seed, position, depth)
    decider_layers: list[int] | None = None  # indices into HF's hidden_states (0 = embeddings)
    decider_hidden_dims: list[int] = field(default_factory=lambda: [256])
    decider_topk: int = 100
    decider_expansion: int = 4
    decider_dropout: float = 0.0
    threshold: float = 0.9  # continue iff sigmoid(decider logit) > threshold
    training_stage: int = 1  # 1: next-token CE, base + LoRA train; 2: decider BCE only
    pos_weight: float = 5.0  # stage 2 BCE weight of the "continue" class
    # stage 1: CE weight of the tokens the labels send to a second pass (the original code's
    # `hard_token_relative_weight`); 1.0, the paper's recipes, weighs every token alike
    hard_token_weight: float = 1.0

    def __post_init__(self) -> None:
        hints = type_hints(TaHConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name], f.name))
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first field whose value is not allowed."""
        _check_int(self, "max_iter", low=1)
        _check_int(self, "input_topk", low=1)
        _check_int(self, "lora_rank", low=1)
        _check_number(self, "lora_alpha", low=0.0, low_open=True)
        _check_number(self, "lora_dropout", low=0.0, high=1.0, high_open=True)
        if not self.lora_target_modules or not all(isinstance(m, str) and m for m in self.lora_target_modules):
            raise ConfigError("lora_target_modules must be a non-empty list of module names, e.g. ['q_proj', 'v_proj']")
        if not isinstance(self.lora_per_depth, bool):
            raise ConfigError(f"lora_per_depth must be true or false, got {self.lora_per_depth!r}")
        if self.decider not in DECIDERS:
            raise ConfigError(f"decider must be one of {', '.join(DECIDERS)}; got {self.decider!r}")
        _check_number(self, "random_rate", low=0.0, high=1.0)
        _check_int(self, "seed", low=0)
        if self.decider_layers is not None:
            if not self.decider_layers or not all(_is_int(i) and i >= 0 for i in self.decider_layers):
                raise ConfigError(
                    f"decider_layers must be a non-empty list of hidden-state indices >= 0 (0 = embedding "
                    f"output), or null for the default; got {self.decider_layers!r}"
                )
        if not self.decider_hidden_dims or not all(_is_int(d) and d >= 1 for d in self.decider_hidden_dims):
            raise ConfigError(f"decider_hidden_dims must be a non-empty list of sizes >= 1; got {self.decider_hidden_dims!r}")
        _check_int(self, "decider_topk", low=1)
        _check_int(self, "decider_expansion", low=1)
        _check_number(self, "decider_dropout", low=0.0, high=1.0, high_open=True)
        _check_number(self, "threshold", low=0.0, high=1.0)
        if self.training_stage not in (1, 2):
            raise ConfigError(f"training_stage must be 1 (LM + LoRA) or 2 (decider); got {self.training_stage!r}")
        _check_number(self, "pos_weight", low=0.0, low_open=True)
        _check_number(self, "hard_token_weight", low=0.0, low_open=True)
        if self.training_stage == 2 and self.decider != "mlp":
            raise ConfigError(f"training_stage 2 trains the MLP decider, so decider must be 'mlp'; got {self.decider!r}")

    def replace(self, **changes: Any) -> TaHConfig:
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TaHConfig:
        """Build from a dict; an unknown key is an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown TaHConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> TaHConfig:
        """Read a config from a JSON string or a path to a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"TaHConfig JSON is not valid JSON: {err}") from err
        values.pop("tah_format", None)
        return cls.from_dict(values)


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` as the annotated type `hint` (int, float, str, bool, list[X], dict, or X | None), or a
    `ConfigError` naming `name` and the form expected. Numbers may be strings in any common spelling
    ("1e-4", "2": YAML 1.1 reads 1e-4 as a string), an int stands for a float and an integral float
    for an int; a single item, or a comma-separated string, stands for a list."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(o for o in options if o is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin is list:
        return _as_list(value, (typing.get_args(hint) or (Any,))[0], name)
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{name} must be a mapping (key: value, ...); got {_shown(value)}")
    cast = {int: _as_int, float: _as_float, str: _as_str, bool: _as_bool}.get(hint)
    return cast(value, name) if cast else value


def _as_list(value: Any, item: Any, name: str) -> list:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    elif not isinstance(value, list | tuple):
        value = [value]  # a single item
    kind = {int: "integers, e.g. [32, 64]", str: "names, e.g. [q_proj, v_proj]"}.get(item, "values")
    items = []
    for i, entry in enumerate(value):
        if isinstance(entry, list | tuple | dict):
            raise ConfigError(f"{name} must be a list of {kind}; got {_shown(value)}")
        items.append(coerce(entry, item, f"{name}[{i}]"))
    return items


def _number(value: Any) -> int | float | None:
    """The finite number `value` spells (an int, a float or a numeric string), else None."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def _as_int(value: Any, name: str) -> int:
    number = _number(value)
    if number is None or (isinstance(number, float) and not number.is_integer()):
        raise ConfigError(f"{name} must be an integer, e.g. 2; got {_shown(value)}")
    return int(number)


def _as_float(value: Any, name: str) -> float:
    number = _number(value)
    if number is None:
        raise ConfigError(f"{name} must be a number, e.g. 0.5 or 1e-4; got {_shown(value)}")
    return float(number)


def _as_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string; got {_shown(value)}")
    return value


def _as_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false; got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(cfg: TaHConfig, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if not _is_int(value) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")


def _check_number(cfg: TaHConfig, name: str, low: float, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        span = f"{lo}{low}, {high if high is not None else 'inf'}{hi if high is not None else ')'}"
        raise ConfigError(f"{name} must be a number in {span}; got {value!r}")
