"""Tiny random models shared by the tests: hidden 32, 2-3 layers, float32, CPU, no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from tah import TaHConfig, TaHForCausalLM

# A copy of shared/fixtures/upstream_tiny (written by the original TaH code), kept in the repo so CI has it.
UPSTREAM = Path(__file__).resolve().parent / "fixtures" / "upstream_tiny"


def tiny_lm(arch: str = "qwen3", seed: int = 0, vocab: int = 64, hidden: int = 32, layers: int = 2,
            max_positions: int = 128) -> torch.nn.Module:
    """A random HF causal LM small enough for a test to run many forwards in a second."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                  max_position_embeddings=max_positions, tie_word_embeddings=True, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(arch)
    return model.eval()


def randomize_lora(model: TaHForCausalLM, std: float = 0.05, seed: int = 0) -> None:
    """Fresh LoRA B matrices are zero; give them values so that deeper passes really differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.lora.values():
            for b in module.lora_B:
                b.copy_(torch.randn(b.shape, generator=gen) * std)


def tiny_tah(arch: str = "qwen3", seed: int = 0, layers: int = 2, vocab: int = 64, **config) -> TaHForCausalLM:
    """A TaH model on a tiny random base; `config` overrides TaHConfig fields (small LoRA and decider)."""
    defaults = dict(max_iter=2, input_topk=8, lora_rank=4, lora_alpha=8.0, decider_hidden_dims=[16],
                    decider_topk=8, decider_expansion=2)
    defaults.update(config)
    model = TaHForCausalLM.from_base(tiny_lm(arch, seed=seed, layers=layers, vocab=vocab), TaHConfig(**defaults))
    randomize_lora(model, seed=seed)
    return model.eval()


def left_padded(lengths: list[int], vocab: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, max(lengths)) left-padded with id 0, and the matching attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        if n:
            ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
            mask[row, width - n:] = 1
    return ids, mask


@pytest.fixture(scope="session")
def upstream_dir() -> Path:
    return UPSTREAM
