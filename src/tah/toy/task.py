"""A synthetic reasoning task: multi-step arithmetic written out step by step.

    question  "47+38-21=?"
    solution  "47+38=85\\n85-21=64\\n#### 64"
    answer    64

Most solution characters are copies (operands from the question, the previous step's result, the
final answer), which a small model learns quickly: easy tokens. The digits of each step's result
have to be computed (carries, borrows): hard tokens, about 15-25% of the solution's characters
(`hard_share`). That is the shape of real reasoning text that Think-at-Hard exploits.

Everything is a function of a seed. Train and held-out problems are disjoint by construction: a
question belongs to the held-out side iff a hash of its text falls below `heldout_fraction`, so
no held-out question can ever be generated for training, whatever the seeds or sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tah.errors import InputError

SPLITS = ("train", "heldout")
ANSWER_MARK = "####"
_ANSWER = re.compile(r"####\s*(-?\d+)")


@dataclass(frozen=True)
class TaskConfig:
    """How hard the problems are and how many of them to make.

    Measured on one CPU thread with a Qwen3 of hidden 64, 2 layers (105k parameters), batch 64,
    AdamW 3e-3: the default reaches ~98.7% held-out next-token accuracy (~94% on computed digits)
    and ~66% exact answers after ~2400 steps; `quick` ~99.6% and ~91% after ~2100 steps, with
    ~8% of tokens still wrong after 500 steps. Copied characters are right from early on.

    terms: (min, max) operands per question (>= 2); digits: (min, max) digits per operand;
    ops: the operators to draw from ("+" or "+-"; a "-" that would go below zero becomes "+");
    heldout_fraction: the share of the question space (by hash) reserved for held-out problems;
    width: 0 writes numbers as they are; > 0 writes every number with `width` digits, zero-padded
    ("047+038=0085"), so that digits of equal place sit at equal offsets and a small model learns
    the carries in hundreds of steps rather than thousands (it must hold the largest sum).
    carry_chains: the chance that a digit of each added operand is set so that its place passes a
    carry straight through (the digits sum to 9; for "-", equal digits pass a borrow). A result
    digit above such a place depends on a carry decided two or more places down, which is what a
    3-layer pass still gets wrong after training (experiments/toy-depth, round 7): this makes those
    tokens common enough to learn. 0 draws the problems of earlier versions, digit for digit.
    """

    terms: tuple[int, int] = (3, 4)
    digits: tuple[int, int] = (2, 3)
    ops: str = "+-"
    train_size: int = 6000
    heldout_size: int = 200
    heldout_fraction: float = 0.1
    seed: int = 0
    width: int = 0
    carry_chains: float = 0.0

    def __post_init__(self) -> None:
        for name, low in (("terms", 2), ("digits", 1)):
            value = getattr(self, name)
            if (not isinstance(value, tuple | list) or len(value) != 2 or not all(isinstance(v, int) for v in value)
                    or not low <= value[0] <= value[1]):
                raise InputError(f"TaskConfig.{name} must be a (min, max) pair of integers with {low} <= min <= max; "
                                 f"got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.ops or set(self.ops) - {"+", "-"}:
            raise InputError(f"TaskConfig.ops must be made of '+' and '-'; got {self.ops!r}")
        if not isinstance(self.carry_chains, int | float) or not 0.0 <= self.carry_chains <= 1.0:
            raise InputError(f"TaskConfig.carry_chains must be in [0, 1]; got {self.carry_chains!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise InputError(f"TaskConfig.heldout_fraction must be in (0, 1); got {self.heldout_fraction!r}")
        largest = self.terms[1] * (10 ** self.digits[1] - 1)
        if not isinstance(self.width, int) or self.width < 0 or 0 < self.width < len(str(largest)):
            raise InputError(f"TaskConfig.width must be 0 (no padding) or at least {len(str(largest))} (the digits "
                             f"of the largest sum, {largest}); got {self.width!r}")
        for name in ("train_size", "heldout_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InputError(f"TaskConfig.{name} must be an integer >= 0; got {getattr(self, name)!r}")

    @classmethod
    def quick(cls, **changes) -> TaskConfig:
        """The `--quick` size: shorter problems, fewer of them (minutes of CPU training)."""
        values = dict(terms=(2, 3), digits=(2, 3), ops="+", train_size=3000, heldout_size=100)
        values.update(changes)
        return cls(**values)


@dataclass(frozen=True)
class Problem:
    question: str  # "47+38-21=?"
    solution: str  # "47+38=85\n85-21=64\n#### 64"
    answer: int

    def messages(self) -> list[dict[str, str]]:
        """The chat form: [user: question, assistant: solution]."""
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.solution}]


def solve(operands: list[int], ops: list[str], width: int = 0) -> Problem:
    """The problem of `operands[0] ops[0] operands[1] ...`, its step-by-step solution and answer;
    numbers zero-padded to `width` digits when it is > 0 (see `TaskConfig.width`)."""
    if len(operands) != len(ops) + 1 or len(operands) < 2:
        raise InputError(f"need one operator fewer than operands (and >= 2 operands); got {operands!r}, {ops!r}")
    n = lambda x: str(x).zfill(width)  # noqa: E731
    question = n(operands[0]) + "".join(op + n(x) for op, x in zip(ops, operands[1:], strict=True)) + "=?"
    total, lines = operands[0], []
    for op, x in zip(ops, operands[1:], strict=True):
        result = total + x if op == "+" else total - x
        lines.append(f"{n(total)}{op}{n(x)}={n(result)}")
        total = result
    lines.append(f"{ANSWER_MARK} {n(total)}")
    return Problem(question, "\n".join(lines), total)


def hard_chars(problem: Problem) -> list[bool]:
    """Per character of the solution: True where it is computed (a digit of a step's result), False
    where it is copied (operands, operators, the final answer line) or layout."""
    mask = []
    for line in problem.solution.split("\n"):
        if "=" in line:
            head, result = line.split("=", 1)
            mask += [False] * (len(head) + 1) + [True] * len(result)
        else:
            mask += [False] * len(line)
        mask.append(False)  # the newline
    return mask[:len(problem.solution)]


def hard_share(problems: list[Problem]) -> float:
    """Share of solution characters that are computed (see `hard_chars`), EOS not counted."""
    marks = [m for p in problems for m in hard_chars(p)]
    return sum(marks) / max(len(marks), 1)


def split_of(question: str, heldout_fraction: float) -> str:
    """"heldout" iff the question's SHA-256 falls in the first `heldout_fraction` of the hash space."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction else "train"


def make_problems(count: int, seed: int, config: TaskConfig | None = None, split: str | None = None) -> list[Problem]:
    """`count` distinct problems drawn with `seed` under `config` (defaults: `TaskConfig()`), all from
    `split` ("train", "heldout", or None for either). Deterministic per (count, seed, config, split).
    Raises `InputError` if the question space (of that split) is too small for `count`."""
    config = config or TaskConfig()
    if split is not None and split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS} or None; got {split!r}")
    rng = random.Random(f"tah.toy/{seed}/{split}")
    problems, seen = [], set()
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 100 * count + 10_000:
            raise InputError(f"only {len(problems)} distinct {split or ''} problems found for count={count}; the "
                             f"question space of {config} is too small: allow more terms or digits, or ask for fewer")
        problem = _draw(rng, config)
        if problem.question in seen or (split and split_of(problem.question, config.heldout_fraction) != split):
            continue
        seen.add(problem.question)
        problems.append(problem)
    return problems


