"""Graders: math-verify on written answers, HumanEval's tests in the sandbox, and `tah grade` end to end."""

from __future__ import annotations

import builtins
import gzip
import itertools
import json
import os
import re
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

from tah.eval.bench_files import pass_at_k
from tah.eval.grading import code_of, grade_code, grade_math
from tah.eval.sandbox import network_namespace_prefix, run_program
from tah.eval.tasks import Problem, load_problems

# Copies of the benchmark files (HumanEval and MATH-500 whole, GSM8K's first 400 test rows; all MIT), so
# that these tests run wherever the suite does; tests/fixtures/README.md gives their sources.
COPIES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
HUMANEVAL = COPIES / "humaneval.jsonl.gz"


def tah_grade(task: str, data: Path, samples: list[dict], out: Path, *extra) -> tuple[dict, list[dict]]:
    """Run the real `tah grade` on these sample lines; its summary and graded records."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "input.jsonl"
    path.write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    result = subprocess.run([sys.executable, "-m", "tah.cli", "grade", "--task", task, "--data", str(data),
                             "--samples", str(path), "--out", str(out), "--no-progress", *map(str, extra)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), records


# -- math ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gold, answer", [
    ("0.5", "\\boxed{\\frac{1}{2}}"), ("\\frac{1}{2}", "so it is \\boxed{0.5}."), ("1000", "\\boxed{1,000}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3,\\pi/2)}"), ("18", "She makes \\boxed{\\$18}"),
    ("18", "\\boxed{18 \\text{ dollars}}"), ("18", "16 - 3 - 4 = 9 eggs, 9 * 2 = 18\n#### 18"),
    ("18", "We get 9 eggs. The answer is 18."), ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}"),
])
def test_written_forms_of_one_answer_are_equal(gold, answer):
    assert grade_math(answer, gold).correct


@pytest.mark.parametrize("gold, answer", [
    ("0.5", "\\boxed{\\frac{1}{3}}"), ("1000", "\\boxed{1,001}"), ("18", "The answer is 18, no: \\boxed{19}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(\\pi/2, 3)}"), ("18", "no number at all"), ("18", ""),
])
def test_other_answers_are_wrong(gold, answer):
    assert not grade_math(answer, gold).correct


def shift_digits(text: str) -> str:
    return re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), text)


def math500_forms(gold: str) -> list[str]:
    """The gold answer written as a solver might: boxed, in a sentence after other numbers, \\dfrac,
    fractions as decimals or a/b, decimals as fractions, integers with thousands separators or bare."""
    display = gold.replace("\\frac", "\\dfrac")
    forms = [f"\\boxed{{{gold}}}", f"First $x = 7$ and $y = 12$, so 19 in all.\nThe final answer is $\\boxed{{{gold}}}$.",
             f"\\boxed{{{display}}}"]
    fraction = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", gold)
    if fraction:
        value = Fraction(int(fraction[2]), int(fraction[3])) * (-1 if fraction[1] else 1)
        forms.append(f"\\boxed{{{value.numerator}/{value.denominator}}}")
        if finite_decimal(value.denominator):
            forms.append(f"\\boxed{{{float(value)}}}")
    if re.fullmatch(r"-?\d+\.\d+", gold):
        value = Fraction(gold)
        forms.append(f"\\boxed{{\\frac{{{value.numerator}}}{{{value.denominator}}}}}")
    if re.fullmatch(r"-?\d+", gold):
        forms += [f"\\boxed{{{int(gold):,}}}", f"The answer is {gold}."]
    return forms


def finite_decimal(denominator: int) -> bool:
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return denominator == 1


def math500_altered(gold: str) -> str:
    """Another answer: every digit moved up by one; without digits, letters of \\text{} moved, or + 1."""
    if re.search(r"\d", gold):
        return shift_digits(gold)
    if "\\text{" in gold:
        return re.sub(r"\\text\{([^}]*)\}", lambda m: "\\text{" + re.sub(
            r"[A-Za-z]", lambda c: chr(ord(c.group()) + 1) if c.group() not in "zZ" else "a", m[1]) + "}", gold)
    return f"{gold} + 1"


def test_math500_gold_answers_in_several_forms_all_pass_and_altered_ones_all_fail(tmp_path):
    data = COPIES / "math500.jsonl.gz"
    rows = [json.loads(line) for line in gzip.open(data, "rt")]
    right = [{"id": row["id"], "completion": form} for row in rows for form in math500_forms(row["answer"])]
    summary, records = tah_grade("math500", data, right, tmp_path / "right")
    assert len(right) > 3 * 500 and summary["n"] == 500 and summary["skipped_samples"] == 0
    assert summary["accuracy"] == 1.0, [(r["gold"], r["completion"]) for r in records if not r["correct"]][:10]
    wrong = [{"id": row["id"], "completion": f"The answer is $\\boxed{{{math500_altered(row['answer'])}}}$."}
             for row in rows]
    summary, records = tah_grade("math500", data, wrong, tmp_path / "wrong")
    assert summary["accuracy"] == 0.0, [(r["gold"], r["completion"]) for r in records if r["correct"]][:10]


def gsm8k_forms(gold: str) -> list[str]:
    value = int(gold)
    return [f"\\boxed{{{value}}}", f"\\boxed{{{value:,}}}", f"She pays \\boxed{{\\${value:,}}}.",
            f"\\boxed{{{value} \\text{{ dollars}}}}", f"\\boxed{{{value}.00}}", f"\\boxed{{\\frac{{{2 * value}}}{{2}}}}",
            f"3 + 4 = 7 and 7 * 2 = 14.\nThe answer is {value:,}.", f"#### {value:,}"]


def test_gsm8k_gold_answers_in_several_forms_all_pass_and_altered_ones_all_fail(tmp_path):
    data = COPIES / "gsm8k_test.jsonl.gz"
    problems = load_problems("gsm8k", data).problems[:400]
    solutions = [json.loads(line)["answer"] for line in gzip.open(data, "rt")][:400]
    right = [{"id": int(p.id), "completion": form} for p, solution in zip(problems, solutions, strict=True)
             for form in [*gsm8k_forms(p.gold), solution]]  # the reference solution itself, "#### n" last
    summary, records = tah_grade("gsm8k", data, right, tmp_path / "right")
    assert summary["n"] == 400 and summary["samples"] == 9
    assert summary["accuracy"] == 1.0, [(r["gold"], r["completion"]) for r in records if not r["correct"]][:10]
    wrong = [{"id": p.id, "completion": form} for p in problems
             for form in (f"\\boxed{{{int(p.gold) + 1:,}}}", f"The answer is {int(p.gold) * 10}.")]
    summary, records = tah_grade("gsm8k", data, wrong, tmp_path / "wrong")
    assert summary["accuracy"] == 0.0, [(r["gold"], r["completion"]) for r in records if r["correct"]][:10]


# -- code ----------------------------------------------------------------------------------------------------


def test_humaneval_canonical_solutions_pass_164_of_164(tmp_path):
    rows = [json.loads(line) for line in gzip.open(HUMANEVAL, "rt")]
    started = time.perf_counter()
    summary, records = tah_grade("humaneval", HUMANEVAL, [{"id": row["task_id"], "completion": row["canonical_solution"]}
                                                          for row in rows], tmp_path)
    assert summary["n"] == 164 and summary["accuracy"] == 1.0, [r["error"] for r in records if not r["correct"]][:3]
    assert time.perf_counter() - started < 60


BAD = {  # HumanEval/0's entry point written to misbehave; none may stop the grader or pass
    "loops forever": "    while True:\n        pass\n",
    "calls sys.exit": "    import sys\n    sys.exit(0)\n",
    "exits the process": "    import os\n    os._exit(0)\n",
    "allocates without bound": "    hoard = []\n    while True:\n        hoard.append(' ' * 10**7)\n",
    "opens a socket": "    import socket\n    socket.create_connection(('1.1.1.1', 80), timeout=1)\n    return True\n",
    "forks a child that loops": "    import os\n    if os.fork() == 0:\n        while True:\n            pass\n"
                                "    while True:\n        pass\n",
}


def test_misbehaving_solutions_fail_within_the_time_limit_and_the_grader_goes_on(tmp_path):
    canonical = json.loads(gzip.open(HUMANEVAL, "rt").readline())["canonical_solution"]
    samples = [{"id": "HumanEval/0", "sample": i, "completion": body} for i, body in enumerate(BAD.values())]
    samples.append({"id": "HumanEval/0", "sample": len(BAD), "completion": canonical})  # graded after them
    started = time.perf_counter()
    summary, records = tah_grade("humaneval", HUMANEVAL, samples, tmp_path, "--timeout", 3, "--memory-mb", 256)
    assert time.perf_counter() - started < 30
    verdicts = {name: (r["correct"], r["error"]) for name, r in zip(BAD, records, strict=False)}
    assert not any(correct for correct, _ in verdicts.values()) and records[-1]["correct"]
    assert "time limit" in verdicts["loops forever"][1] and "time limit" in verdicts["forks a child that loops"][1]
    assert verdicts["calls sys.exit"][1] == "SystemExit: 0"
    assert verdicts["allocates without bound"][1].startswith("MemoryError")
    assert verdicts["opens a socket"][1].startswith("OSError")
    assert summary["pass_at_k"]["1"] == pytest.approx(1 / 7)


def test_the_raw_socket_module_finds_no_network_where_namespaces_exist():
    if not network_namespace_prefix():
        pytest.skip("unshare --net is not available here: only the socket module is blocked")
    result = run_program("import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))\n")
    assert result.status == "failed" and "unreachable" in result.detail


def test_the_grading_process_never_runs_the_completion(tmp_path):
    """The completion records the process it ran in and tries to leave traces in it."""
    trace = tmp_path / "ran-in"
    problem = Problem("p", "def f():\n", "", {"prompt": "def f():\n", "entry_point": "f",
                                              "test": "def check(candidate):\n    assert candidate() == 1\n"})
    completion = (f"    import os, builtins, sys\n    open({str(trace)!r}, 'w').write(str(os.getpid()))\n"
                  "    builtins.TAH_WAS_HERE = True\n    sys.modules['tah_was_here'] = sys\n    return 1\n")
    modules = set(sys.modules)
    [result] = grade_code([problem], [completion])
    assert result.correct and int(trace.read_text()) != os.getpid()
    assert not hasattr(builtins, "TAH_WAS_HERE") and "tah_was_here" not in sys.modules
    assert not {name for name in set(sys.modules) - modules if "program" in name}


def test_a_chat_answer_with_the_whole_function_in_a_code_block_is_run_after_the_prompt():
    problem = Problem("p", "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "",
                      {"prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "entry_point": "add",
                       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"})
    chat = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds."
    assert code_of(problem, chat) == "\ndef add(a, b):\n    return a + b\n"
    assert code_of(problem, "    return a + b\n") == "    return a + b\n"  # a continuation of the prompt
    results = grade_code([problem] * 3, [chat, "    return a + b\n", "I would add them."])
    assert [r.correct for r in results] == [True, True, False]


# -- tah grade's files ---------------------------------------------------------------------------------------


def test_pass_at_k_is_the_unbiased_estimate():
    """pass@k = the chance that k of the n samples, drawn without replacement, hold a correct one."""
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (4, 4, 2), (7, 3, 7)]:
        outcomes = [True] * c + [False] * (n - c)
        draws = list(itertools.combinations(outcomes, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))


def test_grade_reads_passes_and_counts_bad_lines(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(3)))
    samples = [{"id": 0, "completion": "\\boxed{0}", "iter_counts": [1, 2, 1, 1, 0, 0]},
               {"id": "0", "completion": "\\boxed{1}", "passes": [2, 2]},
               {"id": 1, "completion": "\\boxed{2}", "passes": [1, 1, 1, 1]},
               {"id": 2, "completion": "\\boxed{5}", "passes": [1, 1]},
               {"id": 9, "completion": "\\boxed{18}"}, {"id": 1, "answer": "2"}]
    summary, records = tah_grade("math", data, samples, tmp_path / "out")
    assert [(r["id"], r["sample"], r["correct"], r["tokens"]) for r in records] == [
        ("0", 0, True, 4), ("0", 1, False, 2), ("1", 0, True, 4), ("2", 0, False, 2)]
    assert summary["skipped_samples"] == 2 and summary["n"] == 3 and summary["accuracy"] == 0.5
    assert summary["iterated_share"] == pytest.approx(3 / 12) and summary["tokens"] == 12
    assert summary["tokens_per_second"] is None and summary["samples"] == 2
    assert summary["pass_at_k"] == {"1": pytest.approx((0.5 + 1 + 0) / 3), "2": 1.0}  # only id 0 has 2 samples
    assert set(summary["settings"]) >= {"threshold", "max_iter", "temperature", "greedy", "samples", "seed"}
