"""`tah prune` and `tah train`: their options, dispatched to `tah.train.prune.prune` and `tah.train.run.train`
(whose docstrings are the commands' help)."""

from __future__ import annotations

import argparse


def register_prune(commands: argparse._SubParsersAction) -> None:
    """`tah prune`: its options; the work, and the help text, are `tah.train.prune.prune`'s."""
    prune = commands.add_parser("prune", help="remove the layers whose removal raises held-out loss least",
                                calls="tah.train.prune:prune")
    prune.add_argument("--model", required=True, help="HF model directory (with its tokenizer files)")
    prune.add_argument("--data", required=True,
                       help="calibration JSONL: rows with chat `messages`, or `prompt` + `response`")
    prune.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    prune.add_argument("--layers", type=int, default=None, help="number of decoder layers to remove (default 1)")
    prune.add_argument("--mlp-keep", type=int, default=None, metavar="N",
                       help="instead of layers, keep the N most important MLP neurons of every layer "
                            "(width pruning: for models of few layers, where one layer is much of the depth)")
    prune.add_argument("--max-length", type=int, default=1024, help="truncate rows to this many tokens")
    prune.add_argument("--batch-size", type=int, default=4)
    prune.add_argument("--max-rows", type=int, default=None, help="use only the first N rows of --data")

    def run(args: argparse.Namespace) -> None:
        from tah.errors import ConfigError

        common = dict(max_length=args.max_length, batch_size=args.batch_size, max_rows=args.max_rows)
        if args.mlp_keep is not None:
            if args.layers is not None:
                raise ConfigError("give --layers (remove layers) or --mlp-keep (narrow every MLP), not both")
            from tah.train.prune_width import print_width_report, prune_width

            print_width_report(prune_width(args.model, args.data, args.out, keep=args.mlp_keep, **common), args.out)
            return
        from tah.train.prune import print_report, prune

        report = prune(args.model, args.data, args.out, layers=1 if args.layers is None else args.layers, **common)
        print_report(report, args.out)

    prune.set_defaults(run=run)


def register_train(commands: argparse._SubParsersAction) -> None:
    """`tah train`: its options; the work, and the help text, are `tah.train.run.train`'s (after the
    recipe and output_dir are checked, before torch loads)."""
    train = commands.add_parser("train", help="train stage 1 / stage 2 / a baseline from a YAML recipe",
                                calls="tah.train.run:train")
    train.add_argument("--config", required=True, help="YAML recipe (see recipes/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, e.g. --set training.learning_rate=1e-4 (repeatable)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint-N in output_dir (it says which)")
    train.add_argument("--overwrite", action="store_true",
                       help="discard the run already in output_dir (checkpoint-N, final/) and start at step 0; "
                            "without --resume or --overwrite, an output_dir holding a run is refused")

    def run(args: argparse.Namespace) -> None:
        from pathlib import Path

        from tah.train.checkpoints import check_output_dir
        from tah.train.recipe import load_recipe

        recipe = load_recipe(args.config, args.overrides)  # all checks happen before any model loads
        check_output_dir(Path(recipe.output_dir), args.resume, args.overwrite)
        from tah.train.run import train as run_training

        final = run_training(recipe, resume=args.resume, overwrite=args.overwrite)
        print(f"final model: {final}")

    train.set_defaults(run=run)
