"""`tah prune --mlp-keep`: MLP width pruning keeps the neurons that write into the residual stream, and
the narrowed model saves and reloads as a plain HF model."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import left_padded, tiny_lm
from tah.cli import main
from tah.errors import InputError
from tah.train.prune_width import neuron_importance, prune_mlp_width

SILENT = 16  # neurons per layer whose down_proj column is zero: they write nothing


def model_with_silent_neurons(arch: str = "qwen3") -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """Tiny random LM (intermediate 64) whose MLPs each have SILENT neurons that write nothing; and,
    per layer, the indices of the others."""
    model = tiny_lm(arch, seed=2, layers=3)
    gen = torch.Generator().manual_seed(0)
    active = []
    with torch.no_grad():
        for layer in model.model.layers:
            order = torch.randperm(layer.mlp.down_proj.in_features, generator=gen)
            layer.mlp.down_proj.weight[:, order[:SILENT]] = 0
            active.append(order[SILENT:].sort().values)
    return model, active


def batches() -> list[dict[str, torch.Tensor]]:
    ids, mask = left_padded([12, 7, 10], seed=4)
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_the_silent_neurons_go_and_the_logits_stay(arch, tmp_path):
    full, active = model_with_silent_neurons(arch)
    importance = neuron_importance(full, batches())
    keep = 64 - SILENT
    kept = [scores.topk(keep).indices.sort().values for scores in importance]
    assert all(torch.equal(k, a) for k, a in zip(kept, active, strict=True))  # the zero columns score 0
    narrow = prune_mlp_width(copy.deepcopy(full), kept)
    assert narrow.config.intermediate_size == keep
    hidden, layers = full.config.hidden_size, full.config.num_hidden_layers
    assert (sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in narrow.parameters())
            == layers * 3 * hidden * SILENT)
    narrow.save_pretrained(tmp_path / "narrow")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow").eval()
    ids, mask = left_padded([9, 11], seed=5)
    with torch.no_grad():
        want = full(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_importance_ranks_a_neuron_by_what_it_writes():
    model, _ = model_with_silent_neurons()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 40] *= 1000  # writes far more than any other
    assert int(neuron_importance(model, batches())[0].argmax()) == 40


def test_index_sets_of_unequal_size_are_refused():
    model, active = model_with_silent_neurons()
    with pytest.raises(InputError, match="all of one size"):
        prune_mlp_width(model, [active[0], active[1], active[2][:-1]])


@pytest.mark.parametrize("extra, message", [(["--mlp-keep", "8", "--layers", "1"], "not both"),
                                            (["--mlp-keep", "64"], r"--mlp-keep .* \[1, 63\]"),
                                            (["--mlp-keep", "0"], r"--mlp-keep .* \[1, 63\]")])
def test_the_command_refuses_both_kinds_and_a_keep_out_of_range(extra, message, tmp_path, capsys):
    model, _ = model_with_silent_neurons()
    model.save_pretrained(tmp_path / "model")
    args = ["prune", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "none.jsonl"),
            "--out", str(tmp_path / "out")]
    assert main([*args, *extra]) != 0
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
