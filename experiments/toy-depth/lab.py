"""Phase-1 harness: base pretrain, label, Standard / AlwaysIterate / TaH+ (stage 1 + 2), evaluation.

A task is a function rng -> (question, solution, kinds) with kinds[i] the kind of solution char i
(0 easy/copy, >=1 computed; used only for per-kind accuracies, never for training)."""
import math
import random
import time

import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM

from tah import TaHConfig, TaHForCausalLM
from tah.toy.tokenizer import build_char_tokenizer

torch.set_num_threads(1)
tok = build_char_tokenizer()


def encode(task, rng, n, seen=None, exclude=None):
    rows, qs = [], set()
    while len(rows) < n:
        q, s, kinds = task(rng)
        if q in qs or (exclude is not None and q in exclude):
            continue
        qs.add(q)
        msgs = [{"role": "user", "content": q}]
        prompt = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)
        sol = tok.encode(s, add_special_tokens=False) + [tok.eos_token_id]
        assert len(sol) == len(s) + 1, (s, sol)
        ids = list(prompt) + sol
        labels = [-100] * len(prompt) + sol
        kind = [-1] * len(prompt) + list(kinds) + [0]
        rows.append((ids, labels, kind, q, s))
    return rows, qs


def batchify(rows):
    w = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), w, dtype=torch.long)
    lab = torch.full((len(rows), w), -100)
    kind = torch.full((len(rows), w), -1)
    mask = torch.zeros(len(rows), w, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r[0])
        ids[i, :n] = torch.tensor(r[0]); lab[i, :n] = torch.tensor(r[1]); kind[i, :n] = torch.tensor(r[2])
        mask[i, :n] = 1
    return ids, lab, kind, mask


def base(layers, hidden=64, heads=4, seed=0, inter=3):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                      head_dim=hidden // heads, max_position_embeddings=256, tie_word_embeddings=True,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Qwen3ForCausalLM(cfg)


def tah_cfg(**kw):
    d = dict(max_iter=2, input_topk=16, lora_rank=4, lora_alpha=8.0, decider="mlp", decider_hidden_dims=[32],
             decider_topk=16, decider_expansion=2, threshold=0.5, pos_weight=3.0)
    d.update(kw)
    return TaHConfig(**d)


@torch.no_grad()
def label(model, rows, bs=128):
    """iter_labels per row: 2 where the reference's argmax at t is not ids[t+1] (t has a next real token)."""
    model.eval()
    out = []
    for i in range(0, len(rows), bs):
        chunk = rows[i:i + bs]
        ids, lab, kind, mask = batchify(chunk)
        logits = model(input_ids=ids, attention_mask=mask).logits
        wrong = logits[:, :-1].argmax(-1) != ids[:, 1:]
        for j, r in enumerate(chunk):
            n = len(r[0])
            it = [2 if w else 1 for w in wrong[j, :n - 1].tolist()] + [-100]
            out.append(it)
    return out


def pad_iter(its, w):
    t = torch.full((len(its), w), -100)
    for i, it in enumerate(its):
        t[i, :len(it)] = torch.tensor(it)
    return t


