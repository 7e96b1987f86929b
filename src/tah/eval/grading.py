"""Graders, as the field grades these benchmarks.

Math (GSM8K, MATH-500, AIME, AMC): math-verify parses the completion (its last `\\boxed{}` answer
first, else what follows GSM8K's `####`, else the last LaTeX or plain-number expression) and checks it against the gold, written as
`\\boxed{gold}`, symbolically and numerically: `\\frac{1}{2}` = `0.5`, `1,000` = `1000`,
`\\$18` = `18 \\text{ dollars}` = `18`, `\\left( 3, \\frac{\\pi}{2} \\right)` = `(3,\\pi/2)`.

Code (HumanEval): the program `prompt + completion + test + check(entry_point)` runs in
`tah.eval.sandbox`, never in this process. A chat answer that writes the whole function (in a
```python block or bare) is put after the prompt instead, so its definition replaces the stub's.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass

from tah.eval.sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, run_programs
from tah.eval.tasks import Problem, Task

MATH_TIMEOUT_S = 5  # math-verify's own limit per parse or comparison (signal based: main thread only)
HASHES_FINAL = re.compile(r"####[ \t]*([^\n]*\S)")  # GSM8K's final-answer line, "#### 18"
FENCED = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


@dataclass(frozen=True)
class Grade:
    correct: bool
    extracted: str | None  # math: the answer math-verify read; code: the code that ran after the prompt
    detail: str = ""  # code: why it failed (the exception, or the time limit)


def grade(task: Task, problems: list[Problem], completions: list[str], *, timeout_s: float = DEFAULT_TIMEOUT_S,
          memory_mb: int = DEFAULT_MEMORY_MB, workers: int | None = None) -> list[Grade]:
    """Grade completions[i] as an answer to problems[i] with the task's grader."""
    if task.grader == "code":
        return grade_code(problems, completions, timeout_s=timeout_s, memory_mb=memory_mb, workers=workers)
    return [grade_math(completion, problem.gold) for problem, completion in zip(problems, completions, strict=True)]


def grade_math(completion: str, gold: str) -> Grade:
    """Is the completion's final answer equal to `gold` (LaTeX or a number)? Never raises."""
    from math_verify import parse, verify

    timeout = _math_timeout()
    finals = [] if "\\boxed" in completion else HASHES_FINAL.findall(completion)
    try:
        answer = parse(finals[-1] if finals else completion, parsing_timeout=timeout)
        correct = bool(answer) and bool(verify(_parsed_gold(gold), answer, timeout_seconds=timeout))
    except Exception:  # math-verify may raise on odd input (or time out): a wrong answer
        return Grade(False, None)
    return Grade(correct, str(answer[-1]) if answer else None)


def grade_code(problems: list[Problem], completions: list[str], *, timeout_s: float = DEFAULT_TIMEOUT_S,
               memory_mb: int = DEFAULT_MEMORY_MB, workers: int | None = None) -> list[Grade]:
    """Run each problem's tests on its completion in the sandbox, `workers` at a time."""
    pieces = [code_of(problem, completion) for problem, completion in zip(problems, completions, strict=True)]
    programs = [program_of(problem, piece) for problem, piece in zip(problems, pieces, strict=True)]
    results = run_programs(programs, timeout_s=timeout_s, memory_mb=memory_mb, workers=workers)
    return [Grade(result.passed, piece, result.detail) for piece, result in zip(pieces, results, strict=True)]


def code_of(problem: Problem, completion: str) -> str:
    """The code to run after the prompt: the last fenced block (or the bare completion) that defines
    the entry point as a whole function, else the completion itself (a continuation of the prompt)."""
    defines = re.compile(rf"^def {re.escape(problem.extras['entry_point'])}\s*\(", re.M)
    blocks = FENCED.findall(completion)
    whole = next((block for block in reversed(blocks) if defines.search(block)), None)
    if whole is None and not blocks and defines.search(completion):
        whole = completion
    return completion if whole is None else "\n" + whole


def program_of(problem: Problem, code: str) -> str:
    """prompt + code + the benchmark's tests + the call of its check on the entry point."""
    return f"{problem.extras['prompt']}{code}\n\n{problem.extras['test']}\n\ncheck({problem.extras['entry_point']})\n"


@functools.lru_cache(maxsize=4096)
def _parsed_gold(gold: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(f"\\boxed{{{gold}}}", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=_math_timeout())


def _math_timeout() -> int | None:
    # math-verify times out with signal.alarm, which works in the main thread only.
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
