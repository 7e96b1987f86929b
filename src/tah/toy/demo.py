"""`tah demo`: build a tiny random Qwen3, wrap it with TaH, run a forward and a short generation,
and print the text coloured by how many passes each token got.

Nothing is downloaded. The model is untrained, so the text is noise; what the demo shows is the
machinery: which tokens the decider sent deeper, and that depth-0 equals the bare model.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from transformers import Qwen3Config, Qwen3ForCausalLM

from tah.config import TaHConfig
from tah.generation.reference import generate_reference
from tah.generation.render import depth_text, legend
from tah.model.tah_model import TaHForCausalLM

CHARS = [chr(c) for c in range(32, 127)]  # a character vocabulary: token id i <-> CHARS[i]


def encode(text: str) -> list[int]:
    return [CHARS.index(c) if c in CHARS else 0 for c in text]


def tiny_qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(CHARS), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return Qwen3ForCausalLM(config).eval()


def run_demo(seed: int = 0, max_new_tokens: int = 48, console: Console | None = None) -> dict:
    """Run the quick demo; returns the figures it printed."""
    console = console or Console()
    config = TaHConfig(max_iter=3, input_topk=16, lora_rank=4, lora_alpha=8.0, decider="random", random_rate=0.15,
                       seed=seed)
    started = time.perf_counter()
    bare = tiny_qwen3(seed)
    model = TaHForCausalLM.from_base(tiny_qwen3(seed), config).eval()
    with torch.no_grad():  # LoRA B starts at zero; give it values so deeper passes differ visibly
        for module in model.lora.values():
            for b in module.lora_B:
                b.normal_(0, 0.05)
    prompt = "Think harder only where it matters: 12 + 30 = "
    ids = torch.tensor([encode(prompt)])
    with torch.no_grad():
        out = model(ids)
        base_logits = bare(ids).logits
    # An untrained model's greedy text is one repeated character; sampling shows more variety.
    generated = generate_reference(model, ids, max_new_tokens=max_new_tokens, temperature=1.0,
                                   generator=torch.Generator().manual_seed(seed))
    elapsed = time.perf_counter() - started

    new_ids = generated.sequences[0, ids.shape[1]:].tolist()
    prompt_passes = out.iter_count[0].tolist()
    console.rule("[bold]tah demo[/bold]: Think-at-Hard on a tiny random Qwen3")
    console.print(f"base: Qwen3, {sum(p.numel() for p in bare.parameters()):,} parameters; "
                  f"TaH: max_iter={config.max_iter}, LoRA r={config.lora_rank} on {len(model.lora)} linears, "
                  f"decider=random({config.random_rate})")
    console.print(legend(config.max_iter))
    console.print("prompt:    ", depth_text(list(prompt), prompt_passes))
    console.print("generated: ", depth_text([CHARS[i] for i in new_ids], generated.iter_counts[0].tolist()))
    iterated = (generated.iter_counts[0] > 1).float().mean().item()
    depth0 = (out.logits[out.iter_count == 1] - base_logits[out.iter_count == 1]).abs().max().item()
    console.print(f"{len(new_ids)} tokens in {elapsed:.2f}s; {iterated:.0%} of generated tokens iterated; "
                  f"tokens with one pass match the bare model to {depth0:.1e}")
    return {"iterated_share": iterated, "depth0_max_diff": depth0, "new_tokens": len(new_ids)}
