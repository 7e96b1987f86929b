"""`tah <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys

from tah.errors import TaHError


def _demo(args: argparse.Namespace) -> None:
    from tah.toy.demo import run_demo

    run_demo(seed=args.seed, max_new_tokens=args.max_new_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tah", description="Think-at-Hard: iterate only on the hard tokens.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the end-to-end demo on a built-in tiny model")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.set_defaults(run=_demo)
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
