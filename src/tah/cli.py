"""`tah <command>`: the command-line entry point, a thin dispatcher. Each command parses its options and
calls one library function, whose docstring is the command's --help description (`tah._help`). The
pipeline stages register their commands next to their code (`tah.<package>.cli`); every module named
here imports the standard library only, so `tah --help` answers in tens of milliseconds."""

from __future__ import annotations

import argparse
import sys

from tah._help import CommandParser
from tah.errors import TaHError


def _demo(args: argparse.Namespace) -> None:
    from tah.toy.demo import run_demo

    run_demo(out=args.out, quick=args.quick, seeds=args.seeds, workers=args.workers)


# tah.generate's limits, checked here before a model loads (a test holds them equal to generate's).
MAX_DRAFT_CANDIDATES = 4


def _generate(args: argparse.Namespace) -> None:
    check_generate_arguments(args)
    from tah.generation.command import run_generate  # torch and transformers load from here on

    run_generate(args.model, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed,
                 threshold=args.threshold, fused=not args.no_fused, draft_candidates=args.draft_candidates,
                 show_depth=args.show_depth)


def check_generate_arguments(args: argparse.Namespace) -> None:
    """Refuse what `tah generate` would only refuse after loading the model. Raises `InputError`
    naming the option."""
    from pathlib import Path

    from tah.errors import InputError

    if not args.prompt.strip():
        raise InputError("--prompt is empty: give the text to continue (with --chat: the user's message)")
    a = args
    ranges = [("--max-new-tokens", a.max_new_tokens, a.max_new_tokens >= 1, ">= 1"),
              ("--temperature", a.temperature, a.temperature >= 0, ">= 0"),
              ("--top-p", a.top_p, 0 < a.top_p <= 1, "in (0, 1]"), ("--top-k", a.top_k, a.top_k >= 0, ">= 0"),
              ("--min-p", a.min_p, 0 <= a.min_p < 1, "in [0, 1)"),
              ("--threshold", a.threshold, a.threshold is None or 0 <= a.threshold <= 1, "in [0, 1]")]
    for option, value, holds, allowed in ranges:
        if not holds:
            raise InputError(f"{option} must be {allowed}; got {value}")
    if args.draft_candidates is not None and not 1 <= args.draft_candidates <= MAX_DRAFT_CANDIDATES:
        raise InputError(f"--draft-candidates must be 1 to {MAX_DRAFT_CANDIDATES}; got {args.draft_candidates}")
    if args.do_sample and (args.draft_candidates or 1) > 1:
        raise InputError("--draft-candidates above 1 needs greedy decoding (sampling's acceptance rule takes one "
                         "draft): drop --do-sample or --draft-candidates")
    if not Path(args.model).is_dir():
        raise InputError(f"--model {args.model} does not exist or is not a directory; give a checkpoint directory "
                         "(written by save_pretrained or tah train) with its tokenizer files")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="tah", description="Think-at-Hard: iterate only on the hard tokens.")
    commands = parser.add_subparsers(dest="command", required=True)  # each a CommandParser too
    demo = commands.add_parser("demo", help="the paper's experiment end to end on a toy task (CPU, nothing downloaded)",
                               calls="tah.toy.demo:run_demo")
    demo.add_argument("--out", default="tah-demo", help="output directory (default: tah-demo)")
    demo.add_argument("--quick", action="store_true", help="smaller task and model, one seed (2-3 minutes; checks the pipeline)")
    demo.add_argument("--seeds", type=int, default=None,
                      help="repeat with N seeds and report mean ± std (default: 3; 1 with --quick)")
    demo.add_argument("--workers", type=int, default=None,
                      help="seeds trained side by side, one CPU thread each (default: all, at most 2 per core); "
                           "the results do not depend on it")
    demo.set_defaults(run=_demo)

    gen = commands.add_parser("generate", help="generate text with a saved TaH model (our or the original layout)",
                              calls="tah.generation.command:run_generate")
    gen.add_argument("--model", required=True, help="checkpoint directory (with its tokenizer files)")
    gen.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--threshold", type=float, default=None, help="decider threshold (default: the checkpoint's)")
    gen.add_argument("--no-fused", action="store_true", help="run each latent iteration in its own forward")
    gen.add_argument("--draft-candidates", type=int, default=None, metavar="N",
                     help="drafts beside a hard token: 2 or more add the depth-0 runner-ups (greedy only; same "
                          "tokens). Default: 3 when greedy with one prompt, 1 when sampling")
    gen.add_argument("--show-depth", action="store_true",
                     help="colour each token by its number of passes; where colours cannot show (piped, NO_COLOR) "
                          "print the text with iterated tokens in brackets and the passes per token")
    gen.set_defaults(run=_generate)

    # Each pipeline stage registers its own subcommand next to its code.
    from tah.data.cli import register_label
    from tah.eval.cli import register_eval, register_grade
    from tah.serve.cli import register_serve
    from tah.train.cli import register_prune, register_train

    for register in (register_label, register_prune, register_train, register_eval, register_grade, register_serve):
        register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except TaHError as err:
        print(f"tah: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
