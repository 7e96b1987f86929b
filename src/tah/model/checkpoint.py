"""Save and load TaH checkpoints: our layout and the original implementation's.

Our layout (safetensors + JSON, nothing pickled):
    config.json, model.safetensors       the base model, readable by AutoModelForCausalLM
    tah_config.json                      TaHConfig plus "tah_format"
    lora/adapter_config.json, lora/adapter_model.safetensors     adapter of depth 1 (or shared)
    lora/depth_<d>/...                   adapter of depth d >= 2 when lora_per_depth
    decider.safetensors                  the MLP decider, when there is one
The original layout has the same base and lora/ files, `iter_decider.bin` (a torch pickle read with
weights_only=True) and its own `tah_config.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tah.config import TaHConfig
from tah.errors import CheckpointError
from tah.model.lora import plain_linears

FORMAT = 1
PEFT_PREFIX = "base_model.model."


# -- saving -----------------------------------------------------------------------------------
def save_pretrained(model, path: str | os.PathLike) -> None:
    """Write everything into a temporary sibling, then swap it in: a kill never leaves half a checkpoint."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.saving-", dir=final.parent))
    try:
        with plain_linears(model.lm, model.lora):
            model.lm.save_pretrained(staging)
        (staging / "tah_config.json").write_text(json.dumps({"tah_format": FORMAT, **model.tah_config.to_dict()}, indent=2))
        _save_adapters(model, staging)
        if len(list(model.decider.parameters())):
            save_file({k: v.detach().contiguous() for k, v in model.decider.state_dict().items()},
                      staging / "decider.safetensors")
        _swap_in(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _backup_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.previous")


def _swap_in(staging: Path, final: Path) -> None:
    """Two renames; between them the previous checkpoint sits at `_backup_path` (see load_pretrained)."""
    if not final.exists():
        os.replace(staging, final)
        return
    old = _backup_path(final)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    try:
        os.replace(staging, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _save_adapters(model, root: Path) -> None:
    if not model.lora:
        return
    cfg = model.tah_config
    first = next(iter(model.lora.values()))
    for index in range(len(first.lora_A)):
        folder = root / "lora" if index == 0 else root / "lora" / f"depth_{index + 1}"
        folder.mkdir(parents=True)
        tensors = {}
        for path, module in model.lora.items():
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = module.lora_A[index].detach().contiguous()
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = module.lora_B[index].detach().contiguous()
        save_file(tensors, folder / "adapter_model.safetensors")
        peft_config = {
            "peft_type": "LORA", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted({p.rsplit(".", 1)[-1] for p in model.lora}), "bias": "none",
            "fan_in_fan_out": False, "base_model_name_or_path": "", "task_type": "CAUSAL_LM",
        }
        (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))


# -- loading ----------------------------------------------------------------------------------
def load_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, **overrides):
    """Read a checkpoint directory in either layout; `overrides` replace TaHConfig fields."""
    from transformers import AutoModelForCausalLM

    root = Path(path)
    if not root.is_dir():
        backup = _backup_path(root)
        hint = (f"; a save was interrupted, and the previous checkpoint is intact at {backup}: rename it to {root}"
                if backup.is_dir() else "")
        raise CheckpointError(f"checkpoint directory {root} does not exist{hint}")
    raw = _read_json(root / "tah_config.json")
    upstream = "iter_decider" in raw
    config, decider_state = _upstream_config(root, raw) if upstream else (TaHConfig.from_json(json.dumps(raw)), None)
    if overrides:
        config = config.replace(**overrides)
    _require(root / "config.json", "the base model's HF config")
    if not (root / "model.safetensors").exists() and not (root / "model.safetensors.index.json").exists():
        raise CheckpointError(f"{root / 'model.safetensors'} is missing: the base model's weights must be there")
    try:
        lm = AutoModelForCausalLM.from_pretrained(root, dtype=dtype, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, SafetensorError, RuntimeError) as err:
        raise CheckpointError(f"cannot load the base model from {root} (config.json / model.safetensors): {err}") from err
    model = cls(lm, config)
    _load_adapters(model, root)
    if decider_state is None and len(list(model.decider.parameters())):
        decider_state = _read_safetensors(root / "decider.safetensors")
    if decider_state is not None and len(list(model.decider.parameters())):
        _load_decider(model, decider_state, root / ("iter_decider.bin" if upstream else "decider.safetensors"))
    return model.to(dtype) if dtype is not None else model


