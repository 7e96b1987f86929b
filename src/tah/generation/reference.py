"""The plain decoding loop: one TaH forward per new token, greedy or sampled.

It is the reference the fast engine is tested against, and what the demo uses until then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tah.errors import InputError


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, prompt + new) token ids, left-padded prompts kept as given
    iter_counts: torch.Tensor  # (B, new) passes per generated token; 0 after a row finished
    prompt_iter_counts: torch.Tensor | None = None  # (B, prompt) passes per prompt token
    stats: object | None = None  # DecodeStats of the engine (forwards, drafts, time)


@torch.no_grad()
def generate_reference(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       max_new_tokens: int, eos_token_id: int | None = None,
                       generator: torch.Generator | None = None, temperature: float = 0.0) -> GenerationOutput:
    """Decode up to `max_new_tokens` for a left-padded batch; temperature 0 is greedy."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    batch = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    out = model(input_ids, attention_mask=mask, use_cache=True)
    cache, prompt_counts = out.cache, out.iter_count
    # The passes a generated token "got" are those of the position that predicted it.
    logits, predictor_count = out.logits[:, -1], out.iter_count[:, -1]
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens, counts = [], []
    for step in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, -1)
            next_token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            next_token = logits.argmax(-1)
        if eos_token_id is not None:
            next_token = torch.where(done, torch.full_like(next_token, eos_token_id), next_token)
        tokens.append(next_token)
        counts.append(torch.where(done, 0, predictor_count))
        if eos_token_id is not None:
            done = done | (next_token == eos_token_id)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        out = model(next_token[:, None], attention_mask=mask, past_key_values=cache, use_cache=True)
        logits, predictor_count = out.logits[:, -1], out.iter_count[:, -1]
    return GenerationOutput(torch.cat([input_ids, torch.stack(tokens, 1)], 1), torch.stack(counts, 1), prompt_counts)
