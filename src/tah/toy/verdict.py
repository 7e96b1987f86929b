"""The demo's verdict on each of the paper's claims, from its own figures: holds or not, and why.

A margin "holds" when the mean over seeds is above the other model's by more than the pooled
standard error of the difference, sqrt(sd_a^2 / n + sd_b^2 / n) over n seeds; with one seed there
is no error bar, and the verdict says so. The detail also gives the paired standard error, sd(a - b)
/ sqrt(n) over the per-seed differences: both models of a seed start from the same base and data,
so the seed's own luck (how far its base got) cancels there, and not in the pooled one. The verdict
stays on the pooled one, the stricter.
"""

from __future__ import annotations

import math
import statistics

# (key, label, decimals of the points printed): next-token accuracy sits near 100%, its margins in hundredths
METRICS = (("answer_accuracy", "answers", 1), ("next_token_accuracy", "next tokens", 3))
MAX_ITERATED = 0.20  # the paper's TaH iterates ~6-12% of tokens; the demo allows up to this
MIN_STANDARD = 0.30  # a seed whose Standard answers less has not learned the task


def claims(results: dict) -> list[dict]:
    """One {"claim", "holds" (bool), "detail"} per claim, in the order to print."""
    runs = results["runs"]
    per_model = {name: [run["models"][name] for run in runs] for name in runs[0]["models"]}
    out = [_above(per_model, "TaH+", "Standard"), _above(per_model, "TaH+", "AlwaysIterate"), _iterated(per_model)]
    if "TaH" in per_model:
        out.append(_pruned(per_model))
    out.append(_every_seed(runs))
    out.append(_oracle(runs))
    out.append(_overthinking(runs))
    return out


def verdict_lines(results: dict) -> str:
    """The claims as printable lines (rich markup)."""
    lines = ["[bold]The paper's claims on this run:[/]"]
    for claim in results.get("claims") or claims(results):
        mark = "[green]holds[/]        " if claim["holds"] else "[red]does not hold[/]"  # equal visible widths
        lines.append(f"  {mark} {claim['claim']}: {claim['detail']}")
    return "\n".join(lines)


def _margin(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean(a) - mean(b), the pooled and the paired standard errors of that difference; nan with one seed)."""
    n, diff = len(a), statistics.fmean(a) - statistics.fmean(b)
    if n < 2:
        return diff, math.nan, math.nan
    pooled = math.sqrt((statistics.variance(a) + statistics.variance(b)) / n)
    paired = statistics.stdev([x - y for x, y in zip(a, b, strict=True)]) / math.sqrt(n)
    return diff, pooled, paired


def _above(per_model: dict, mine: str, theirs: str) -> dict:
    parts, holds = [], True
    for key, label, places in METRICS:
        diff, error, paired = _margin([r[key] for r in per_model[mine]], [r[key] for r in per_model[theirs]])
        ok = diff > error if not math.isnan(error) else diff > 0
        holds &= ok
        parts.append(f"{label} {diff * 100:+.{places}f} points" + ("" if math.isnan(error) else
                     f" (SE {error * 100:.{places}f}, paired {paired * 100:.{places}f})"))
    seeds = len(per_model[mine])
    note = "" if seeds > 1 else " (1 seed: no error bar)"
    return {"claim": f"{mine} above {theirs}", "holds": holds, "detail": ", ".join(parts) + note}


def _iterated(per_model: dict) -> dict:
    share = statistics.fmean(r["iterated_share"] for r in per_model["TaH+"])
    return {"claim": f"TaH+ iterates at most {MAX_ITERATED:.0%} of tokens", "holds": share <= MAX_ITERATED,
            "detail": f"{share:.1%} of held-out solution tokens"}


def _pruned(per_model: dict) -> dict:
    mine, theirs = per_model["TaH"], per_model["Standard"]
    fewer = mine[0]["parameters"] < theirs[0]["parameters"]
    diffs = [statistics.fmean(r[key] for r in mine) - statistics.fmean(r[key] for r in theirs) for key, _, _ in METRICS]
    return {"claim": "TaH (pruned to fewer parameters) at least Standard",
            "holds": fewer and all(d >= 0 for d in diffs),
            "detail": f"{mine[0]['parameters']:,} vs {theirs[0]['parameters']:,} parameters; answers "
                      f"{diffs[0] * 100:+.1f} points, next tokens {diffs[1] * 100:+.3f}"}


def _every_seed(runs: list[dict]) -> dict:
    bad = []
    for run in runs:
        models = run["models"]
        answers = {name: row["answer_accuracy"] for name, row in models.items()}
        if answers["Standard"] < MIN_STANDARD:
            bad.append(f"seed {run['seed']}: Standard {answers['Standard']:.1%}")
        elif not answers["TaH+"] > max(answers["Standard"], answers["AlwaysIterate"]):
            bad.append(f"seed {run['seed']}: TaH+ {answers['TaH+']:.1%}, Standard {answers['Standard']:.1%}, "
                       f"AlwaysIterate {answers['AlwaysIterate']:.1%}")
    return {"claim": f"every seed learns (Standard >= {MIN_STANDARD:.0%} answers) and TaH+ answers best",
            "holds": not bad, "detail": "; ".join(bad) or f"all {len(runs)} seeds"}


def _oracle(runs: list[dict]) -> dict:
    acc = {k: statistics.fmean(run["depth_analysis"][k]["accuracy"] for run in runs)
           for k in ("always1", "always2", "oracle")}
    return {"claim": "the oracle policy beats always-1 and always-2",
            "holds": acc["oracle"] > max(acc["always1"], acc["always2"]),
            "detail": f"oracle {acc['oracle']:.1%}, always-1 {acc['always1']:.1%}, always-2 {acc['always2']:.1%} "
                      "(next tokens, AlwaysIterate's weights)"}


def _overthinking(runs: list[dict]) -> dict:
    over = [run["depth_analysis"]["overthinking"] for run in runs]
    hurt = [o["overthink_share"] for o in over if o.get("overthink_share") is not None]
    fixed = [o["fix_share"] for o in over if o.get("fix_share") is not None]
    if not hurt or not fixed:
        return {"claim": "latent overthinking is measured", "holds": False, "detail": "no figures"}
    return {"claim": "latent overthinking is measured", "holds": True,
            "detail": f"depth 1 turns {statistics.fmean(hurt):.1%} of right first-pass tokens wrong and fixes "
                      f"{statistics.fmean(fixed):.1%} of the wrong ones (paper: 2.1% and 8.7%)"}
