"""`tah demo`: the paper's experiment at toy scale, end to end, on a CPU, with nothing downloaded.

A tiny Qwen3 learns step-by-step arithmetic (copied digits are easy, computed digits are hard);
then, with equal training budgets, Standard (one pass), AlwaysIterate, TaH+ (all layers) and TaH
(its MLPs narrowed so that its parameters stay under Standard's) are trained through the functions behind
`tah label`, `tah prune` and `tah train`, and evaluated on held-out problems. Writes under OUT:

    results.json    every number and the settings (per seed, and mean / std over seeds)
    sweep.png       next-token accuracy and iterated share as TaH+'s decider threshold sweeps 0..1, every seed
    samples.html    TaH+'s own answers to held-out problems and the reference solutions teacher-forced,
                    each token coloured by its passes (hard labels marked on the references)
    seed-N/         the data, models, runs and logs of each seed
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tah.toy.parallel import default_workers, run_seeds
from tah.toy.pipeline import DemoSettings, Stages
from tah.toy.verdict import claims, verdict_lines

MODELS = ("Standard", "AlwaysIterate", "TaH+", "TaH")
SWEPT = "TaH+"  # the model of sweep.png and samples.html
STAGES = 19  # the steps run_seed reports: data, init, pretrain, prune, 2 labels, 6 trainings, 4 evaluations, 3 more
METRICS = ("answer_accuracy", "next_token_accuracy", "iterated_share", "parameters", "flops_per_token", "train_time_s",
           "eval_time_s")


def run_demo(out: str | Path = "tah-demo", quick: bool = False, seeds: int | None = None,
             workers: int | None = None, console: Console | None = None) -> dict:
    """The paper's experiment end to end on a toy task, on a CPU, with nothing downloaded. Pretrain a
    tiny Qwen3 on step-by-step arithmetic and prune it for TaH; fine-tune Standard, label the hard
    tokens with it (what one pass still gets wrong or is unsure of), and train AlwaysIterate, TaH+ and
    TaH from the same base with equal budgets (the work of tah train / prune / label); evaluate them
    on held-out problems. Writes OUT/results.json, sweep.png and samples.html, and each seed's
    data, models, runs and logs under OUT/seed-N/.

    Args:
        out: the output directory.
        quick: a smaller task and model (2-3 minutes; checks the pipeline).
        seeds: how many seeds (default: 3, or 1 with `quick`); each draws its own problems, initial
            weights and data order, and the tables show mean ± std over them.
        workers: how many seeds train side by side, each in a process of its own on one CPU thread
            (default: every seed at once, at most two per CPU core). The results are the same
            whatever this is: a seed's float rounding depends on the CPU, not on how many threads
            or neighbours it has.
        console: where the progress and tables go (default: a new rich Console on stdout).
    Returns:
        What results.json holds.
    Raises:
        InputError: `seeds` or `workers` below 1, before anything runs.
    """
    from tah.errors import InputError

    seeds = (1 if quick else 3) if seeds is None else seeds
    if not isinstance(seeds, int) or seeds < 1:
        raise InputError(f"--seeds must be an integer >= 1; got {seeds!r}")
    workers = default_workers(seeds) if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise InputError(f"--workers must be an integer >= 1; got {workers!r}")
    from transformers.utils import logging as hf_logging

    from tah.eval import write_results

    hf_logging.disable_progress_bar()  # weight loading; run_seeds draws one bar for all stages
    console = console or Console(highlight=False)
    if not console.is_terminal:  # piped or captured: room for the whole table rather than 80 columns
        console.width = max(console.width, 140)
    settings = DemoSettings.quick() if quick else DemoSettings()
    out = Path(out)
    started = time.perf_counter()
    console.rule(f"tah demo{' --quick' if quick else ''}: Think-at-Hard on step-by-step arithmetic")
    console.print(f"{seeds} seed{'s' if seeds > 1 else ''} under {out}/seed-N, {min(workers, seeds)} at a time, "
                  "one CPU thread each", style="dim")
    runs = run_seeds(run_seed, STAGES, out, settings, seeds, workers, console)
    results = summarise(runs, settings, quick, time.perf_counter() - started)
    write_results(results, out / "results.json")
    plot_demo_sweep(runs, out / "sweep.png")
    _copy(out / "seed-0" / "samples.html", out / "samples.html")
    console.print(demo_table(results))
    console.print(analysis_lines(results))
    console.print(verdict_lines(results))
    console.print(f"wrote {out / 'results.json'}, {out / 'sweep.png'}, {out / 'samples.html'} "
                  f"in {results['total_time_s']:.0f} s", style="dim")
    return results


def plot_demo_sweep(runs: list[dict], path: Path) -> None:
    """sweep.png: SWEPT's threshold sweep of every seed, Standard and AlwaysIterate as references."""
    from tah.eval import plot_sweep

    references = [{name: {"iterated_share": row["iterated_share"], "accuracy": row["next_token_accuracy"]}
                   for name, row in run["models"].items() if name in ("Standard", "AlwaysIterate")} for run in runs]
    seeds = f"{len(runs)} seeds" if len(runs) > 1 else "seed 0"
    plot_sweep([run["sweep"] for run in runs], path, references=references, label=f"{SWEPT} (sweep)",
               title=f"Decider threshold sweep of {SWEPT} ({seeds}, held-out solutions)")