def make_splits(config: TaskConfig | None = None) -> tuple[list[Problem], list[Problem]]:
    """(train, heldout) problems of the sizes and seed in `config`; no question is in both."""
    config = config or TaskConfig()
    return (make_problems(config.train_size, config.seed, config, "train"),
            make_problems(config.heldout_size, config.seed, config, "heldout"))


def _draw(rng: random.Random, config: TaskConfig) -> Problem:
    def operand() -> int:
        digits = rng.randint(*config.digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    operands = [operand() for _ in range(rng.randint(*config.terms))]
    ops, total = [], operands[0]
    for i, x in enumerate(operands[1:], start=1):
        op = rng.choice(config.ops)
        if config.carry_chains:  # only then: with 0, the draws of earlier versions
            x = operands[i] = _pass_through(rng, total, x, op, config.carry_chains)
        if op == "-" and x > total:  # keep every intermediate result >= 0
            op = "+"
        total = total + x if op == "+" else total - x
        ops.append(op)
    return solve(operands, ops, config.width)


def _pass_through(rng: random.Random, total: int, x: int, op: str, chance: float) -> int:
    """`x` with each of its digits, with probability `chance`, replaced by the digit that makes its
    place pass a carry (op "+": the two digits sum to 9) or a borrow ("-": equal digits) straight
    through; the leading digit stays non-zero, so `x` keeps its length."""
    digits = [int(d) for d in str(x)]
    for place in range(len(digits)):  # 0 = the lowest place
        if rng.random() < chance:
            theirs = total // 10**place % 10
            digit = 9 - theirs if op == "+" else theirs
            index = len(digits) - 1 - place
            if digit or index or len(digits) == 1:
                digits[index] = digit
    return int("".join(map(str, digits)))


def extract_answer(text: str) -> int | None:
    """The integer after the last "####" in `text`, or None if there is none."""
    found = _ANSWER.findall(text)
    return int(found[-1]) if found else None


def is_correct(generated: str, problem: Problem) -> bool:
    """Whether the final answer in `generated` equals the problem's answer."""
    return extract_answer(generated) == problem.answer


def to_jsonl(problems: list[Problem], path: str | os.PathLike) -> Path:
    """Write one row per problem: {"messages": [user, assistant], "answer": "64"} (what `tah data`,
    `tah label` and `tah.data.build_dataset` read). Atomic: a temp file, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as out:
        for problem in problems:
            out.write(json.dumps({"messages": problem.messages(), "answer": str(problem.answer)}) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | os.PathLike) -> list[Problem]:
    """The problems `to_jsonl` wrote. Raises `InputError` naming the line of a malformed row."""
    problems = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, solution = (m["content"] for m in row["messages"][:2])
                problems.append(Problem(question, solution, int(row["answer"])))
            except (ValueError, KeyError, TypeError) as err:
                raise InputError(f"{path} line {number}: not a toy-task row ({err!r}); write rows with "
                                 "tah.toy.task.to_jsonl") from err
    return problems
