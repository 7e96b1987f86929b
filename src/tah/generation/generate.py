"""`tah.generate`: the public decoding call (checks its arguments, then runs the Decoder)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

import tah.generation.static as static
from tah.errors import InputError
from tah.generation.engine import Decoder
from tah.generation.reference import GenerationOutput
from tah.generation.sampling import Sampler
from tah.generation.static import StaticDecoder
from tah.model.decider import OracleDecider

ENGINES = ("auto", "eager", "static")
MAX_DRAFT_CANDIDATES = 4  # greedy: the top few of a hard token's depth-0 logits, drafted side by side


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             min_p: float = 0.0, eos_token_id: int | Sequence[int] | None = None,
             stop_strings: str | Sequence[str] | None = None, tokenizer=None, seed: int | None = None,
             streamer=None, fused: bool = True, draft_candidates: int | None = None,
             cache_capacity: int | None = None, engine: str = "auto") -> GenerationOutput:
    """Decode a batch of left-padded prompts with a TaHForCausalLM.

    input_ids (B, T) and attention_mask (B, T) (1 = real token; padding on the left). Returns
    `sequences` (B, T + new) and `iter_counts` (B, new): passes per generated token (those of the
    position that predicted it), 0 after a row finished. A row stops at EOS, a stop string or
    max_new_tokens; the others go on. `fused=False` turns off fused latent iteration (same tokens
    when greedy, same distribution when sampling). `draft_candidates=k` > 1 (greedy, up to
    MAX_DRAFT_CANDIDATES) drafts the depth-0 runner-ups beside the top token, so a deeper pass that
    picks one costs no extra forward; the tokens are the same either way. The default (None) is 2 for
    greedy decoding of one prompt, where the extra queries are cheap (3 queries a step: on an Intel
    with AVX-512, MKL ran 4-row products twice as long as 3-row ones; on an AMD, which favours even
    row counts, 3 rows go padded to 4 and a third candidate gained 0.5%), else 1: on CPU
    at batch 8 a third query a row made steps slower than the rollbacks it saved (see
    benchmarks/RESULTS.md); on a GPU, where products are weight-bound at any batch, try 2. Sampling
    takes one draft (its acceptance rule is for one).

    engine: "eager" is the engine above (any settings; tuned for CPUs); "static" decodes with static
    shapes, every decision on the device and each step replayed from a CUDA graph on a GPU
    (`tah.generation.static`: max_iter <= 2, one draft; greedy: the same tokens, sampling: the same
    distribution, with other draws); "auto" (the default)
    takes "static" on CUDA where it applies, else "eager". Raises `InputError` on bad arguments.
    """
    input_ids, attention_mask = _check_prompt(model, input_ids, attention_mask, max_new_tokens)
    sampler = Sampler(do_sample, temperature, top_k, top_p, min_p, _generator(seed, input_ids.device))
    use_static = _use_static(model, engine, fused, draft_candidates, input_ids.device)
    if draft_candidates is None:
        draft_candidates = 2 if sampler.greedy and input_ids.shape[0] == 1 else 1
    if draft_candidates not in range(1, MAX_DRAFT_CANDIDATES + 1) or draft_candidates > 1 and not sampler.greedy:
        raise InputError(f"draft_candidates must be 1, or up to {MAX_DRAFT_CANDIDATES} with greedy decoding "
                         f"(sampling's acceptance rule takes one draft); got {draft_candidates!r}")
    if isinstance(model.decider, OracleDecider):
        raise InputError("decider 'oracle' needs the true next tokens, so it cannot generate; "
                         "load the model with decider='mlp', 'random', 'always' or 'never'")
    eos_ids = _eos_set(eos_token_id)
    stop = _stop_checker(stop_strings, tokenizer)
    if streamer is not None:
        if input_ids.shape[0] != 1:
            raise InputError("a streamer can follow one prompt only; pass a batch of 1 or no streamer")
        streamer.put(input_ids.cpu())
    was_training = model.training
    if use_static:
        decoder = StaticDecoder(model, sampler, max_new_tokens=max_new_tokens, eos_ids=eos_ids, stop=stop,
                                streamer=streamer)
        model.eval()
        try:
            return decoder.run(input_ids, attention_mask)
        finally:
            model.train(was_training)
    capacity = cache_capacity or input_ids.shape[1] + max_new_tokens + 16  # depth-0 slots; deeper ones apart
    decoder = Decoder(model, sampler, max_new_tokens=max_new_tokens, eos_ids=eos_ids, fused=fused,
                      candidates=draft_candidates, stop=stop, streamer=streamer)
    model.eval()
    try:
        return decoder.run(input_ids, attention_mask, capacity)
    finally:
        model.train(was_training)


def _use_static(model, engine: str, fused: bool, draft_candidates: int | None, device: torch.device) -> bool:
    """Does this call decode on the static engine (see `generate`'s `engine`)?"""
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if engine == "eager":
        return False
    reason = static.supports(model, fused)
    if reason is None and draft_candidates not in (None, 1):
        reason = "several draft candidates run on the eager engine"
    if engine == "static" and reason is not None:
        raise InputError(f"engine='static' cannot decode these settings ({reason}); use engine='eager' or 'auto'")
    return engine == "static" or device.type == "cuda" and reason is None


def _check_prompt(model, input_ids, attention_mask, max_new_tokens):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise InputError("input_ids must be a (batch, length) tensor of token ids")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; "
                         f"got {tuple(attention_mask.shape)}")
    lengths = attention_mask.long().sum(1)
    if input_ids.numel() == 0 or bool((lengths == 0).any()):
        raise InputError("the prompt is empty: every row needs at least one token (e.g. a BOS token)")
    if not bool(attention_mask[:, -1].all()):
        raise InputError("prompts must be left-padded for generation (the last column all real tokens); "
                         "set tokenizer.padding_side = 'left'")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    limit = model.max_positions
    if limit is not None and int(lengths.max()) + max_new_tokens > limit:
        raise InputError(
            f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{limit} positions (max_position_embeddings); shorten the prompt or lower max_new_tokens"
        )
    return input_ids, attention_mask.long()


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    if isinstance(eos_token_id, Sequence) and all(isinstance(i, int) for i in eos_token_id):
        return set(eos_token_id)
    raise InputError(f"eos_token_id must be an int or a list of ints; got {eos_token_id!r}")


def _stop_checker(stop_strings, tokenizer):
    """A function tokens -> bool that says whether the text now contains a stop string."""
    if stop_strings is None:
        return None
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if not isinstance(stop_strings, list | tuple) or not stop_strings or \
            not all(isinstance(s, str) and s for s in stop_strings):
        raise InputError(f"stop_strings must be a non-empty string or a list of them; got {stop_strings!r}")
    if tokenizer is None:
        raise InputError("stop_strings need a tokenizer to read the text: pass tokenizer=...")
    window = max(len(s) for s in stop_strings) + 1  # every token is at least one character

    def stopped(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens[-window:])
        return any(s in text for s in stop_strings)

    return stopped
