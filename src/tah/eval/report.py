"""Reports: the per-model table (rich), the oracle/overthinking table, results.json, the sweep plot.

`results` is a dict with a "models" list, one row per model, in the order to show:

    {"name", "answer_accuracy", "next_token_accuracy", "iterated_share", "parameters",
     "train_time_s", "eval_time_s"}    (missing or None values show as "-")

plus whatever else the caller records ("settings", "depth_analysis", "sweep", ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from rich.table import Table

from tah.errors import InputError


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def count(value) -> str:
    return "-" if value is None else f"{int(value):,}"


def mega(value) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}M"


def seconds(value) -> str:
    return "-" if value is None else f"{value:.1f}"


# (key in a model row, column header, formatter): the table shows exactly these fields.
MODEL_COLUMNS = (
    ("name", "Model", str),
    ("answer_accuracy", "Answer acc.", percent),
    ("next_token_accuracy", "Next-token acc.", percent),
    ("iterated_share", "Iterated", percent),
    ("parameters", "Params", count),
    ("flops_per_token", "FLOPs/token", mega),
    ("train_time_s", "Train (s)", seconds),
    ("eval_time_s", "Eval (s)", seconds),
)
DEPTH_ROWS = (("always1", "Always-1"), ("always2", "Always-2"), ("oracle", "Oracle (per token)"),
              ("oracle_joint", "Oracle (joint forward)"))


def model_rows(results) -> list[dict]:
    rows = results.get("models") if isinstance(results, dict) else results
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        raise InputError("results need a 'models' list of dicts, each with a 'name' (see tah.eval.report)")
    return rows


def results_table(results, title: str = "Think-at-Hard on the toy task") -> Table:
    """rich Table with one row per entry of results["models"] (or a list of such rows), columns
    `MODEL_COLUMNS`, numbers formatted as in results.json (accuracies and shares as percentages)."""
    table = Table(title=title)
    for key, header, _ in MODEL_COLUMNS:
        table.add_column(header, justify="left" if key == "name" else "right")
    for row in model_rows(results):
        table.add_row(*(fmt(row[key]) if row.get(key) is not None else "-" for key, _, fmt in MODEL_COLUMNS))
    return table


def depth_table(analysis: dict, title: str = "Oracle iteration policy and latent overthinking") -> Table:
    """rich Table of `tah.eval.depth_analysis`'s output: next-token accuracy and iterated share of
    always-1, always-2 and the oracle on the same tokens; the overthinking figures as the caption."""
    table = Table(title=title)
    for header in ("Policy", "Next-token acc.", "Iterated"):
        table.add_column(header, justify="left" if header == "Policy" else "right")
    for key, label in DEPTH_ROWS:
        if key in analysis:
            table.add_row(label, percent(analysis[key]["accuracy"]), percent(analysis[key]["iterated_share"]))
    over = analysis.get("overthinking")
    if over:
        table.caption = (f"depth 1 turns {percent(over['overthink_share'])} of the tokens right after depth 0 wrong "
                         f"({over['turned_wrong']}/{over['right_after_depth0']}) and fixes "
                         f"{percent(over['fix_share'])} of the wrong ones ({over['fixed']}/{over['wrong_after_depth0']})")
    return table


def jsonable(value):
    """`value` with tensors, numpy values, paths and dataclasses made JSON types; NaN/inf -> None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str):  # torch / numpy
        return jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(results: dict, path: str | os.PathLike) -> Path:
    """Write `results` as indented JSON atomically (a temp file in the same folder, then os.replace),
    so a reader never sees half a file. Raises `InputError` if something is not JSON-serialisable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        text = json.dumps(jsonable(results), indent=2, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InputError(f"results cannot be written as JSON ({err}); keep numbers, strings, lists and dicts") from err
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def plot_sweep(sweep: list, path: str | os.PathLike, references: dict | list | None = None,
               title: str = "Decider threshold sweep", label: str = "TaH (sweep)") -> Path:
    """PNG of `threshold_sweep` output, written atomically; returns the path. `sweep` is one run's
    points or a list of them, one per seed; `references` {name: {"iterated_share", "accuracy"}}
    (e.g. Standard, AlwaysIterate) likewise, or one such dict per seed. See `sweep_figure`."""
    return save_png(sweep_figure(sweep, references, title, label), path)


def save_png(figure, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as PNG atomically (a temp file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def sweep_figure(sweep: list, references: dict | list | None = None, title: str = "Decider threshold sweep",
                 label: str = "TaH (sweep)"):
    """The matplotlib Figure of `plot_sweep`. Left: next-token accuracy (and answer accuracy if
    present) against the threshold on an axis zoomed to the data, iterated share on a 0..1 axis at
    the right. Right: accuracy against iterated share (the compute-accuracy trade-off), with the
    references as labelled stars. Every seed is drawn (one colour each); every label lies inside
    its plot. Raises `InputError` on an empty sweep."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    seeds = [sorted(points, key=lambda p: p["threshold"]) for points in _per_seed(sweep)]
    refs = list(references) if isinstance(references, list) else [references or {}] * len(seeds)
    figure = Figure(figsize=(11, 5), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    share = left.twinx()
    accuracies, answers_drawn = [], False
    for seed, points in enumerate(seeds):
        colour = f"C{seed}"
        x = [p["threshold"] for p in points]
        accuracy = [p["accuracy"] for p in points]
        left.plot(x, accuracy, "o-", color=colour)
        accuracies += accuracy
        if all(p.get("answer_accuracy") is not None for p in points):
            answers = [p["answer_accuracy"] for p in points]
            left.plot(x, answers, "s:", color=colour)
            accuracies, answers_drawn = accuracies + answers, True
        share.plot(x, [p["iterated_share"] for p in points], "^--", color=colour, alpha=0.6)
        right.plot([p["iterated_share"] for p in points], accuracy, "o-", color=colour)
    left.set(xlabel="decider threshold", ylabel="accuracy", ylim=_zoom(accuracies), title="against the threshold")
    share.set(ylabel="iterated share", ylim=(-0.02, 1.02))
    points_y = [p["accuracy"] for points in seeds for p in points] + [r["accuracy"] for ref in refs for r in ref.values()]
    right.set(xlabel="iterated share", ylabel="next-token accuracy", xlim=(-0.05, 1.05), ylim=_zoom(points_y),
              title="compute-accuracy trade-off")
    _references(right, refs)
    _legend(figure, len(seeds), label, answers_drawn)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.1, 1, 1))  # the bottom tenth holds the legend
    return figure


