"""MLP width pruning: keep the same number of MLP neurons in every decoder layer, the most important.

"TaH" gives up parameters so that LoRA + decider keep the count of the baseline. The paper removes
one of 28 layers, a small share of the depth; in a model of a few layers one layer is a large share
(the demo's: a quarter, experiments/toy-depth round 9), and width pruning (as in Minitron, Muralidharan
et al. 2024) removes the parameters while every layer keeps its place.

A neuron's importance (layer l, neuron j) is the mean over calibration tokens of |a_j|, its activation
(the input of down_proj: act(gate_proj x) * up_proj x), times the norm of its column of down_proj: how
much it writes into the residual stream. Each layer keeps its `keep` most important neurons, in their
original order, so `intermediate_size` stays one number and the model saves and loads as any HF model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tah.errors import ConfigError, InputError
from tah.train.prune import (
    Batch,
    _mask_and_targets,
    _text_config,
    calibration_loss,
    decoder_layers,
    load_for_pruning,
    save_pruned,
)

MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")  # Llama / Qwen / Mistral gated MLPs


@dataclass
class WidthReport:
    """Losses in nats per labelled token before and after; `kept_importance` / `dropped_importance`:
    per layer, the summed importance of the neurons kept / removed."""

    base_loss: float
    final_loss: float
    intermediate_size: int
    keep: int
    kept_importance: list[float]
    dropped_importance: list[float]
    calibration_tokens: int

    def to_json(self) -> str:
        return json.dumps({"kind": "mlp_width", **asdict(self)}, indent=2)


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's MLP; InputError unless every one has gate_proj, up_proj and down_proj."""
    mlps = [getattr(layer, "mlp", None) for layer in decoder_layers(model)]
    if not all(mlp is not None and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP_LINEARS)
               for mlp in mlps):
        raise InputError(f"{type(model).__name__}: width pruning needs a gated MLP (gate_proj, up_proj, down_proj "
                         "linears) in every decoder layer, as Llama and Qwen have")
    return mlps


@torch.no_grad()
def neuron_importance(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """Per decoder layer, (intermediate_size,) float32: mean |activation| over the real tokens of
    `batches` (attention mask 1) times the norm of the neuron's down_proj column."""
    mlps = gated_mlps(model)
    sums = [torch.zeros(mlp.down_proj.in_features) for mlp in mlps]
    current: dict[str, torch.Tensor] = {}
    tokens = 0

    def recorder(index: int):
        def hook(module, inputs, output):
            sums[index] += (inputs[0].abs().float() * current["mask"]).sum((0, 1)).cpu()
        return hook

    hooks = [mlp.down_proj.register_forward_hook(recorder(i)) for i, mlp in enumerate(mlps)]
    device = next(model.parameters()).device
    try:
        for batch in batches:
            mask = _mask_and_targets(batch)[0].to(device)
            current["mask"] = mask[..., None].float()
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask, position_ids=positions,
                  use_cache=False)
            tokens += int(mask.sum())
    finally:
        for hook in hooks:
            hook.remove()
    norms = [mlp.down_proj.weight.float().norm(dim=0).cpu() for mlp in mlps]
    return [total / max(tokens, 1) * norm for total, norm in zip(sums, norms, strict=True)]


def prune_mlp_width(model: nn.Module, kept: Sequence[torch.Tensor]) -> nn.Module:
    """Keep, in decoder layer l, the MLP neurons `kept[l]` (a LongTensor of indices; every layer the same
    count), in place; the config's intermediate_size follows. Returns `model`."""
    mlps = gated_mlps(model)
    sizes = {len(k) for k in kept}
    if len(kept) != len(mlps) or len(sizes) != 1:
        raise InputError(f"give one index set per decoder layer ({len(mlps)}), all of one size; got sizes "
                         f"{[len(k) for k in kept]}")
    for mlp, indices in zip(mlps, kept, strict=True):
        indices = indices.sort().values.to(mlp.down_proj.weight.device)
        for name in ("gate_proj", "up_proj"):
            setattr(mlp, name, _narrowed(getattr(mlp, name), indices, dim=0))
        mlp.down_proj = _narrowed(mlp.down_proj, indices, dim=1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(indices)
    _text_config(model).intermediate_size = sizes.pop()
    return model


def _narrowed(linear: nn.Linear, indices: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of `linear` keeping only `indices` of its outputs (dim 0: rows, and the bias's entries)
    or of its inputs (dim 1: columns; the bias stays whole)."""
    weight = linear.weight.index_select(dim, indices)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias[indices] if dim == 0 else linear.bias)
    return new


def prune_width(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, keep: int,
                max_length: int = 1024, batch_size: int = 4, max_rows: int | None = None) -> WidthReport:
    """Keep the `keep` most important MLP neurons of every decoder layer (see the module docstring),
    measured on the calibration rows of `data`. Writes the pruned model (loadable by
    AutoModelForCausalLM), the tokenizer and prune_report.json to OUT, staged then renamed into place.

    Raises:
        InputError: no model at `model_dir`, no gated MLP, or no usable calibration rows.
        ConfigError: `keep` not in [1, intermediate_size - 1], or another setting out of range.
    """
    _check_keep(model_dir, keep)
    model, tokenizer, batches = load_for_pruning(model_dir, data, max_length, batch_size, max_rows)
    base = calibration_loss(model, batches)
    importance = neuron_importance(model, batches)
    kept = [scores.topk(keep).indices for scores in importance]
    kept_sum = [float(scores[k].sum()) for scores, k in zip(importance, kept, strict=True)]
    dropped_sum = [float(scores.sum()) - total for scores, total in zip(importance, kept_sum, strict=True)]
    prune_mlp_width(model, kept)
    tokens = sum(int((_mask_and_targets(b)[1] != -100).sum()) for b in batches)
    report = WidthReport(base_loss=base, final_loss=calibration_loss(model, batches), intermediate_size=len(importance[0]),
                         keep=keep, kept_importance=kept_sum, dropped_importance=dropped_sum, calibration_tokens=tokens)
    save_pruned(model, tokenizer, report.to_json(), out)
    return report


def _check_keep(model_dir: str | os.PathLike, keep: int) -> None:
    """ConfigError unless `keep` is in [1, intermediate_size - 1] (read from model_dir/config.json, before
    anything loads; a missing directory is load_for_pruning's to report)."""
    from transformers import AutoConfig

    if not (Path(model_dir) / "config.json").is_file():
        return
    size = getattr(AutoConfig.from_pretrained(model_dir, local_files_only=True).get_text_config(),
                   "intermediate_size", None)
    if not isinstance(size, int):
        raise InputError(f"{model_dir}: its config has no intermediate_size (one MLP width); width pruning needs one")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep < size:
        raise ConfigError(f"--mlp-keep (MLP neurons kept per layer) must be an integer in [1, {size - 1}] for a "
                          f"model with intermediate_size {size}; got {keep!r}")


def print_width_report(report: WidthReport, out: str | os.PathLike) -> None:
    """What `tah prune --mlp-keep` prints: the losses and where the model went."""
    print(f"MLP width pruning: kept {report.keep} of {report.intermediate_size} neurons per layer; calibration loss "
          f"{report.base_loss:.4f} -> {report.final_loss:.4f} ({report.calibration_tokens} tokens); wrote {out}")
