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


def seconds(value) -> str:
    return "-" if value is None else f"{value:.1f}"


# (key in a model row, column header, formatter): the table shows exactly these fields.
MODEL_COLUMNS = (
    ("name", "Model", str),
    ("answer_accuracy", "Answer acc.", percent),
    ("next_token_accuracy", "Next-token acc.", percent),
    ("iterated_share", "Iterated", percent),
    ("parameters", "Params", count),
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


def plot_sweep(sweep: list[dict], path: str | os.PathLike, references: dict | None = None,
               title: str = "Decider threshold sweep", label: str = "TaH (sweep)") -> Path:
    """PNG of a `threshold_sweep`: left, next-token accuracy (and answer accuracy if present) and
    iterated share against the threshold; right, accuracy against iterated share (the compute-
    accuracy trade-off), with `references` {name: {"iterated_share", "accuracy"}} (e.g. Standard,
    AlwaysIterate) as labelled points; `label` names the swept model. Written atomically; returns
    the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not sweep:
        raise InputError("plot_sweep needs at least one sweep point")
    points = sorted(sweep, key=lambda p: p["threshold"])
    x = [p["threshold"] for p in points]
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    left.plot(x, [p["accuracy"] for p in points], "o-", label="next-token accuracy")
    if all(p.get("answer_accuracy") is not None for p in points):
        left.plot(x, [p["answer_accuracy"] for p in points], "s-", label="answer accuracy")
    left.plot(x, [p["iterated_share"] for p in points], "^--", label="iterated share")
    left.set(xlabel="decider threshold", ylabel="share", ylim=(-0.02, 1.02), title="against the threshold")
    left.legend(loc="best", fontsize="small")
    right.plot([p["iterated_share"] for p in points], [p["accuracy"] for p in points], "o-", label=label)
    for name, ref in (references or {}).items():
        right.scatter([ref["iterated_share"]], [ref["accuracy"]], marker="*", s=120, zorder=3)
        right.annotate(name, (ref["iterated_share"], ref["accuracy"]), textcoords="offset points", xytext=(5, 5))
    right.set(xlabel="iterated share", ylabel="next-token accuracy", xlim=(-0.05, 1.05),
              title="compute-accuracy trade-off")
    right.legend(loc="best", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