def run_seed(root: Path, settings: DemoSettings, seed: int, report: Callable[[str, float], None]) -> dict:
    """One seed: every stage (`STAGES` of them, each announced by `report(name, seconds)` when done),
    every model, every analysis. Runs on the calling process's torch threads (see `run_seeds`)."""
    from tah.data import load_labeled
    from tah.toy.tokenizer import build_char_tokenizer

    stages = Stages(root, settings, seed)
    times = {}

    def step(name: str, action):
        began = time.perf_counter()
        value = action()
        times[name] = time.perf_counter() - began
        report(name, times[name])
        return value

    train, heldout = step("data: problems + tokenizer", stages.data)
    init = step("init: random tiny Qwen3", stages.init_model)
    s = settings
    until = {} if s.pretrain_loss is None else {"training.stop_at_loss": s.pretrain_loss, "training.logging_steps": 10}
    base, _ = step("pretrain: the base (tah train)", lambda: stages.train(
        "standard", "base", init, root / "data" / "train.jsonl", s.pretrain_steps, s.pretrain_lr, **until))
    pruned, _ = step("prune: for TaH (tah prune)", lambda: stages.prune(base))
    finals, train_time, labelled = {}, {}, {"train": root / "data" / "train.jsonl"}

    def fit(name, recipe, out, model, steps, lr, **extra):
        path, seconds = stages.train(recipe, out, model, labelled["train"], steps, lr, **extra)
        train_time[name] = train_time.get(name, 0.0) + seconds
        return path

    def label(reference):
        labelled["train"], _ = step("label: hard tokens (tah label)", lambda: stages.label(reference, "train"))
        labelled["heldout"], _ = step("label: held-out", lambda: stages.label(reference, "heldout"))

    if s.label_reference == "base":
        label(base)
    lora = {"tah.lora_rank": s.lora_rank, "tah.lora_alpha": 2 * s.lora_rank}
    decider = {"tah.pos_weight": s.pos_weight, "tah.threshold": s.threshold, **lora}
    finals["Standard"] = step("train: Standard", lambda: fit("Standard", "standard", "standard", base,
                                                            s.finetune_steps, s.finetune_lr))
    if s.label_reference == "standard":
        label(finals["Standard"])
    labeled, heldout_labeled = labelled["train"], labelled["heldout"]
    finals["AlwaysIterate"] = step("train: AlwaysIterate", lambda: fit("AlwaysIterate", "always", "always", base,
                                                                      s.finetune_steps, s.finetune_lr, **lora))
    for name, start in (("TaH+", base), ("TaH", pruned)):
        tag = name.lower().replace("+", "-plus")
        stage1 = step(f"train: {name} stage 1", lambda start=start, name=name, tag=tag: fit(
            name, "stage1", f"{tag}-stage1", start, s.finetune_steps, s.finetune_lr, **decider,
            **{"tah.hard_token_weight": s.hard_token_weight}))
        finals[name] = step(f"train: {name} stage 2 (decider)", lambda stage1=stage1, name=name, tag=tag: fit(
            name, "stage2", f"{tag}-stage2", stage1, s.decider_steps, s.decider_lr, **decider))

    tokenizer = build_char_tokenizer()
    data = load_labeled(heldout_labeled)
    problems = heldout[:s.eval_problems]
    models = {name: step(f"evaluate: {name}", lambda path=path, name=name: evaluate(
        name, path, tokenizer, problems, data, train_time[name])) for name, path in finals.items()}
    analysis = step("analyse: oracle + overthinking", lambda: oracle_analysis(finals["AlwaysIterate"], data))
    # TaH+ (the unpruned model) is the model to look at here: what the decider does, apart from what
    # the pruning costs.
    sweep = step("analyse: threshold sweep (TaH+)", lambda: threshold_curve(finals[SWEPT], data))
    step("samples.html", lambda: write_samples(finals[SWEPT], tokenizer, data, problems, root / "samples.html",
                                               s.samples))
    stage1_losses = _losses(root / "runs" / "tah-stage1" / "recipe.json")
    return {"seed": seed, "models": models, "depth_analysis": analysis, "sweep": sweep, "stage_times_s": times,
            "labels": _label_stats(labeled), "stage1_loss": stage1_losses,
            "decider": _decider_metrics(root / "runs" / "tah-stage2" / "recipe.json")}