def schedule(steps, warm=0.05, floor=0.1):
    w = max(1, int(steps * warm))
    return lambda s: min(1.0, (s + 1) / w) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def train(model, rows, steps, lr, mode="standard", its=None, bs=32, seed=0, wd=0.01, log=None):
    """mode: standard (plain HF or TaH with max_iter 1 semantics), always, oracle (its), stage2 (its)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps))
    rng = random.Random(seed)
    model.train()
    idx = list(range(len(rows)))
    losses = []
    for step in range(steps):
        pick = rng.sample(idx, bs)
        ids, lab, kind, mask = batchify([rows[i] for i in pick])
        if mode == "standard":
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab[:, 1:].flatten(), ignore_index=-100)
        elif mode in ("always", "oracle"):
            it = torch.where(mask.bool(), 2, -100) if mode == "always" else pad_iter([its[i] for i in pick], ids.shape[1])
            if mode == "always":
                it[:, -1] = -100
            loss = model(input_ids=ids, attention_mask=mask, labels=lab, iter_labels=it).loss
        elif mode == "stage2":
            it = pad_iter([its[i] for i in pick], ids.shape[1])
            loss = model(input_ids=ids, attention_mask=mask, iter_labels=it).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step()
        losses.append(loss.item())
        if log and (step + 1) % log == 0:
            print(f"    step {step+1} loss {sum(losses[-log:])/log:.4f}", flush=True)
    return sum(losses[-20:]) / 20


@torch.no_grad()
def evaluate(model, rows, mode="plain", its=None, bs=100):
    """Teacher-forced: token acc on solution tokens (per kind), all-solution-right share, iterated share.
    mode plain (HF model), decider (TaH own decider), always, never, oracle (its)."""
    model.eval()
    tot = {}
    allright, n_rows, iters, n_tok = 0, 0, 0, 0
    for i in range(0, len(rows), bs):
        chunk = rows[i:i + bs]
        ids, lab, kind, mask = batchify(chunk)
        count = None
        if mode == "plain":
            logits = model(input_ids=ids, attention_mask=mask).logits
        else:
            it = None
            if mode == "always":
                it = torch.where(mask.bool(), 2, -100)
            elif mode == "never":
                it = torch.where(mask.bool(), 1, -100)
            elif mode == "oracle":
                it = pad_iter(its[i:i + bs], ids.shape[1])
            out = model(input_ids=ids, attention_mask=mask, iter_labels=it)
            logits, count = out.logits, out.iter_count
        pred = logits[:, :-1].argmax(-1)
        tgt = lab[:, 1:]
        k = kind[:, 1:]
        sup = tgt != -100
        ok = pred == tgt
        for kk in k[sup].unique().tolist():
            sel = sup & (k == kk)
            a = tot.setdefault(kk, [0, 0])
            a[0] += ok[sel].sum().item(); a[1] += sel.sum().item()
        a = tot.setdefault("all", [0, 0]); a[0] += ok[sup].sum().item(); a[1] += sup.sum().item()
        allright += (ok | ~sup).all(1).sum().item(); n_rows += len(chunk)
        if count is not None:
            iters += (count[:, :-1][sup] > 1).sum().item()
        n_tok += sup.sum().item()
    res = {str(k): round(v[0] / v[1], 3) for k, v in sorted(tot.items(), key=lambda kv: str(kv[0]))}
    res["exact"] = round(allright / n_rows, 3)
    res["iter"] = round(iters / n_tok, 3)
    return res


@torch.no_grad()
def gen_exact(model, rows, max_new=40, tah=False, bs=100):
    """Greedy generation: share of rows whose generated solution equals the reference."""
    from tah.generation import generate
    model.eval()
    right = 0
    iters = tokens = 0
    for i in range(0, len(rows), bs):
        chunk = rows[i:i + bs]
        prompts = [r[0][:len(r[0]) - len(r[4]) - 1] for r in chunk]
        w = max(map(len, prompts))
        ids = torch.zeros(len(chunk), w, dtype=torch.long); mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):  # left pad
            ids[j, w - len(p):] = torch.tensor(p); mask[j, w - len(p):] = 1
        m = model if tah else TaHForCausalLM.from_base(model, TaHConfig(max_iter=1))
        out = generate(m, ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=tok.eos_token_id)
        seqs = out.sequences[:, w:]
        cnt = out.iter_counts
        for j, r in enumerate(chunk):
            text = tok.decode([t for t in seqs[j].tolist() if t != tok.eos_token_id and t != 0])
            right += text.strip() == r[4]
        iters += (cnt > 1).sum().item(); tokens += (cnt > 0).sum().item()
    return round(right / len(rows), 3), round(iters / max(tokens, 1), 3)


def params(m):
    return sum(p.numel() for p in m.parameters())
