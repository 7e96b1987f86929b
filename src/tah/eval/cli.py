"""`tah eval` and `tah grade`: the paper's benchmarks, graded as the field grades them. Their options here;
the work, and the help text, are `tah.eval.bench_run.run_eval`'s and `tah.eval.bench_grade.grade_file`'s."""

from __future__ import annotations

import argparse
import sys


def register_eval(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("eval", help="answer and grade a benchmark (GSM8K, MATH-500, AIME, AMC, HumanEval)",
                              calls="tah.eval.bench_run:run_eval")
    run.add_argument("--model", help="TaH checkpoint directory (ours or the original layout)")
    _data_arguments(run)
    run.add_argument("--out", help="output directory (with --report: where report.json and report.png go; "
                                    "default: the first report directory)")
    run.add_argument("--tokenizer", help="tokenizer directory, with a chat template (default: --model)")
    run.add_argument("--prompt-template", metavar="TEXT",
                     help="an instruction added on a line after each question, or a template with {question}; "
                          "'boxed' = \"Please reason step by step, and put your final answer within \\boxed{}.\" "
                          "(default: the raw question)")
    run.add_argument("--threshold", default="0.9", metavar="T1,T2,...",
                     help="decider threshold(s); several: one run each, OUT/threshold-<t>/ (default: 0.9)")
    run.add_argument("--max-iter", type=int, default=None, help="most passes per token (default: the checkpoint's)")
    run.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    run.add_argument("--samples", type=int, default=1, metavar="K", help="answers per problem, for pass@k and mean@k")
    run.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N problems")
    run.add_argument("--temperature", type=float, default=0.6)
    run.add_argument("--top-p", type=float, default=0.95)
    run.add_argument("--top-k", type=int, default=20)
    run.add_argument("--max-new-tokens", type=int, default=4096)
    run.add_argument("--seed", type=int, default=0, help="sampling seed (each batch draws from a hash of it)")
    run.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    run.add_argument("--report", nargs="+", metavar="DIR",
                     help="instead of running: a table (and plot) of the runs in these directories")
    run.set_defaults(run=run_eval_command)


def register_grade(commands: argparse._SubParsersAction) -> None:
    grade = commands.add_parser("grade", help="grade completions made elsewhere with tah eval's graders",
                                calls="tah.eval.bench_grade:grade_file")
    _data_arguments(grade)
    grade.add_argument("--samples", required=True, metavar="FILE", help="JSONL of {\"id\", \"completion\"} lines")
    grade.add_argument("--out", required=True, help="output directory")
    grade.set_defaults(run=run_grade_command)


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", help="gsm8k, math500, aime24, aime25, amc23, humaneval, or math")
    parser.add_argument("--data", help="the benchmark's JSONL (.gz allowed)")
    parser.add_argument("--strict", action="store_true", help="fail on the first malformed row instead of skipping it")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HumanEval program (default: 10)")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address space per HumanEval program")
    parser.add_argument("--workers", type=int, default=None, help="HumanEval programs run at once (default: CPUs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_eval_command(args: argparse.Namespace) -> None:
    if args.report:
        from tah.eval.bench_report import report

        report(args.report, args.out)
        return
    from tah.eval.bench_run import EvalOptions, run_dir, run_eval

    task, loaded = _load(args, "model", "out")
    options = EvalOptions(task=task, data=args.data, model=args.model, out=args.out, tokenizer=args.tokenizer,
                          thresholds=_thresholds(args.threshold), max_iter=args.max_iter,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, greedy=args.greedy, samples=args.samples,
                          limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                          prompt_template=args.prompt_template, timeout_s=args.timeout, memory_mb=args.memory_mb,
                          workers=args.workers, progress=not args.no_progress)
    several = len(options.thresholds) > 1
    for threshold, summary in zip(options.thresholds, run_eval(options, loaded), strict=True):
        print(_summary_line(summary, run_dir(args.out, threshold, several)))


def run_grade_command(args: argparse.Namespace) -> None:
    from tah.eval.bench_grade import grade_file

    task, loaded = _load(args)
    summary, skipped = grade_file(task, loaded, args.samples, args.out, strict=args.strict, timeout_s=args.timeout,
                                  memory_mb=args.memory_mb, workers=args.workers, progress=not args.no_progress)
    _say_skipped(skipped, f"skipped {len(skipped)} malformed lines of {args.samples} (--strict fails on the first)")
    print(_summary_line(summary, args.out))


def _load(args: argparse.Namespace, *required: str):
    """The task and its problems (checked before anything heavy loads); skipped rows told on stderr."""
    from tah.errors import InputError
    from tah.eval.tasks import get_task, load_problems

    for name in ("task", "data", *required):
        if getattr(args, name) is None:
            raise InputError(f"--{name} is required (see tah {args.command} --help)")
    task = get_task(args.task)
    loaded = load_problems(task, args.data, strict=args.strict)
    _say_skipped(loaded.skipped, loaded.skipped_summary(args.data))
    return task, loaded


def _say_skipped(skipped: list[str], summary: str, shown: int = 3) -> None:
    for line in skipped[:shown]:
        print(f"tah: skipped {line}", file=sys.stderr)
    if skipped:
        print(f"tah: {summary}", file=sys.stderr)


def _thresholds(text: str) -> list[float]:
    from tah.errors import InputError

    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise InputError(f"--threshold {text!r}: give numbers in [0, 1], separated by commas (e.g. 0.5,0.9)")
    return list(dict.fromkeys(values))


def _summary_line(summary: dict, where) -> str:
    def share(value):
        return "-" if value is None else f"{value:.1%}"

    pass_k = ", ".join(f"pass@{k} {share(v)}" for k, v in summary["pass_at_k"].items())
    line = (f"{summary['task']}: accuracy {share(summary['accuracy'])} over {summary['n']} problems x "
            f"{summary['samples']} samples ({pass_k})")
    if summary["iterated_share"] is not None:
        line += f", {share(summary['iterated_share'])} of {summary['tokens']} tokens iterated"
    if summary.get("tokens_per_second"):
        line += f", {summary['tokens_per_second']:.1f} tokens/s"
    return f"{line} -> {where}"
