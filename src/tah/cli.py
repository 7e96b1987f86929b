"""`tah <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys

from tah.errors import TaHError


def _demo(args: argparse.Namespace) -> None:
    from tah.toy.demo import run_demo

    run_demo(out=args.out, quick=args.quick, seeds=args.seeds)


def _generate(args: argparse.Namespace) -> None:
    import time

    from rich.console import Console
    from transformers import AutoTokenizer

    from tah.generation.generate import generate
    from tah.generation.render import legend
    from tah.generation.stream import DepthStreamer
    from tah.model.tah_model import TaHForCausalLM

    console = Console(highlight=False)
    overrides = {} if args.threshold is None else {"threshold": args.threshold}
    model = TaHForCausalLM.from_pretrained(args.model, **overrides).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    if args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    if args.show_depth:
        console.print(legend(model.tah_config.max_iter))
    streamer = DepthStreamer(tokenizer, console, show_depth=args.show_depth)
    started = time.perf_counter()
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                   eos_token_id=tokenizer.eos_token_id, seed=args.seed, streamer=streamer, fused=not args.no_fused,
                   draft_candidates=args.draft_candidates)
    seconds = time.perf_counter() - started
    counts = out.iter_counts[0]
    produced = int((counts > 0).sum())
    iterated = float((counts > 1).sum()) / max(produced, 1)
    console.print(f"{produced} tokens, {produced / seconds:.1f} tokens/s, {iterated:.1%} of tokens iterated",
                  style="dim")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tah", description="Think-at-Hard: iterate only on the hard tokens.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="the paper's experiment end to end on a toy task (CPU, nothing downloaded)",
        description="Pretrain a tiny Qwen3 on step-by-step arithmetic, label its hard tokens, prune a layer, and "
                    "train Standard, AlwaysIterate, TaH+ and TaH with equal budgets through tah label / prune / "
                    "train; evaluate on held-out problems. Writes results.json, sweep.png and samples.html.")
    demo.add_argument("--out", default="tah-demo", help="output directory (default: tah-demo)")
    demo.add_argument("--quick", action="store_true", help="smaller task and model, one seed (1-2 minutes; checks the pipeline)")
    demo.add_argument("--seeds", type=int, default=None,
                      help="repeat with N seeds and report mean ± std (default: 3; 1 with --quick)")
    demo.set_defaults(run=_demo)

    gen = commands.add_parser("generate", help="generate text with a saved TaH model (our or the original layout)")
    gen.add_argument("--model", required=True, help="checkpoint directory (with its tokenizer files)")
    gen.add_argument("--prompt", required=True)
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
    gen.add_argument("--draft-candidates", type=int, default=None, metavar="N",  # tah.generate checks it
                     help="drafts beside a hard token: 2 or more add the depth-0 runner-ups (greedy only; same "
                          "tokens). Default: 3 when greedy with one prompt, 1 when sampling")
    gen.add_argument("--show-depth", action="store_true", help="colour each token by its number of passes")
    gen.set_defaults(run=_generate)

    # Each pipeline stage registers its own subcommand next to its code.
    from tah.data.cli import register_label
    from tah.train.cli import register_prune, register_train

    for register in (register_label, register_prune, register_train):
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
