"""Round 3 (issue 29): the demo's own task, step-by-step arithmetic (tah.toy.task), as a lab task."""
from tah.toy.task import TaskConfig, _draw, hard_chars


def arith(rng, terms=(2, 3), digits=(2, 3), ops="+", width=0):
    """width > 0: every number written with `width` digits, zero-padded ("047+038=085")."""
    problem = _draw(rng, TaskConfig(terms=tuple(terms), digits=tuple(digits), ops=ops))
    if not width:
        return problem.question, problem.solution, [1 if h else 0 for h in hard_chars(problem)]
    import re
    pad = lambda text: re.sub(r"\d+", lambda m: m.group().zfill(width), text)  # noqa: E731
    solution = pad(problem.solution)
    kinds = []
    for line in solution.split("\n"):
        if "=" in line:
            head, result = line.split("=", 1)
            kinds += [0] * (len(head) + 1) + [1] * len(result)
        else:
            kinds += [0] * len(line)
        kinds.append(0)
    return pad(problem.question), solution, kinds[:len(solution)]