def evaluate(name: str, path: Path, tokenizer, problems, data, train_time: float) -> dict:
    from tah import TaHForCausalLM
    from tah.eval import answer_accuracy, next_token_accuracy
    from tah.eval.flops import forward_flops_per_token

    model = TaHForCausalLM.from_pretrained(path).eval()
    began = time.perf_counter()
    answers = answer_accuracy(model, tokenizer, problems, progress=False)
    tokens = next_token_accuracy(model, data, "model", pad_token_id=tokenizer.pad_token_id, progress=False)
    generated_iterated = answers["iterated_share"] or 0.0
    # A generated token attends to its prompt and half its solution on average: half a held-out row.
    context = sum(len(ids) for ids in data["input_ids"]) / (2 * len(data))
    return {"name": name, "answer_accuracy": answers["accuracy"], "next_token_accuracy": tokens["accuracy"],
            "iterated_share": tokens["iterated_share"], "answer_iterated_share": generated_iterated,
            "parameters": sum(p.numel() for p in model.parameters()),
            "flops_per_token": forward_flops_per_token(model, 1 + generated_iterated, context),
            "train_time_s": train_time, "eval_time_s": time.perf_counter() - began, "path": str(path)}


def oracle_analysis(path: Path, data) -> dict:
    from tah import TaHForCausalLM
    from tah.eval import depth_analysis

    model = TaHForCausalLM.from_pretrained(path).eval()
    return depth_analysis(model, data, progress=False)


def threshold_curve(path: Path, data) -> list[dict]:
    from tah import TaHForCausalLM
    from tah.eval import threshold_sweep

    return threshold_sweep(TaHForCausalLM.from_pretrained(path).eval(), data, progress=False)


def write_samples(path: Path, tokenizer, data, problems, html: Path, count: int) -> None:
    """samples.html of the model at `path`: its greedy answers to the first `count` problems, then the
    first `count` reference solutions of `data` teacher-forced."""
    from tah import TaHForCausalLM
    from tah.eval import answer_accuracy, samples_html, solution_records

    model = TaHForCausalLM.from_pretrained(path).eval()
    generated = answer_accuracy(model, tokenizer, problems[:count], progress=False)["records"]
    records = solution_records(model, tokenizer, data, count=count, pad_token_id=tokenizer.pad_token_id)
    samples_html(records, html, title=f"{SWEPT} on held-out problems: passes per token",
                 max_iter=model.tah_config.max_iter, generated=generated, model_name=SWEPT)


