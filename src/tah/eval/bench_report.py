"""`tah eval --report DIR ...`: the paper's table from finished `tah eval` / `tah grade` runs.

Each run directory holds a summary.json (task, model, accuracy, iterated share, settings). A report
gathers every summary.json under the directories given (a threshold sweep writes one per threshold,
in subdirectories), prints one table (a row per model and threshold, a column per task: accuracy and
iterated share) and plots accuracy against iterated share per task, each model's thresholds joined
as a curve: the compute-accuracy trade-off the decider threshold buys.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tah.errors import InputError
from tah.eval.report import save_png, write_results

SUMMARY = "summary.json"


@dataclass(frozen=True)
class Run:
    """One finished evaluation: a model at one threshold on one task."""

    model: str  # the label of the row: the checkpoint's folder name
    threshold: float | None  # None: a model without a decider threshold (e.g. graded elsewhere)
    task: str
    accuracy: float
    iterated_share: float | None
    n: int
    source: Path  # the summary.json it came from


def find_runs(dirs: list[str | os.PathLike]) -> list[Run]:
    """Every summary.json in or under `dirs`, as runs. Raises InputError naming a directory without
    one, or a summary.json that cannot be read or lacks a field."""
    runs = []
    for directory in map(Path, dirs):
        if not directory.is_dir():
            raise InputError(f"--report {directory}: no such directory; give the --out folder of a tah eval run")
        found = sorted(directory.rglob(SUMMARY))
        if not found:
            raise InputError(f"--report {directory}: no {SUMMARY} in it or below; is the run finished?")
        runs += [_read_run(path) for path in found]
    return _unique_labels(runs)


def _read_run(path: Path) -> Run:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        settings = summary.get("settings") or {}
        # a one-pass model (max_iter 1: Standard, a plain HF model) has no threshold that means anything
        threshold = None if settings.get("max_iter") == 1 else settings.get("threshold")
        return Run(model=str(summary.get("model") or path.parent.name), task=str(summary["task"]),
                   threshold=None if threshold is None else float(threshold),
                   accuracy=float(summary["accuracy"]), n=int(summary["n"]),
                   iterated_share=None if summary.get("iterated_share") is None else float(summary["iterated_share"]),
                   source=path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"{path}: not a tah eval summary ({type(err).__name__}: {err}); "
                         "rerun tah eval or tah grade to write it") from err


def _unique_labels(runs: list[Run]) -> list[Run]:
    """Label each model by its folder name, or by its whole path where two folders share a name."""
    names = defaultdict(set)
    for run in runs:
        names[Path(run.model).name].add(run.model)
    return [Run(**{**run.__dict__, "model": Path(run.model).name if len(names[Path(run.model).name]) == 1
                   else run.model}) for run in runs]


def table_rows(runs: list[Run]) -> tuple[list[str], list[dict]]:
    """Tasks (columns, sorted) and rows {"model", "threshold", task: Run} sorted by model then threshold.
    Two runs of one model, threshold and task: the later directory given wins."""
    tasks = sorted({run.task for run in runs})
    rows: dict[tuple, dict] = {}
    for run in runs:
        row = rows.setdefault((run.model, run.threshold), {"model": run.model, "threshold": run.threshold})
        row[run.task] = run
    ordered = sorted(rows.values(), key=lambda r: (r["model"], -1.0 if r["threshold"] is None else r["threshold"]))
    return tasks, ordered


def report(dirs: list[str], out: str | os.PathLike | None = None) -> dict:
    """Print the table and write OUT/report.json and OUT/report.png (OUT: `out`, else the first of
    `dirs`). Returns {"table": [...], "json": path, "png": path}."""
    from rich.console import Console

    runs = find_runs(dirs)
    tasks, rows = table_rows(runs)
    Console(highlight=False).print(_rich_table(tasks, rows))
    out = Path(out or dirs[0])
    table = [{"model": row["model"], "threshold": row["threshold"],
              **{task: {"accuracy": row[task].accuracy, "iterated_share": row[task].iterated_share, "n": row[task].n}
                 for task in tasks if task in row}} for row in rows]
    json_path = write_results({"tasks": tasks, "rows": table}, out / "report.json")
    png_path = plot_tradeoff(runs, out / "report.png")
    print(f"wrote {json_path} and {png_path}")
    return {"table": table, "json": json_path, "png": png_path}


def _rich_table(tasks: list[str], rows: list[dict]):
    from rich.table import Table

    table = Table(title="accuracy (iterated share)")
    table.add_column("model")
    table.add_column("threshold", justify="right")
    for task in tasks:
        table.add_column(task, justify="right")
    for row in rows:
        cells = [_cell(row.get(task)) for task in tasks]
        threshold = "-" if row["threshold"] is None else f"{row['threshold']:g}"
        table.add_row(row["model"], threshold, *cells)
    return table


def _cell(run: Run | None) -> str:
    if run is None:
        return ""
    share = "" if run.iterated_share is None else f" ({run.iterated_share:.1%})"
    return f"{run.accuracy:.1%}{share}"


def plot_tradeoff(runs: list[Run], path: str | os.PathLike) -> Path:
    """PNG: one panel per task, accuracy against iterated share; a model's thresholds joined in order
    of iterated share and labelled by threshold. Runs without an iterated share are left out of the
    plot (they stay in the table). Written atomically; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = sorted({run.task for run in runs})
    figure = Figure(figsize=(4.5 * len(tasks), 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    models = sorted({run.model for run in runs})
    colour = {model: f"C{i % 10}" for i, model in enumerate(models)}  # one colour per model on every panel
    for ax, task in zip(axes, tasks, strict=True):
        by_model = defaultdict(list)
        for run in runs:
            if run.task == task and run.iterated_share is not None:
                by_model[run.model].append(run)
        for model, points in sorted(by_model.items()):
            points.sort(key=lambda r: r.iterated_share)
            ax.plot([r.iterated_share for r in points], [r.accuracy for r in points], "o-", label=model,
                    color=colour[model])
            for run in points:
                if run.threshold is not None:
                    ax.annotate(f"{run.threshold:g}", (run.iterated_share, run.accuracy), fontsize="x-small",
                                textcoords="offset points", xytext=(4, 4))
        ax.set(title=task, xlabel="iterated share", ylabel="accuracy")
        ax.margins(0.15)  # room for the threshold labels inside the panel
        if by_model:
            ax.legend(loc="best", fontsize="small")
    figure.suptitle("accuracy against iterated share (points labelled by decider threshold)")
    figure.tight_layout()
    return save_png(figure, path)

