"""`tah label`: its options; the work is `tah.data.label_run.run_label`, whose docstring is the help."""

from __future__ import annotations

import argparse


def register_label(commands: argparse._SubParsersAction) -> None:
    label = commands.add_parser("label", help="label hard tokens with a reference model",
                                calls="tah.data.label_run:run_label")
    label.add_argument("--model", required=True, help="reference model directory (HF save_pretrained)")
    label.add_argument("--data", required=True,
                       help="JSONL (or a `datasets` dataset directory) of chat `messages` or `prompt` + `response` rows")
    label.add_argument("--out", required=True, help="output directory (a rerun with the same settings resumes)")
    label.add_argument("--tokenizer", help="tokenizer directory (default: --model); must have a chat template")
    label.add_argument("--max-length", type=int, default=2048, help="tokens per row; longer rows are truncated")
    label.add_argument("--batch-size", type=int, default=8, help="rows per reference forward")
    label.add_argument("--shard-size", type=int, default=1024, help="rows per shard (the unit of resuming)")
    label.add_argument("--max-iter", type=int, default=2, help="most passes a token may get (>= 2)")
    label.add_argument("--deep-ce", type=float, nargs="+", default=None, metavar="NATS",
                       help="with --max-iter N > 2: N-2 increasing cross-entropy thresholds; a hard token "
                            "gets one more pass for each that the reference's CE on it exceeds")
    label.add_argument("--confidence", type=float, default=None, metavar="P",
                       help="also mark hard the tokens the reference predicts right with a probability below P "
                            "(e.g. 0.9; default: only the tokens it misses, the paper's rule)")
    label.add_argument("--prompt-easy", action="store_true",
                       help="only answer tokens can be hard: the prompt's positions get one pass (its content may "
                            "be unpredictable by nature, e.g. random operands)")
    label.add_argument("--strict", action="store_true", help="fail on the first malformed row instead of skipping it")
    label.add_argument("--save-stats", action="store_true",
                       help="also store the reference's entropy and cross-entropy per token (ref_entropy, ref_ce)")
    label.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                       help="reference model dtype (auto: bfloat16 on a GPU, float32 on CPU)")
    label.add_argument("--no-progress", action="store_true", help="no progress bar")
    label.set_defaults(run=_label)


def _label(args: argparse.Namespace) -> None:
    from tah.data.label_run import run_label

    run_label(args.model, args.data, args.out, tokenizer=args.tokenizer, max_length=args.max_length,
              batch_size=args.batch_size, shard_size=args.shard_size, max_iter=args.max_iter, deep_ce=args.deep_ce,
              confidence=args.confidence, prompt_easy=args.prompt_easy, strict=args.strict, save_stats=args.save_stats, dtype=args.dtype, progress=not args.no_progress)
