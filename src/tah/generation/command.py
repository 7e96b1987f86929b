"""`run_generate`, the work of `tah generate` once its arguments are checked (`tah.cli`): load, encode,
warn, stream.

Output, on stdout: the streamed text (coloured by passes with --show-depth), then with --show-depth
where colours cannot show (output piped, NO_COLOR, TERM=dumb) a plain-text form of the passes, then
a dim summary line. Warnings and hints (characters the tokenizer drops, an untrained decider) go
to stderr as `tah: warning: ...`, so a pipe keeps only the text.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console

PLAIN_LEGEND = "depth (plain text): a token in n-1 pairs of brackets made n passes: x = 1, [x] = 2, [[x]] = 3"


def run_generate(model: str, prompt: str, *, chat: bool = False, max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None, threshold: float | None = None, fused: bool = True,
                 draft_candidates: int | None = None, show_depth: bool = False) -> None:
    """Generate text with a saved TaH model (our layout or the original's) and stream it to the
    terminal, then a summary line: tokens, tokens/s and the share of tokens that iterated. With
    --show-depth each token is coloured by its number of passes; where colours cannot show (output
    piped, NO_COLOR, TERM=dumb) the text is printed again with iterated tokens in brackets, then the
    passes per token. Warnings (characters the tokenizer drops, a stage-1 checkpoint's untrained
    decider) go to stderr, so a pipe keeps only the text.

    Args:
        model: the checkpoint directory, with its tokenizer files.
        prompt: the text to continue; with `chat`, the user's message, wrapped in the chat template.
        max_new_tokens, do_sample, temperature, top_p, top_k, min_p, seed, draft_candidates: as
            `tah.generate` takes them. threshold: the decider's (None: the checkpoint's).
        fused: ride a hard token's deeper pass in the next token's forward (same tokens).
        show_depth: colour (or bracket) each token by its passes.
    Raises:
        TaHError: a checkpoint that cannot load, or settings `tah.generate` refuses.
    """
    from transformers.utils import logging as hf_logging

    from tah.generation.generate import generate
    from tah.generation.render import legend
    from tah.generation.stream import DepthStreamer
    from tah.model.checkpoint import load_tokenizer
    from tah.model.tah_model import TaHForCausalLM

    hf_logging.disable_progress_bar()  # a bar for loading weights of a local checkpoint is noise here
    console = Console(highlight=False)
    overrides = {} if threshold is None else {"threshold": threshold}
    tah_model = TaHForCausalLM.from_pretrained(model, **overrides).eval()
    tokenizer = load_tokenizer(model)
    lost = unknown_characters(tokenizer, prompt)
    if lost:
        warn(f"the tokenizer of {model} has no token for {', '.join(map(repr, lost))} in the prompt: the "
             "model never sees them, so expect a poor answer; rephrase without them")
    ids = prompt_ids(tokenizer, prompt, chat)
    plain = show_depth and not has_colour(console)
    if show_depth and not plain:
        console.print(legend(tah_model.tah_config.max_iter))
    streamer = DepthStreamer(tokenizer, console, show_depth=show_depth and not plain)
    started = time.perf_counter()
    out = generate(tah_model, ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                   top_p=top_p, top_k=top_k, min_p=min_p, eos_token_id=tokenizer.eos_token_id, seed=seed,
                   streamer=streamer, fused=fused, draft_candidates=draft_candidates)
    seconds = time.perf_counter() - started
    counts = out.iter_counts[0]
    made = counts > 0  # 0 marks the steps after the row finished
    tokens, passes = out.sequences[0, ids.shape[1]:][made].tolist(), counts[made].tolist()
    if plain:
        console.print(PLAIN_LEGEND, markup=False, soft_wrap=True)
        console.print(marked_text([tokenizer.decode([t]) for t in tokens], passes), markup=False, soft_wrap=True)
        console.print("passes per token: " + " ".join(map(str, passes)), soft_wrap=True)
    iterated = sum(p > 1 for p in passes) / max(len(passes), 1)
    console.print(f"{len(passes)} tokens, {len(passes) / seconds:.1f} tokens/s, {iterated:.1%} of tokens iterated",
                  style="dim")
    config = tah_model.tah_config
    if config.training_stage == 1 and config.decider == "mlp" and config.max_iter > 1:
        warn(f"{model} is a stage-1 checkpoint: its decider is untrained (stage 1 trains base + LoRA with "
             f"oracle labels), so which tokens iterate ({iterated:.1%} here) means nothing yet. Train the decider "
             "with stage 2 (`tah train --config STAGE2.yaml --set model=THIS_DIR`) and generate from its final/")


def warn(message: str) -> None:
    print(f"tah: warning: {message}", file=sys.stderr)


def has_colour(console: Console) -> bool:
    """Whether `console` shows styles (False when piped without FORCE_COLOR, with NO_COLOR, TERM=dumb)."""
    return console.color_system is not None and not console.no_color


def prompt_ids(tokenizer, prompt: str, chat: bool):
    """(1, T) ids of `prompt`, wrapped in the tokenizer's chat template with the generation prompt if `chat`."""
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def unknown_characters(tokenizer, text: str) -> list[str]:
    """Characters of `text` the tokenizer cannot carry, in order of first appearance: those missing
    from its round trip (encoded, then decoded without special tokens), which drops what became
    the unknown token or was removed outright."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    return [char for char in dict.fromkeys(text) if char not in decoded and not char.isspace()]


def marked_text(pieces: list[str], passes: list[int]) -> str:
    """`pieces` joined, each wrapped in passes-1 pairs of brackets: "a", "[b]" (2 passes), "[[c]]" (3)."""
    return "".join("[" * (n - 1) + piece + "]" * (n - 1) for piece, n in zip(pieces, passes, strict=True))
