"""`tah grade`: grade completions made anywhere else with `tah eval`'s graders and files.

The input is a JSONL of {"id", "completion"}, optionally with "sample" (its index; default: the
order of that id's lines), "prompt", "tokens", and "passes" or "iter_counts" (passes per generated
token; zeros, i.e. padding, are dropped), which give the iterated share. `id` is the benchmark
row's id (HumanEval: its task_id; files without ids: the row's 0-based line number), as a string
or an integer. Malformed lines (bad JSON, no id or completion, an id not in the data, a repeated
(id, sample)) are skipped and counted, or raise `InputError` with `strict=True`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tah.errors import InputError
from tah.eval.bench_files import summarize, write_samples, write_summary
from tah.eval.sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S
from tah.eval.tasks import Loaded, Task

SETTINGS = ("threshold", "max_iter", "temperature", "top_p", "top_k", "max_new_tokens", "greedy",
            "prompt_template", "samples", "limit", "seed")
CHUNK = 64  # completions graded between progress updates


def grade_file(task: Task, loaded: Loaded, samples, out, *, strict: bool = False,
               timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB, workers: int | None = None,
               progress: bool = True) -> tuple[dict, list[str]]:
    """Grade completions made anywhere else with tah eval's graders: SAMPLES is a JSONL of {"id",
    "completion"} lines (optionally "sample", "prompt", "tokens", and "passes" or "iter_counts", the
    passes per generated token, which give the iterated share). `id` is the benchmark row's `id` field,
    or else its 0-based line number; HumanEval's is its task_id. Writes OUT/samples.jsonl and
    OUT/summary.json as tah eval does.

      tah grade --task humaneval --data ../shared/benchmarks/humaneval.jsonl.gz --samples done.jsonl --out graded

    Args:
        task, loaded: the benchmark and its problems (`tah.eval.tasks.get_task`, `load_problems`).
        samples, out: the completions file and the output directory.
        strict: raise on the first malformed line instead of skipping it.
        timeout_s, memory_mb, workers, progress: as `grade_completions` takes them.
    Returns:
        (the summary written to OUT/summary.json, a description of each skipped line).
    Raises:
        InputError: no such file, no usable line, or (with `strict`) a malformed one.
    """
    records, skipped = read_completions(samples, loaded, strict=strict)
    grade_completions(task, loaded, records, timeout_s=timeout_s, memory_mb=memory_mb, workers=workers,
                      progress=progress)
    return write_graded(out, task, records, len(loaded.skipped), len(skipped)), skipped


def read_completions(path, loaded: Loaded, *, strict: bool = False) -> tuple[list[dict], list[str]]:
    """The input lines as records (id, sample, prompt, completion, gold, tokens, iterated_share,
    passes), in file order, and descriptions of the skipped lines."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--samples {path}: no such file; give a JSONL of {{\"id\", \"completion\"}} lines")
    problems = {problem.id: problem for problem in loaded.problems}
    records, skipped, seen, counts = [], [], set(), {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                record = _record(line, problems, counts)
                if (record["id"], record["sample"]) in seen:
                    raise ValueError(f"repeated sample {record['sample']} of id {record['id']!r}")
            except ValueError as err:
                message = f"{path} line {number}: {err}"
                if strict:
                    raise InputError(f"{message}; fix the line, or drop --strict to skip it") from None
                skipped.append(message)
                continue
            seen.add((record["id"], record["sample"]))
            records.append(record)
    if not records:
        first = f" (first: {skipped[0]})" if skipped else ""
        raise InputError(f"--samples {path} holds no usable completions{first}")
    return records, skipped


def grade_completions(task: Task, loaded: Loaded, records: list[dict], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                      memory_mb: int = DEFAULT_MEMORY_MB, workers: int | None = None,
                      progress: bool = True) -> list[dict]:
    """Fill each record's "extracted" and "correct" (and "error" for failed code)."""
    from tqdm.auto import tqdm

    from tah.eval.grading import grade

    problems = {problem.id: problem for problem in loaded.problems}
    with tqdm(total=len(records), desc=f"grading {task.name}", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(records), CHUNK):
            chunk = records[start:start + CHUNK]
            grades = grade(task, [problems[r["id"]] for r in chunk], [r["completion"] for r in chunk],
                           timeout_s=timeout_s, memory_mb=memory_mb, workers=workers)
            for record, result in zip(chunk, grades, strict=True):
                record["extracted"], record["correct"] = result.extracted, result.correct
                if result.detail:
                    record["error"] = result.detail
            bar.update(len(chunk))
    return records


def write_graded(out, task: Task, records: list[dict], skipped_rows: int, skipped_lines: int) -> dict:
    """OUT/samples.jsonl and OUT/summary.json (as `tah eval` writes them); returns the summary."""
    summary = summarize(records, task=task.name, model=None, skipped=skipped_rows, settings=dict.fromkeys(SETTINGS),
                        tokens_per_second=None)
    summary["settings"]["samples"] = summary["samples"]  # the only setting known here: the rest were elsewhere
    summary["skipped_samples"] = skipped_lines
    write_samples(Path(out) / "samples.jsonl", records)
    write_summary(Path(out) / "summary.json", summary)
    return summary


def _record(line: str, problems: dict, counts: dict) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    raw_id, completion = row.get("id"), row.get("completion")
    if not isinstance(raw_id, str | int) or isinstance(raw_id, bool):
        raise ValueError(f"'id' must be a string or an integer; got {raw_id!r}")
    if not isinstance(completion, str):
        raise ValueError(f"'completion' must be a string; got {completion!r}")
    problem = problems.get(str(raw_id))
    if problem is None:
        raise ValueError(f"id {raw_id!r} is not in the data")
    sample = row.get("sample", counts.get(problem.id, 0))
    if not isinstance(sample, int) or isinstance(sample, bool) or sample < 0:
        raise ValueError(f"'sample' must be an integer >= 0; got {sample!r}")
    counts[problem.id] = max(counts.get(problem.id, 0), sample + 1)
    passes = row.get("passes", row.get("iter_counts"))
    if passes is not None:
        if not isinstance(passes, list) or not all(isinstance(p, int) for p in passes):
            raise ValueError("'passes' / 'iter_counts' must be a list of integers")
        passes = [p for p in passes if p > 0]
    tokens = len(passes) if passes is not None else row.get("tokens")
    if tokens is not None and (not isinstance(tokens, int) or tokens < 0):
        raise ValueError(f"'tokens' must be an integer >= 0; got {tokens!r}")
    share = sum(1 for p in passes if p > 1) / len(passes) if passes else (0.0 if passes == [] else None)
    return {"id": problem.id, "sample": sample, "prompt": row.get("prompt", problem.question),
            "completion": completion, "extracted": None, "gold": problem.gold, "correct": False,
            "tokens": tokens, "iterated_share": share, "passes": passes}
