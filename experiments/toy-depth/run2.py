"""Full phase-1 experiment: pretrain base, label, fine-tune Standard / AlwaysIterate / TaH+ with equal steps."""
import argparse, copy, json, os, random, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import *
import tasks, tasks2, tasks3
CKPT = os.environ.get("TAH_EXP_CKPT", "/tmp/tah-toy-depth-ckpt")  # cached pretrained bases

ap = argparse.ArgumentParser()
ap.add_argument("task"); ap.add_argument("--layers", type=int, default=2); ap.add_argument("--hidden", type=int, default=64)
ap.add_argument("--pre", type=int, default=3000); ap.add_argument("--ft", type=int, default=600)
ap.add_argument("--dec", type=int, default=150); ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--ftlr", type=float, default=3e-3); ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--bs", type=int, default=32); ap.add_argument("--ntrain", type=int, default=8000)
ap.add_argument("--kw", default="{}"); ap.add_argument("--rank", type=int, default=4)
ap.add_argument("--only", default="std,always,tah"); ap.add_argument("--topk", type=int, default=16)
ap.add_argument("--gen", type=int, default=1); ap.add_argument("--prompt_labels", default="keep"); ap.add_argument("--labels", default="base")
a = ap.parse_args()
kw = json.loads(a.kw)
task = lambda rng: getattr(next(m for m in (tasks3, tasks2, tasks) if hasattr(m, a.task)), a.task)(rng, **kw)
train_rows, qs = encode(task, random.Random(a.seed), a.ntrain)
test_rows, _ = encode(task, random.Random(1000 + a.seed), 300, exclude=qs)
tag = f"{a.task}-{a.kw}-L{a.layers}-h{a.hidden}-p{a.pre}-lr{a.lr}-s{a.seed}".replace(" ", "").replace('"', "")
path = os.path.join(CKPT, f"{tag}.pt")
t0 = time.time()
m = base(a.layers, hidden=a.hidden, seed=a.seed)
if os.path.exists(path):
    m.load_state_dict(torch.load(path))
else:
    train(m, train_rows, a.pre, a.lr, seed=a.seed, log=a.pre // 5)
    os.makedirs(CKPT, exist_ok=True); torch.save(m.state_dict(), path)
print(f"[{tag}] base {evaluate(m, test_rows)} {time.time()-t0:.0f}s", flush=True)
its = label(m, train_rows)
test_its = label(m, test_rows)
def type_labels(rows):
    out = []
    for r in rows:
        k = r[2]
        out.append([2 if k[t + 1] >= 1 else 1 for t in range(len(k) - 1)] + [-100])
    return out
def prompt_easy(rows, its):
    return [[1 if (r[1][t + 1] == -100 and l != -100) else l for t, l in enumerate(it[:-1])] + [it[-1]] for r, it in zip(rows, its)]
if a.prompt_labels == "easy":
    its, test_its = prompt_easy(train_rows, its), prompt_easy(test_rows, test_its)
def marked_labels(rows):
    return [[2 if r[2][t + 1] == 2 else 1 for t in range(len(r[2]) - 1)] + [-100] for r in rows]
if a.labels == "marked":
    its, test_its = marked_labels(train_rows), marked_labels(test_rows)
if a.labels.startswith("ce:"):  # hard where the base's argmax is wrong or its CE on the truth > the threshold
    @torch.no_grad()
    def ce_labels(model, rows, bs=128):
        model.eval(); out = []
        for i in range(0, len(rows), bs):
            chunk = rows[i:i + bs]; ids, lab, kind, mask = batchify(chunk)
            logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
            ce = -logp.gather(-1, ids[:, 1:, None])[..., 0]
            hard = (logp.argmax(-1) != ids[:, 1:]) | (ce > float(a.labels[3:]))
            for j, r in enumerate(chunk):
                out.append([2 if h else 1 for h in hard[j, :len(r[0]) - 1].tolist()] + [-100])
        return out
    its, test_its = ce_labels(m, train_rows), ce_labels(m, test_rows)
    if a.prompt_labels == "easy":
        its, test_its = prompt_easy(train_rows, its), prompt_easy(test_rows, test_its)
if a.labels == "type":
    its, test_its = type_labels(train_rows), type_labels(test_rows)
sup = sum(1 for r, it in zip(train_rows, its) for l, i in zip(r[1][1:], it) if l != -100 and i == 2)
print(f"  hard share of solution tokens {sup / sum(1 for r in train_rows for l in r[1] if l != -100):.3f}", flush=True)
res = {}
def fin(name, model, mode, t):
    r = evaluate(model, test_rows, mode=mode)
    if a.gen:
        r["gen"], r["gen_iter"] = gen_exact(model, test_rows, tah=mode != "plain")
    r["s"] = round(time.time() - t)
    res[name] = r
    print(f"  {name:8s} {r}", flush=True)
if "std" in a.only:
    t = time.time(); s = copy.deepcopy(m); train(s, train_rows, a.ft, a.ftlr, seed=a.seed + 1); fin("Standard", s, "plain", t)
cfg = dict(lora_rank=a.rank, lora_alpha=2.0 * a.rank, input_topk=a.topk)
if "always" in a.only:
    t = time.time(); w = TaHForCausalLM.from_base(copy.deepcopy(m), tah_cfg(decider="always", **cfg))
    train(w, train_rows, a.ft, a.ftlr, mode="always", seed=a.seed + 1); fin("Always", w, "always", t)
if "tah" in a.only:
    t = time.time(); w = TaHForCausalLM.from_base(copy.deepcopy(m), tah_cfg(**cfg))
    train(w, train_rows, a.ft, a.ftlr, mode="oracle", its=its, seed=a.seed + 1)
    r = evaluate(w, test_rows, mode="oracle", its=test_its); print(f"  TaH+ s1 with oracle labels {r}", flush=True)
    print(f"  TaH+ s1 all marked iterated {evaluate(w, test_rows, mode='oracle', its=marked_labels(test_rows))}", flush=True)
    print(f"  TaH+ s1 never {evaluate(w, test_rows, mode='never')}", flush=True)
    w.set_training_stage(2)
    train(w, train_rows, a.dec, a.ftlr, mode="stage2", its=its, seed=a.seed + 2)
    fin("TaH+", w, "decider", t)
    for th in (0.3, 0.7, 0.9, 0.97):
        w.set_threshold(th); r = evaluate(w, test_rows, mode="decider"); print(f"  TaH+ threshold {th}: {r}", flush=True)
    @torch.no_grad()
    def iter_by_kind(model, rows):
        model.eval(); model.set_threshold(0.5)
        ids, lab, kind, mask = batchify(rows)
        out = model(input_ids=ids, attention_mask=mask)
        c = out.iter_count[:, :-1] > 1; k = kind[:, 1:]; sup = lab[:, 1:] != -100
        return {kk: round(c[sup & (k == kk)].float().mean().item(), 3) for kk in (0, 1, 2)}
    print("  TaH+ iterated share by kind", iter_by_kind(w, test_rows), flush=True)
    print("  labels by kind (test)", {kk: round(sum(1 for r, it in zip(test_rows, test_its) for t in range(len(it)-1) if r[2][t+1] == kk and it[t] == 2) / max(1, sum(1 for r in test_rows for t in range(len(r[2])-1) if r[2][t+1] == kk)), 3) for kk in (0, 1, 2)}, flush=True)