def load_tokenizer(path: str | os.PathLike, fix: str = "save the tokenizer next to the model "
                   "(tokenizer.save_pretrained(DIR))"):
    """The tokenizer saved in `path` (local files only, nothing downloads). Raises CheckpointError
    naming `path`, the cause and `fix` (what the caller's user should do)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load a tokenizer from {path}: {err}; {fix}") from err


def load_tah_or_plain(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, **overrides):
    """A TaH checkpoint as `load_pretrained` reads it; or, for a plain Hugging Face causal LM directory
    (config.json and weights, no tah_config.json), that model as the one-pass baseline (max_iter 1,
    decider "never": exactly the base model), so that evaluation compares TaH with a Standard model
    trained anywhere. Returns (model, plain: bool). `overrides` apply to TaH checkpoints only."""
    from transformers import AutoModelForCausalLM

    root = Path(path)
    if (root / "tah_config.json").is_file() or not (root / "config.json").is_file():
        return load_pretrained(cls, root, dtype=dtype, **overrides), False
    try:
        lm = AutoModelForCausalLM.from_pretrained(root, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, SafetensorError, RuntimeError) as err:
        raise CheckpointError(f"{root} has no tah_config.json and does not load as a Hugging Face causal LM "
                              f"either: {err}") from err
    return cls(lm, TaHConfig(max_iter=1, decider="never")), True


def _load_adapters(model, root: Path) -> None:
    if not model.lora:
        return
    first = next(iter(model.lora.values()))
    for index in range(len(first.lora_A)):
        file = root / "lora" / ("" if index == 0 else f"depth_{index + 1}") / "adapter_model.safetensors"
        tensors = _read_safetensors(file)
        for path, module in model.lora.items():
            for name, param in (("lora_A", module.lora_A[index]), ("lora_B", module.lora_B[index])):
                key = f"{PEFT_PREFIX}{path}.{name}.weight"
                if key not in tensors:
                    raise CheckpointError(f"{file} has no {key}: the adapter does not cover module {path}; "
                                          "check lora_target_modules against the checkpoint")
                if tensors[key].shape != param.shape:
                    raise CheckpointError(
                        f"{file}: {name} of module {path} has shape {tuple(tensors[key].shape)}, but the base model "
                        f"and lora_rank need {tuple(param.shape)}; the adapter was trained for another base or rank"
                    )
                with torch.no_grad():
                    param.copy_(tensors[key])


def _load_decider(model, state: dict[str, torch.Tensor], file: Path) -> None:
    state = {k: v for k, v in state.items() if k != "threshold"}
    try:
        model.decider.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{file} does not match the decider the config describes: {err}") from err


def _upstream_config(root: Path, raw: dict) -> tuple[TaHConfig, dict | None]:
    """Map the original implementation's tah_config.json + iter_decider.bin onto TaHConfig."""
    adapter = raw.get("adapter_kwargs", {})
    targets = adapter.get("target_modules", "all-linear")
    peft_cfg = root / "lora" / "adapter_config.json"
    if peft_cfg.exists():
        targets = _read_json(peft_cfg).get("target_modules", targets)
    values = {
        "max_iter": raw.get("max_iter", 2),
        "input_topk": raw.get("input_updater_kwargs", {}).get("topk") or 100,
        "lora_rank": adapter.get("r", 16), "lora_alpha": float(adapter.get("lora_alpha", 32)),
        "lora_dropout": float(adapter.get("lora_dropout", 0.0)),
        "lora_target_modules": [targets] if isinstance(targets, str) else list(targets),
        "lora_per_depth": False,  # the original code shares one adapter across depths
    }
    kind = raw.get("iter_decider")
    state = None
    if kind == "MLPIterDecider":
        file = root / "iter_decider.bin"
        _require(file, "the MLP decider's weights")
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
            state, args = saved["state_dict"], saved["init_args"]
        except Exception as err:  # a pickle can fail in many ways; all mean the same to the user
            raise CheckpointError(f"{file} is not a readable decider checkpoint ({err}); re-copy it") from err
        threshold = state.get("threshold", args.get("threshold", 0.9))
        values.update(
            decider="mlp", decider_layers=list(args["hidden_states_layer_nums"]),
            decider_hidden_dims=list(args["hidden_dims"]), decider_topk=args["topk"],
            decider_expansion=args.get("expansion_factor", 4), decider_dropout=args.get("dropout_rate", 0.0),
            threshold=float(threshold),
        )
    elif kind == "IterLabelDecider":
        values["decider"] = "oracle"
    elif kind == "TrivialIterDecider":
        values["decider"] = "never"
    else:
        raise CheckpointError(f"{root / 'tah_config.json'}: iter_decider {kind!r} is not supported; "
                              "supported: MLPIterDecider, IterLabelDecider, TrivialIterDecider")
    return TaHConfig(**values), state


def _require(file: Path, what: str) -> None:
    if not file.exists():
        raise CheckpointError(f"{file} is missing: it should hold {what}")


def _read_json(file: Path) -> dict:
    _require(file, "the checkpoint's settings")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); the checkpoint is corrupt") from err


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    _require(file, "weights")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({err}); the checkpoint is corrupt") from err
