"""Layer pruning: drop the decoder layers whose removal raises held-out loss least.

"TaH" (not "TaH+") removes one layer of the base model before stage 1, so that LoRA + decider keep
the parameter count of the baseline. The cost of a layer is the rise of the calibration loss (mean
next-token cross-entropy over the labelled tokens) when that layer alone is removed.

Choosing k layers is greedy: measure every remaining layer, drop the cheapest, re-measure the rest
on the pruned model, repeat. Removals interact (two individually cheap layers can be expensive
together), and re-measuring sees that; for k = 1 it is the plain one-shot ranking.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tah.errors import ConfigError, InputError

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels: (B, T) LongTensors
REPORT = "prune_report.json"
# Config lists with one entry per decoder layer (HF 5.x): they lose the removed layers' entries.
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")
# Config lists of layer indices: removed layers drop out, the others are renumbered.
LAYER_INDEX_LISTS = ("mlp_only_layers",)


# -- measuring -------------------------------------------------------------------------------------
@torch.no_grad()
def calibration_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean next-token cross-entropy (nats) over every label != -100 of `batches` (labels unshifted,
    as HF takes them). Position ids follow the attention mask, so any padding side gives the same
    loss; a label right after padding counts for nothing. Raises InputError when no batch holds a
    labelled token."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in batches:
        ids = batch["input_ids"].to(device)
        mask, targets = _mask_and_targets(batch)
        mask, targets = mask.to(device), targets.to(device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                       ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    if count == 0:
        raise InputError("the calibration batches hold no labelled token (every label is -100); "
                         "give data with assistant responses")
    return total / count


def _mask_and_targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention mask (B, T) and next-token targets (B, T - 1) of a batch. A label right after
    padding (left padding) would be predicted from a padding position: it is nobody's target."""
    mask = batch.get("attention_mask")
    mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
    return mask, batch["labels"][:, 1:].masked_fill(mask[:, :-1] == 0, -100)


def layer_importance(model: nn.Module, batches: Sequence[Batch], progress: bool = False) -> list[float]:
    """Loss increase per decoder layer: calibration loss with that layer alone removed minus the full
    model's (list indexed by layer; may be negative). `model` is an HF causal LM; it is left as it was."""
    base = calibration_loss(model, batches)
    increases = []
    for layer in tqdm(range(num_layers(model)), desc="layers", disable=not progress, leave=False):
        with layers_removed(model, [layer]):
            increases.append(calibration_loss(model, batches) - base)
    return increases


# -- removing --------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of an HF causal LM (`model.model.layers` for Llama/Qwen)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise InputError(f"{type(model).__name__} has no decoder `layers` ModuleList; prune supports "
                         "decoder-only HF causal LMs such as Llama and Qwen")
    return layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def prune_layers(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """Remove decoder `layers` (indices into the current layers) from HF causal LM `model`, in place,
    and return it. Updates what HF 5.x reads per layer: `num_hidden_layers`, per-layer config lists
    (`layer_types`, ...), layer-index lists (`mlp_only_layers`) and every submodule's `layer_idx`
    (the KV cache slot), so `save_pretrained` + `AutoModelForCausalLM.from_pretrained` round-trip.
    Raises InputError for an index out of range, a repeated index, or removing every layer."""
    current = decoder_layers(model)
    n = len(current)
    drop = sorted({int(i) for i in layers})
    if len(drop) != len(layers) or any(not 0 <= i < n for i in drop):
        raise InputError(f"layers to remove must be distinct indices in [0, {n - 1}]; got {list(layers)}")
    if len(drop) >= n:
        raise InputError(f"cannot remove all {n} decoder layers; remove at most {n - 1}")
    kept = [i for i in range(n) if i not in drop]
    new_index = {old: new for new, old in enumerate(kept)}
    config = _text_config(model)
    for name in PER_LAYER_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, list | tuple) and len(values) == n:
            setattr(config, name, [values[i] for i in kept])
    for name in LAYER_INDEX_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, list | tuple):
            setattr(config, name, [new_index[i] for i in values if i in new_index])
    config.num_hidden_layers = len(kept)
    for new, old in enumerate(kept):
        for module in current[old].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    _set_layers(model, nn.ModuleList(current[i] for i in kept))
    return model