def _legend(figure, seeds: int, label: str, answers: bool) -> None:
    """One legend under both plots: line styles say the metric, colours the seed."""
    from matplotlib.lines import Line2D

    styles = [("o-", "next-token accuracy"), ("s:", "answer accuracy"), ("^--", "iterated share (right axis)")]
    handles = [Line2D([], [], color="0.3", linestyle=style[1:], marker=style[0], label=name)
               for style, name in styles if answers or name != "answer accuracy"]
    handles += [Line2D([], [], color=f"C{seed}", linewidth=4, label=f"{label}, seed {seed}" if seeds > 1 else label)
                for seed in range(seeds)]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize="small", frameon=False)


def _per_seed(sweep: list) -> list[list[dict]]:
    """`sweep` as one list of points per seed (one run's points are one seed)."""
    if not sweep or any(not points for points in sweep):
        raise InputError("plot_sweep needs at least one sweep point (for every seed)")
    return [sweep] if isinstance(sweep[0], dict) else list(sweep)


def _zoom(values: list[float]) -> tuple[float, float]:
    """Axis limits around `values` with a margin (at least 2 points of accuracy), within [0, 1]."""
    low, high = min(values), max(values)
    margin = max(0.1 * (high - low), 0.02)
    return max(low - margin, -0.01), min(high + margin, 1.01)


def _references(axes, refs: list[dict]) -> None:
    """A star per reference and seed; each name once, at its mean point, written towards the inside
    of the axes (whose limits are set)."""
    low, high = axes.get_ylim()
    names = list(dict.fromkeys(name for ref in refs for name in ref))
    for number, name in enumerate(names):
        points = [ref[name] for ref in refs if name in ref]
        xs, ys = [p["iterated_share"] for p in points], [p["accuracy"] for p in points]
        axes.scatter(xs, ys, marker="*", s=140, zorder=3, color=f"C{9 - number}")
        x, y = sum(xs) / len(xs), sum(ys) / len(ys)
        right_half, upper_half = x > 0.5, y > (low + high) / 2
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(-8 if right_half else 8, -8 if upper_half else 8),
                      ha="right" if right_half else "left", va="top" if upper_half else "bottom", fontsize="small",
                      zorder=4)
