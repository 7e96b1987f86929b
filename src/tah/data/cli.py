"""`tah label`: hard-token labels from a reference model."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Run a reference model teacher-forced over chat data and mark the hard tokens: those where the
reference's argmax is not the true next token. Writes OUT/dataset (a `datasets` dataset with
input_ids, labels, iter_labels; plus ref_entropy and ref_ce with --save-stats) and OUT/stats.json.

iter_labels[t] = passes for the prediction at position t (of token t+1): 1 easy, 2 hard, -100 for
the last position and padding. With --max-iter N > 2, a hard token gets 2 + k passes, k = how many
of the N-2 --deep-ce thresholds (nats, increasing) the reference's cross-entropy on it exceeds.

The run is written in shards, each atomically: rerun the same command after a crash to resume.
Under `accelerate launch --num_processes N -m tah.cli label ...` (or `torchrun --nproc_per_node N
-m tah.cli label ...`; on a CPU-only machine add `--multi_gpu` to accelerate launch, which then runs
N CPU processes) every process labels its share of the shards.
"""


def register_label(commands: argparse._SubParsersAction) -> None:
    label = commands.add_parser("label", help="label hard tokens with a reference model",
                                description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    label.add_argument("--strict", action="store_true", help="fail on the first malformed row instead of skipping it")
    label.add_argument("--save-stats", action="store_true",
                       help="also store the reference's entropy and cross-entropy per token (ref_entropy, ref_ce)")
    label.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                       help="reference model dtype (auto: bfloat16 on a GPU, float32 on CPU)")
    label.add_argument("--no-progress", action="store_true", help="no progress bar")
    label.set_defaults(run=run_label)


def run_label(args: argparse.Namespace) -> None:
    from datetime import timedelta
    from pathlib import Path

    import torch
    from accelerate import PartialState

    from tah.data.chat import build_dataset
    from tah.data.label import check_rule, label_dataset
    from tah.data.shards import write_json
    from tah.errors import CheckpointError, InputError

    check_rule(args.max_iter, args.deep_ce)  # fail before loading anything
    # cpu=True without CUDA: processes started by `accelerate launch --multi_gpu` / torchrun then talk
    # over gloo (accelerate's own --cpu launcher starts one process unless MPI is set up). Long
    # timeout: on a resumed run one process may have many more shards left than another.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))
    say = print if state.is_main_process else (lambda *a, **k: None)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"reference model directory {model_dir} does not exist or has no config.json; "
                              "give a directory written by save_pretrained")
    tokenizer = _load_tokenizer(args.tokenizer or args.model)
    dataset, report = build_dataset(args.data, tokenizer, args.max_length, strict=args.strict, return_report=True)
    say(f"data: {report.summary()}", file=sys.stderr)

    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if state.device.type == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the reference model from {model_dir}: {err}") from err
    model = model.to(state.device).eval()
    vocab = model.get_input_embeddings().num_embeddings
    top = max(max(ids) for ids in dataset["input_ids"])
    if top >= vocab:
        raise InputError(f"the tokenizer produced id {top} but the reference model has {vocab} embeddings; "
                         "use the reference model's own tokenizer (--tokenizer)")
    stats = label_dataset(model, dataset, args.out, batch_size=args.batch_size, max_iter=args.max_iter,
                          shard_size=args.shard_size, deep_ce=args.deep_ce, save_stats=args.save_stats,
                          progress=not args.no_progress, reference_name=str(model_dir.resolve()))
    if state.is_main_process:
        stats["data"] = {"source": report.source, "rows": report.total, "kept": report.kept,
                         "skipped": len(report.skipped), "first_skipped": report.skipped[:5]}
        write_json(Path(args.out) / "stats.json", stats)
    passes = ", ".join(f"{k}: {n}" for k, n in stats["iter_histogram"].items())
    say(f"labelled {stats['rows']} rows, {stats['labelled_tokens']} tokens: {stats['hard_share']:.1%} hard "
        f"overall, {stats['assistant_hard_share']:.1%} on assistant tokens (tokens by passes: {passes})")
    say(f"wrote {Path(args.out) / 'dataset'} and {Path(args.out) / 'stats.json'}")


def _load_tokenizer(path: str):
    from tah.model.checkpoint import load_tokenizer

    return load_tokenizer(path, "give --tokenizer DIR with the reference model's tokenizer files")
