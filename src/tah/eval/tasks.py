"""Benchmark files as problems: an id, the question put to the model, the gold answer, and extras.

Tasks (local files only; ../shared/benchmarks/README.md lists the copies and their fields):

    gsm8k      `question`, `answer`: the gold is the number after `####` (thousands commas dropped)
    math500, aime24, aime25, amc23, math
               `problem` (or `question`) and `answer` (LaTeX or a number); `math` takes any such JSONL
    humaneval  `task_id`, `prompt` (the question), `test`, `entry_point`; `canonical_solution` is the gold

An id is the row's `id` field (HumanEval: `task_id`) or else its 0-based line number, always as a
string. Malformed rows (bad JSON, a missing or empty field, a GSM8K answer without `####`, a repeated
id) are skipped and reported, or raise `InputError` with `strict=True`. Standard library only: the
CLI checks data before it loads torch.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tah.errors import InputError


@dataclass(frozen=True)
class Task:
    name: str
    grader: str  # "math" (math-verify on the answer) or "code" (the tests in a sandbox)
    question_fields: tuple[str, ...]  # the first one present is the question
    answer_field: str
    id_field: str = "id"
    extra_fields: tuple[str, ...] = ()  # required, kept in Problem.extras
    file_hint: str = ""  # the file in ../shared/benchmarks/, for error messages


_MATH = dict(grader="math", question_fields=("problem", "question"), answer_field="answer")
TASKS = {task.name: task for task in (
    Task("gsm8k", "math", ("question",), "answer", file_hint="gsm8k_test.jsonl"),
    Task("math500", **_MATH, file_hint="math500.jsonl"),
    Task("aime24", **_MATH, file_hint="aime24.jsonl"),
    Task("aime25", **_MATH, file_hint="aime25.jsonl"),
    Task("amc23", **_MATH, file_hint="amc23.jsonl"),
    Task("math", **_MATH),
    Task("humaneval", "code", ("prompt",), "canonical_solution", id_field="task_id",
         extra_fields=("test", "entry_point"), file_hint="humaneval.jsonl.gz"),
)}
GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


@dataclass(frozen=True)
class Problem:
    id: str
    question: str  # the text put to the model (HumanEval: the function's signature and docstring)
    gold: str  # the reference answer (HumanEval: the canonical solution's body)
    extras: dict = field(default_factory=dict)  # HumanEval: prompt, test, entry_point


@dataclass
class Loaded:
    problems: list[Problem]
    skipped: list[str]  # one line per malformed row: "FILE row N: what is wrong"

    def skipped_summary(self, path) -> str:
        return f"skipped {len(self.skipped)} malformed rows of {path} (--strict fails on the first instead)"


def get_task(name: str | None) -> Task:
    """The task called `name`; raises `InputError` naming the choices otherwise."""
    if name not in TASKS:
        raise InputError(f"--task {name!r} is not a task; choose one of {', '.join(TASKS)} "
                         "('math' takes any JSONL with a question/problem and an answer field)")
    return TASKS[name]


def load_problems(task: Task | str, path, *, strict: bool = False) -> Loaded:
    """Read the benchmark file at `path` (JSONL, or gzipped JSONL if it ends in .gz) for `task`.

    Returns the problems in file order and the skipped rows' descriptions. Raises `InputError` if
    the file is missing or unreadable, holds no usable row, or (strict) on the first malformed row.
    """
    task = get_task(task) if isinstance(task, str) else task
    path = Path(path)
    if not path.is_file():
        hint = f" (e.g. ../shared/benchmarks/{task.file_hint})" if task.file_hint else ""
        raise InputError(f"--data {path}: no such file; give the {task.name} benchmark's JSONL{hint}")
    problems, skipped, seen = [], [], set()
    for line_number, line in enumerate(_lines(path)):
        if not line.strip():
            continue
        try:
            problem = _problem(task, line, line_number)
            if problem.id in seen:
                raise ValueError(f"repeated id {problem.id!r}")
        except ValueError as err:
            message = f"{path} row {line_number}: {err}"
            if strict:
                raise InputError(f"{message}; fix the row, or drop --strict to skip it") from None
            skipped.append(message)
            continue
        seen.add(problem.id)
        problems.append(problem)
    if not problems:
        first = f" (first: {skipped[0]})" if skipped else ""
        raise InputError(f"--data {path} holds no usable {task.name} rows{first}")
    return Loaded(problems, skipped)


def _lines(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            yield from handle
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise InputError(f"--data {path}: cannot read it ({err}); give a UTF-8 JSONL file "
                         "(gzipped if its name ends in .gz)") from None


def _problem(task: Task, line: str, line_number: int) -> Problem:
    """One row as a Problem; raises ValueError saying what is wrong with it."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    question_field = next((name for name in task.question_fields if name in row), task.question_fields[0])
    question = _text(row, question_field)
    if task.grader == "code":  # the tests grade; the canonical solution is only for reference
        gold = row.get(task.answer_field) if isinstance(row.get(task.answer_field), str) else ""
    else:
        gold = _text(row, task.answer_field)
    if task.name == "gsm8k":
        final = GSM8K_FINAL.search(gold)
        if final is None:
            raise ValueError(f"'{task.answer_field}' has no final answer after '####'")
        gold = final.group(1).replace(",", "")
    extras = {name: _text(row, name) for name in task.extra_fields}
    if task.grader == "code":
        extras["prompt"] = question
    row_id = row.get(task.id_field, line_number)
    if not isinstance(row_id, str | int) or isinstance(row_id, bool) or row_id == "":
        raise ValueError(f"'{task.id_field}' must be a string or an integer; got {row_id!r}")
    return Problem(str(row_id), question, gold, extras)


def _text(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        raise ValueError(f"no '{name}' field")
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # answers written as JSON numbers
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{name}' must be a non-empty string; got {value!r}")
    return value
