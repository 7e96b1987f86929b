"""Candidate toy tasks: rng -> (question, solution, kinds)."""
import random

OPS = "abcdef"
_perm_rng = random.Random(1234)
PERMS = {}
for _op in OPS:
    _p = list(range(10)); _perm_rng.shuffle(_p); PERMS[_op] = _p


def perm_chain(rng, steps=8, hide=0.35, ops=OPS):
    """Question "7:c.a_b.f_d_e." (start digit; per step an op letter and '.' show / '_' hide);
    solution "c3a_b5f_d_e4\\n#### 4": per step the op copied and the state (or '_' copied).
    kinds: 0 copy, k = number of ops composed into that state."""
    s = rng.randrange(10)
    q = f"{s}:"
    sol, kinds = "", []
    pending = 0
    marks = [rng.random() < hide for _ in range(steps - 1)] + [False]
    for hidden in marks:
        op = rng.choice(ops)
        s = PERMS[op][s]
        pending += 1
        q += op + ("_" if hidden else ".")
        sol += op; kinds.append(0)
        if hidden:
            sol += "_"; kinds.append(0)
        else:
            sol += str(s); kinds.append(pending); pending = 0
    tail = f"\n#### {s}"
    return q, sol + tail, kinds + [0] * len(tail)


def guard_chain(rng, steps=8, banned=3, ops=OPS, pair=False):
    """Question "7:cabfdeab|259": start digit, ops, banned digits. Solution "c3a1b4...\\n#### 4": per step
    the op copied and the state, where the state after an op is P_op(state), bumped up (mod 10) past
    banned digits. kinds: 0 copy, 1 state not bumped, 2 state bumped."""
    s = rng.randrange(10)
    bad = set(rng.sample(range(10), banned))
    seq = [rng.choice(ops) for _ in range(steps)]
    q = f"{s}:{''.join(seq)}|{''.join(str(d) for d in sorted(bad))}"
    sol, kinds = "", []
    if pair:
        seq = [rng.choice(ops) + rng.choice(ops) for _ in range(steps)]
        q = f"{s}:{' '.join(o + '_' for o in seq)}|{''.join(str(d) for d in sorted(bad))}"
    for op in seq:
        z = s
        for o in op:
            z = PERMS[o][z]
        s = z
        while s in bad:
            s = (s + 1) % 10
        sol += op + str(s) + (" " if pair else ""); kinds += [0] * len(op) + [1 if s == z else 2] + ([0] if pair else [])
    tail = f"\n#### {s}"
    return q, sol + tail, kinds + [0] * len(tail)
