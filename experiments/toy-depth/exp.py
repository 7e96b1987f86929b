"""Does depth matter for 2-hop lookups? 3-layer vs 6-layer vs TaH(3 layers, oracle on 2-hop tokens)."""
import random, sys, time, math
import torch, torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM
from tah import TaHConfig, TaHForCausalLM
from tah.toy.tokenizer import build_char_tokenizer

torch.set_num_threads(1)
LETTERS = "abcdefghijklmnop"
tok = build_char_tokenizer()

def problem(rng, pairs=8, queries=4, two_hop_share=0.5):
    keys = rng.sample(LETTERS, pairs)
    vals = keys[:]; rng.shuffle(vals)           # a permutation of the chosen letters: f(x) in the table
    f = dict(zip(keys, vals))
    table = ",".join(f"{k}>{v}" for k, v in f.items())
    lines, hard, qs = [], [], []
    for _ in range(queries):
        x = rng.choice(keys)
        h = 2 if rng.random() < two_hop_share else 1
        y = f[f[x]] if h == 2 else f[x]
        qs.append(f"{x}{h}"); lines.append(f"{x}{h}={y}"); hard.append(h)
    return table + "?" + ",".join(qs), "\n".join(lines), hard

def encode(rng, n, **kw):
    rows = []
    for _ in range(n):
        q, s, hard = problem(rng, **kw)
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": s}]
        prompt = tok.encode(tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False), add_special_tokens=False)
        sol = tok.encode(s, add_special_tokens=False) + [tok.eos_token_id]
        ids = list(prompt) + sol
        labels = [-100] * len(prompt) + sol
        # kind of each target: 0 copy/format, 1 one-hop result, 2 two-hop result
        kinds = [0] * len(ids)
        pos = len(prompt)
        for line, h in zip(s.split("\n"), hard):
            kinds[pos + len(line) - 1] = h   # the result char is the line's last char
            pos += len(line) + 1
        rows.append((ids, labels, kinds))
    return rows

def batchify(rows):
    w = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), w, dtype=torch.long); lab = torch.full((len(rows), w), -100); kind = torch.zeros(len(rows), w, dtype=torch.long)
    mask = torch.zeros(len(rows), w, dtype=torch.long)
    for i, (a, b, k) in enumerate(rows):
        ids[i, :len(a)] = torch.tensor(a); lab[i, :len(b)] = torch.tensor(b); kind[i, :len(k)] = torch.tensor(k); mask[i, :len(a)] = 1
    return ids, lab, kind, mask

def base(layers, hidden=64, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3*hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden//4, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Qwen3ForCausalLM(cfg)

def oracle_iter(kind, lab):   # iterate the prediction positions of 2-hop results (position t predicts t+1)
    it = torch.ones_like(kind)
    it[:, :-1][kind[:, 1:] == 2] = 2
    it[lab == -100] = torch.where(it[lab == -100] > 1, it[lab == -100], torch.ones_like(it[lab == -100]))
    return it

def train(model, data, steps, lr, tah_mode=None, bs=32):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s+1)/20) * (0.1 + 0.9*0.5*(1+math.cos(math.pi*s/steps))))
    rng = random.Random(1)
    model.train()
    for step in range(steps):
        ids, lab, kind, mask = batchify(rng.sample(data, bs))
        if tah_mode is None:
            logits = model(input_ids=ids, attention_mask=mask).logits
        else:
            it = oracle_iter(kind, lab) if tah_mode == "oracle" else torch.full_like(kind, 2)
            logits = model(input_ids=ids, attention_mask=mask, iter_labels=it).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
    return loss.item()

@torch.no_grad()
def evaluate(model, data, tah_mode=None):
    model.eval()
    ids, lab, kind, mask = batchify(data)
    if tah_mode is None:
        logits = model(input_ids=ids, attention_mask=mask).logits
    else:
        it = oracle_iter(kind, lab) if tah_mode == "oracle" else torch.full_like(kind, 2)
        out = model(input_ids=ids, attention_mask=mask, iter_labels=it); logits = out.logits
    pred = logits[:, :-1].argmax(-1); tgt = lab[:, 1:]; k = kind[:, 1:]
    ok = (pred == tgt)
    res = {}
    for name, sel in (("all", tgt != -100), ("copy", (tgt != -100) & (k == 0)), ("hop1", k == 1), ("hop2", k == 2)):
        res[name] = round(ok[sel].float().mean().item(), 3)
    # answer: every result in the problem right
    rows_ok = ((ok | (tgt == -100)).all(1)).float().mean().item()
    res["answer"] = round(rows_ok, 3)
    return res

if __name__ == "__main__":
    which = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 800
    rng = random.Random(0)
    train_rows = encode(rng, 6000); test_rows = encode(random.Random(99), 300)
    t = time.time()
    if which.startswith("std"):
        layers = int(which[3:])
        m = base(layers)
        loss = train(m, train_rows, steps, 3e-3)
        print(which, steps, "loss", round(loss, 3), evaluate(m, test_rows), f"{time.time()-t:.0f}s", flush=True)
    elif which.startswith("tah"):
        layers = 3
        m = base(layers)
        train(m, train_rows, steps, 3e-3)
        print("base", evaluate(m, test_rows), flush=True)
        cfg = TaHConfig(max_iter=2, input_topk=16, lora_rank=8, lora_alpha=16.0, decider="oracle")
        t2 = TaHForCausalLM.from_base(m, cfg)
        mode = which[3:] or "oracle"
        loss = train(t2, train_rows, steps // 2, 3e-3, tah_mode=mode)
        print(which, "loss", round(loss, 3), evaluate(t2, test_rows, tah_mode=mode), "depth0-only", evaluate(t2, test_rows, tah_mode=None) if False else "", f"{time.time()-t:.0f}s", flush=True)