def summarise(runs: list[dict], settings: DemoSettings, quick: bool, total: float) -> dict:
    """Mean (and std over seeds) of every model metric; the per-seed runs kept whole."""
    rows, spread = [], {}
    for name in MODELS:
        row, dev = {"name": name}, {}
        for metric in METRICS:
            values = [run["models"][name][metric] for run in runs]
            row[metric] = round(statistics.fmean(values)) if metric == "parameters" else statistics.fmean(values)
            dev[metric] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
        spread[name] = dev
    overthinking = [run["depth_analysis"]["overthinking"] for run in runs]
    results = {"command": f"tah demo{' --quick' if quick else ''} --seeds {len(runs)}", "seeds": len(runs),
               "date": time.strftime("%Y-%m-%d"), "machine": _machine(), "models": rows, "std": spread,
               "overthinking": {k: statistics.fmean(o[k] for o in overthinking if o[k] is not None)
                                for k in ("overthink_share", "fix_share")
                                if any(o[k] is not None for o in overthinking)},
               "settings": asdict(settings), "runs": runs, "total_time_s": total}
    results["claims"] = claims(results)
    return results


def demo_table(results: dict) -> Table:
    """The paper-like table: one row per model, mean (± std over seeds when there are several)."""
    from tah.eval.report import MODEL_COLUMNS

    table = Table(title=f"Held-out results ({results['seeds']} seed{'s' if results['seeds'] > 1 else ''})")
    for _, header, _ in MODEL_COLUMNS:
        table.add_column(header, justify="left" if header == "Model" else "right")
    for row in results["models"]:
        cells = []
        for key, _, fmt in MODEL_COLUMNS:
            cell = fmt(row[key])
            deviation = results["std"][row["name"]].get(key) if key != "name" else None
            if results["seeds"] > 1 and deviation is not None and key not in ("parameters", "flops_per_token"):
                cell += f" ± {fmt(deviation)}"
            cells.append(cell)
        table.add_row(*cells)
    return table


def analysis_lines(results: dict) -> str:
    """The oracle and overthinking analyses (AlwaysIterate weights), averaged over seeds."""
    runs = [run["depth_analysis"] for run in results["runs"]]
    acc = {k: statistics.fmean(run[k]["accuracy"] for run in runs) for k in ("always1", "always2", "oracle")}
    over = results["overthinking"]
    return (f"oracle (AlwaysIterate weights, next-token acc.): always-1 {acc['always1']:.1%}, "
            f"always-2 {acc['always2']:.1%}, oracle {acc['oracle']:.1%}\n"
            f"latent overthinking: depth 1 turns {over.get('overthink_share', 0):.1%} of the tokens right after "
            f"depth 0 wrong, and fixes {over.get('fix_share', 0):.1%} of the wrong ones")


def _losses(recipe_json: Path) -> list[float]:
    return [e["loss"] for e in json.loads(recipe_json.read_text())["log_history"] if "loss" in e]


def _decider_metrics(recipe_json: Path) -> dict:
    logs = [e for e in json.loads(recipe_json.read_text())["log_history"] if "decider_accuracy" in e]
    return {k: logs[-1][k] for k in ("decider_accuracy", "decider_precision", "decider_recall")} if logs else {}


def _label_stats(labeled: Path) -> dict:
    stats = labeled / "stats.json"
    return json.loads(stats.read_text()) if stats.is_file() else {}


def _machine() -> str:
    """What the figures depend on besides the code, for results.json: at these margins another CPU
    model's kernels moved the verdicts (README, "The demo"), and the libraries' versions may too."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} not installed"

    libraries = ", ".join(installed(name) for name in ("transformers", "accelerate", "datasets", "numpy"))
    return (f"{platform.machine()} {platform.system()}, {_cpu_model()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {libraries}")


def _cpu_model() -> str:
    """The CPU's model name (x86 Linux: /proc/cpuinfo), else what `platform` knows (may be nothing)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _copy(src: Path, dst: Path) -> None:
    import os
    import shutil

    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