def _set_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    decoder.layers = layers


@contextmanager
def layers_removed(model: nn.Module, layers: Sequence[int]) -> Iterator[nn.Module]:
    """`prune_layers` for the duration of the block; the model, its config and every `layer_idx`
    are restored afterwards (also on error)."""
    original = decoder_layers(model)
    config = _text_config(model)
    saved = {name: getattr(config, name) for name in ("num_hidden_layers", *PER_LAYER_LISTS, *LAYER_INDEX_LISTS)
             if hasattr(config, name)}
    indices = [(m, m.layer_idx) for m in original.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    try:
        yield prune_layers(model, layers)
    finally:
        _set_layers(model, original)
        for name, value in saved.items():
            setattr(config, name, value)
        for module, index in indices:
            module.layer_idx = index


# -- choosing k layers -----------------------------------------------------------------------------
@dataclass
class PruneReport:
    """Losses in nats per labelled token. `layer_increase[i]`: loss rise when original layer i alone
    is removed from the full model. `removed`: original indices, in the order greedy removed them.
    `rounds[r]`: {original layer index: increase over the previous round's loss} for every layer
    still present in round r."""

    base_loss: float
    layer_increase: list[float]
    removed: list[int]
    final_loss: float
    rounds: list[dict[int, float]] = field(default_factory=list)
    num_layers: int = 0
    calibration_tokens: int = 0

    def to_json(self) -> str:
        values = asdict(self)
        values["rounds"] = [{str(k): v for k, v in r.items()} for r in self.rounds]
        return json.dumps(values, indent=2)


def choose_layers(model: nn.Module, batches: Sequence[Batch], k: int, progress: bool = False) -> PruneReport:
    """Greedily pick `k` layers (see the module docstring); `model` is left unpruned."""
    n = num_layers(model)
    check_k(k, n)
    base = calibration_loss(model, batches)
    removed: list[int] = []
    rounds: list[dict[int, float]] = []
    loss = base
    bar = tqdm(total=sum(n - r for r in range(k)), desc="pruning", disable=not progress)
    for _ in range(k):
        remaining = [i for i in range(n) if i not in removed]
        increases = {}
        for i in remaining:
            with layers_removed(model, sorted([*removed, i])):
                increases[i] = calibration_loss(model, batches) - loss
            bar.update()
        cheapest = min(increases, key=increases.get)
        rounds.append(increases)
        removed.append(cheapest)
        loss += increases[cheapest]
    bar.close()
    first = rounds[0]
    tokens = sum(int((_mask_and_targets(b)[1] != -100).sum()) for b in batches)
    return PruneReport(base_loss=base, layer_increase=[first[i] for i in range(n)], removed=removed,
                       final_loss=loss, rounds=rounds, num_layers=n, calibration_tokens=tokens)


def check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ConfigError(f"--layers (number of layers to remove) must be an integer in [1, {n - 1}] for a "
                          f"model with {n} decoder layers; got {k!r}")


# -- the command -----------------------------------------------------------------------------------
def calibration_batches(data: str | os.PathLike, tokenizer, max_length: int, batch_size: int,
                        max_rows: int | None, pad_token_id: int) -> list[Batch]:
    """The JSONL at `data` (chat `messages` or `prompt` + `response` rows) as padded batches, rows
    sorted by length so little compute goes to padding (the loss does not depend on the batching)."""
    from tah.data import TaHCollator, build_dataset

    path = Path(data)
    if not path.is_file():
        raise InputError(f"calibration data {path} does not exist; give a JSONL file with chat `messages` "
                         "or `prompt` + `response` rows")
    dataset = build_dataset(path, tokenizer, max_length, strict=False)
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    if len(dataset) == 0:
        raise InputError(f"calibration data {path} yields no usable rows")
    rows = sorted(dataset, key=lambda row: len(row["input_ids"]))
    collate = TaHCollator(pad_token_id)
    return [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def prune(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, layers: int = 1,
          max_length: int = 1024, batch_size: int = 4, max_rows: int | None = None,
          progress: bool = True) -> PruneReport:
    """Greedily remove the decoder layers (--layers, default 1) whose removal raises the calibration
    loss (next-token cross-entropy on the assistant tokens) least, re-measuring after each removal.
    Writes the pruned model (loadable by AutoModelForCausalLM), the tokenizer and prune_report.json
    (each layer's loss increase) to OUT.

    Args:
        model_dir: the Hugging Face model directory, with its tokenizer files.
        data: calibration rows (chat `messages`, or `prompt` + `response`); `max_rows`: only the first.
        out: staged in a temporary sibling, then renamed into place (an existing `out` is replaced).
        layers, max_length, batch_size: how many layers go; tokens per row; rows per forward.
    Returns:
        The report written to OUT/prune_report.json.
    Raises:
        InputError: no model at `model_dir`, or no usable calibration rows.
        ConfigError: a setting out of range (too many layers, a batch size below 1 ...).
    """
    model, tokenizer, batches = load_for_pruning(model_dir, data, max_length, batch_size, max_rows)
    check_k(layers, num_layers(model))
    report = choose_layers(model, batches, layers, progress=progress)
    prune_layers(model, report.removed)
    save_pruned(model, tokenizer, report.to_json(), out)
    return report


def load_for_pruning(model_dir: str | os.PathLike, data: str | os.PathLike, max_length: int, batch_size: int,
                     max_rows: int | None) -> tuple[nn.Module, object, list[Batch]]:
    """The HF causal LM at `model_dir` (eval mode), its tokenizer and the calibration batches of `data`,
    after checking the settings (ConfigError) and the paths (InputError)."""
    from transformers import AutoModelForCausalLM

    from tah.model.checkpoint import load_tokenizer

    source = Path(model_dir)
    if not (source / "config.json").is_file():
        raise InputError(f"model directory {source} does not exist or has no config.json; give a directory "
                         "written by save_pretrained")
    for name, value, low in (("--max-length", max_length, 2), ("--batch-size", batch_size, 1),
                             ("--max-rows", max_rows, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}; got {value}")
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True).eval()
    tokenizer = load_tokenizer(source)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, tokenizer, calibration_batches(data, tokenizer, max_length, batch_size, max_rows, pad or 0)


def save_pruned(model: nn.Module, tokenizer, report_json: str, out: str | os.PathLike) -> None:
    """The model, its tokenizer and REPORT into `out`: staged in a temporary sibling, then renamed into
    place (an existing `out` is replaced; a failure leaves it as it was)."""
    from tah.model.checkpoint import _swap_in

    final = Path(out)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.saving-", dir=final.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / REPORT).write_text(report_json + "\n")
        _swap_in(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def print_report(report: PruneReport, out: str | os.PathLike) -> None:
    """What `tah prune` prints on stdout: the table of `report_table`, then what was removed and where
    it went."""
    from rich.console import Console

    console = Console(highlight=False)
    console.print(report_table(report))
    console.print(f"removed layers {report.removed}; wrote {out} (report: {REPORT})")


def report_table(report: PruneReport):
    """A rich Table: each layer's loss increase, the removed ones marked."""
    from rich.table import Table

    table = Table(title=f"layer pruning: base loss {report.base_loss:.4f}, final loss {report.final_loss:.4f} "
                        f"({report.calibration_tokens} calibration tokens)")
    table.add_column("layer", justify="right")
    table.add_column("loss increase (alone)", justify="right")
    table.add_column("removed", justify="center")
    for layer, increase in enumerate(report.layer_increase):
        order = report.removed.index(layer) + 1 if layer in report.removed else None
        table.add_row(str(layer), f"{increase:+.5f}", f"#{order}" if order else "",
                      style="bold" if order else None)
    return table
