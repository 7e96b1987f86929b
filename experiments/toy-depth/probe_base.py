"""Round 3 (issue 29): does the base learn the arithmetic on every seed? Pretrain only, evaluated
every --every steps (teacher-forced, held-out): computed-digit accuracy ('1') and exact solutions."""
import argparse, json, os, random, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import *
import tasks3

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=3); ap.add_argument("--hidden", type=int, default=64)
ap.add_argument("--heads", type=int, default=4); ap.add_argument("--steps", type=int, default=1500)
ap.add_argument("--lr", type=float, default=3e-3); ap.add_argument("--bs", type=int, default=32)
ap.add_argument("--seeds", default="0,1,2"); ap.add_argument("--every", type=int, default=250)
ap.add_argument("--ntrain", type=int, default=3000); ap.add_argument("--kw", default="{}")
ap.add_argument("--warm", type=float, default=0.05); ap.add_argument("--wd", type=float, default=0.01)
a = ap.parse_args()
kw = json.loads(a.kw)
task = lambda rng: tasks3.arith(rng, **kw)
for seed in map(int, a.seeds.split(",")):
    rows, qs = encode(task, random.Random(seed), a.ntrain)
    test, _ = encode(task, random.Random(1000 + seed), 300, exclude=qs)
    torch.manual_seed(seed)
    m = base(a.layers, hidden=a.hidden, heads=a.heads, seed=seed)
    params_ = [p for p in m.parameters()]
    opt = torch.optim.AdamW(params_, lr=a.lr, weight_decay=a.wd)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, schedule(a.steps, warm=a.warm))
    rng = random.Random(seed); t0 = time.time(); curve = []
    for step in range(a.steps):
        m.train()
        ids, lab, kind, mask = batchify([rows[i] for i in rng.sample(range(len(rows)), a.bs)])
        logits = m(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params_, 1.0); opt.step(); sch.step()
        if (step + 1) % a.every == 0:
            r = evaluate(m, test)
            curve.append((step + 1, r["1"], r["exact"]))
    print(f"seed {seed} L{a.layers} h{a.hidden} lr{a.lr} bs{a.bs} {kw} ({time.time()-t0:.0f}s): "
          + " ".join(f"{s}:{d:.2f}/{e:.2f}" for s, d, e in curve), flush=True)
