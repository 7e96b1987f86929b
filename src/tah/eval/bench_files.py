"""samples.jsonl and summary.json of `tah eval` and `tah grade`: records, pass@k, atomic writes.

A record (one line of samples.jsonl) is one sample of one problem:

    {"id", "sample" (0-based index), "prompt", "completion", "extracted", "gold", "correct",
     "tokens" (generated, EOS included; None if unknown), "iterated_share" (of those tokens, that
     got more than one pass; None if unknown), "passes" (passes per generated token, if known)}

summary.json:

    {"task", "model", "n" (problems graded), "samples" (K), "accuracy" (mean over all samples:
     mean@k), "pass_at_k" ({"1": ..., "K": ...}, unbiased, over the problems with >= k samples),
     "iterated_share" (iterated / generated tokens over all samples; None without pass counts),
     "tokens" (generated, all samples), "tokens_per_second" (None for `tah grade`),
     "skipped" (malformed data rows), "settings": {...}}
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from math import comb
from pathlib import Path

from tah.errors import InputError


def write_atomic(path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def remove_stale_temporaries(directory) -> None:
    """Delete the temporary files that a run killed inside `write_atomic` left in `directory`."""
    for name in ("samples.jsonl", "summary.json"):
        for stale in Path(directory).glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def write_samples(path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def write_summary(path, summary: dict) -> None:
    write_atomic(path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def read_samples(path) -> list[dict]:
    """The records of a samples.jsonl written by `write_samples` ([] if there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(f"{path} line {number} is not JSON; it was not written by tah eval: "
                                 "give another --out or delete the file") from None
    return records


def read_summary(path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise InputError(f"{path} is not JSON; give another --out or delete the file") from None


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased pass@k estimate from `samples` samples of which `correct` passed (Chen et al. 2021)."""
    if samples - correct < k:
        return 1.0
    return 1.0 - comb(samples - correct, k) / comb(samples, k)


def iterated(record: dict) -> int | None:
    """How many of the record's generated tokens got more than one pass (None if unknown)."""
    if record.get("passes") is not None:
        return sum(1 for p in record["passes"] if p > 1)
    if record.get("tokens") is not None and record.get("iterated_share") is not None:
        return round(record["tokens"] * record["iterated_share"])
    return None


def summarize(records: list[dict], *, task: str, model: str | None, skipped: int, settings: dict,
              tokens_per_second: float | None) -> dict:
    """summary.json's content (see the module docstring) for these records."""
    by_problem = defaultdict(list)
    for record in records:
        by_problem[record["id"]].append(bool(record["correct"]))
    counts = [len(results) for results in by_problem.values()]
    most = max(counts, default=0)
    pass_k = {}
    for k in sorted({1, most}):
        ranked = [pass_at_k(len(results), sum(results), k) for results in by_problem.values() if len(results) >= k]
        if ranked:
            pass_k[str(k)] = sum(ranked) / len(ranked)
    tokens = [record.get("tokens") for record in records]
    deep = [iterated(record) for record in records]
    known_tokens = bool(records) and None not in tokens
    known_depth = known_tokens and None not in deep
    generated = sum(tokens) if known_tokens else None
    return {
        "task": task,
        "model": model,
        "n": len(by_problem),
        "samples": most,
        "accuracy": sum(bool(r["correct"]) for r in records) / len(records) if records else None,
        "pass_at_k": pass_k,
        "iterated_share": sum(deep) / generated if known_depth and generated else None,
        "tokens": generated,
        "tokens_per_second": tokens_per_second,
        "skipped": skipped,
        "settings": settings,
    }
