"""The work of `tah generate` once its arguments are checked (`tah.cli`): load, encode, warn, stream.

Output, on stdout: the streamed text (coloured by passes with --show-depth), then with --show-depth
where colours cannot show (output piped, NO_COLOR, TERM=dumb) a plain-text form of the passes, then
a dim summary line. Warnings and hints (characters the tokenizer drops, an untrained decider) go
to stderr as `tah: warning: ...`, so a pipe keeps only the text.
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console

PLAIN_LEGEND = "depth (plain text): a token in n-1 pairs of brackets made n passes: x = 1, [x] = 2, [[x]] = 3"


def run_generate(args: argparse.Namespace) -> None:
    from transformers.utils import logging as hf_logging

    from tah.generation.generate import generate
    from tah.generation.render import legend
    from tah.generation.stream import DepthStreamer
    from tah.model.checkpoint import load_tokenizer
    from tah.model.tah_model import TaHForCausalLM

    hf_logging.disable_progress_bar()  # a bar for loading weights of a local checkpoint is noise here
    console = Console(highlight=False)
    overrides = {} if args.threshold is None else {"threshold": args.threshold}
    model = TaHForCausalLM.from_pretrained(args.model, **overrides).eval()
    tokenizer = load_tokenizer(args.model)
    lost = unknown_characters(tokenizer, args.prompt)
    if lost:
        warn(f"the tokenizer of {args.model} has no token for {', '.join(map(repr, lost))} in the prompt: the "
             "model never sees them, so expect a poor answer; rephrase without them")
    ids = prompt_ids(tokenizer, args.prompt, args.chat)
    plain = args.show_depth and not has_colour(console)
    if args.show_depth and not plain:
        console.print(legend(model.tah_config.max_iter))
    streamer = DepthStreamer(tokenizer, console, show_depth=args.show_depth and not plain)
    started = time.perf_counter()
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                   eos_token_id=tokenizer.eos_token_id, seed=args.seed, streamer=streamer, fused=not args.no_fused,
                   draft_candidates=args.draft_candidates)
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
    config = model.tah_config
    if config.training_stage == 1 and config.decider == "mlp" and config.max_iter > 1:
        warn(f"{args.model} is a stage-1 checkpoint: its decider is untrained (stage 1 trains base + LoRA with "
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
