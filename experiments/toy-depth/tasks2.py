"""Round-2 tasks: rng -> (question, solution, kinds). kinds: 0 copy, 1 plain state, 2 marked (hard) state."""
import random
from tasks import PERMS


def count_chain(rng, steps=6, marked=1, ops="abcd", listlen=8):
    """Question "7:caBd|31594428": start digit, ops (uppercase = marked step), a list of digits.
    Each step: z = P_op(state); a marked step then adds how often z occurs in the list (mod 10).
    Solution "c3a1B6d2\\n#### 2": per step the op copied and the state."""
    s = rng.randrange(10)
    seq = [rng.choice(ops) for _ in range(steps)]
    mk = set(rng.sample(range(steps), marked))
    lst = [rng.randrange(10) for _ in range(listlen)]
    q = f"{s}:{''.join(o.upper() if i in mk else o for i, o in enumerate(seq))}|{''.join(map(str, lst))}"
    sol, kinds = "", []
    for i, op in enumerate(seq):
        z = PERMS[op][s]
        if i in mk:
            s = (z + lst.count(z)) % 10
        else:
            s = z
        sol += (op.upper() if i in mk else op) + str(s)
        kinds += [0, 2 if i in mk else 1]
    tail = f"\n#### {s}"
    return q, sol + tail, kinds + [0] * len(tail)


def member_chain(rng, steps=6, marked=1, ops="abcd", nset=4):
    """Like count_chain but a marked step adds 1 if z is in the set, else 2 (always changes z)."""
    s = rng.randrange(10)
    seq = [rng.choice(ops) for _ in range(steps)]
    mk = set(rng.sample(range(steps), marked))
    bset = set(rng.sample(range(10), nset))
    q = f"{s}:{''.join(o.upper() if i in mk else o for i, o in enumerate(seq))}|{''.join(map(str, sorted(bset)))}"
    sol, kinds = "", []
    for i, op in enumerate(seq):
        z = PERMS[op][s]
        s = (z + (1 if z in bset else 2)) % 10 if i in mk else z
        sol += (op.upper() if i in mk else op) + str(s)
        kinds += [0, 2 if i in mk else 1]
    tail = f"\n#### {s}"
    return q, sol + tail, kinds + [0] * len(tail)


if __name__ == "__main__":
    r = random.Random(0)
    for f in (count_chain, member_chain):
        for _ in range(3):
            print(f(r))


def succ_chain(rng, steps=6, marked=1, ops="abcd", nset=4):
    """A marked step moves z on to the next digit of the set above z (cyclically; z itself excluded)."""
    s = rng.randrange(10)
    seq = [rng.choice(ops) for _ in range(steps)]
    mk = set(rng.sample(range(steps), marked))
    bset = sorted(rng.sample(range(10), nset))
    q = f"{s}:{''.join(o.upper() if i in mk else o for i, o in enumerate(seq))}|{''.join(map(str, bset))}"
    sol, kinds = "", []
    for i, op in enumerate(seq):
        z = PERMS[op][s]
        s = min(bset, key=lambda b: (b - z - 1) % 10) if i in mk else z
        sol += (op.upper() if i in mk else op) + str(s)
        kinds += [0, 2 if i in mk else 1]
    tail = f"\n#### {s}"
    return q, sol + tail, kinds + [0] * len(tail)


_r = random.Random(4321)
PERMS26 = []
for _ in range(4):
    _p = list(range(26)); _r.shuffle(_p); PERMS26.append(_p)
L26 = "abcdefghijklmnopqrstuvwxyz"


def member26(rng, steps=6, marked=1, nset=13):
    """States are letters; ops 1-4 are fixed letter shuffles (6-9: the same op, marked). A marked step then
    moves z on by 1 if z is in the set given in the question, else by 2 (alphabet order, cyclic)."""
    s = rng.randrange(26)
    seq = [rng.randrange(4) for _ in range(steps)]
    mk = set(rng.sample(range(steps), marked))
    bset = set(rng.sample(range(26), nset))
    ops = "".join("6789"[o] if i in mk else "1234"[o] for i, o in enumerate(seq))
    q = f"{L26[s]}:{ops}|{''.join(L26[b] for b in sorted(bset))}"
    sol, kinds = "", []
    for i, o in enumerate(seq):
        z = PERMS26[o][s]
        s = (z + (1 if z in bset else 2)) % 26 if i in mk else z
        sol += ops[i] + L26[s]
        kinds += [0, 2 if i in mk else 1]
    tail = f"\n#### {L26[s]}"
    return q, sol + tail, kinds + [0] * len(tail)
