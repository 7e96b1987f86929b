"""Round 7 (issue 29): what kind of digit each model gets wrong on held-out solutions (teacher-forced): its place in
the step's result, whether a carry comes into it, and how many places directly below it have digits summing to 9
(the carry passes through them, so it is decided further down).

    python errkind.py OUT/seed-0 standard tah-plus-stage2 always
"""
import collections
import re
import sys
import torch
from heldout import heldout_batch

from tah import TaHForCausalLM
from tah.toy.tokenizer import build_char_tokenizer
root = sys.argv[1]
tok = build_char_tokenizer()
batch, answer, target = heldout_batch(root)
def pred(name):
    m = TaHForCausalLM.from_pretrained(f"{root}/runs/{name}/final").eval()
    with torch.no_grad():
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
for name in sys.argv[2:]:
    p = pred(name)
    kinds = collections.Counter()
    for r, c in zip(*torch.nonzero((p != target) & answer, as_tuple=True)):
        text = tok.decode(batch["input_ids"][r, :c + 1])
        line = text.split("\n")[-1]

        m = re.search(r"(\d{4})([+-])(\d{4})=(\d*)$", line)
        if m:
            a, op, b, res = int(m[1]), m[2], int(m[3]), m[4]
            place = len(res)
            lower = 10 ** (3 - place)
            if op == "+":
                low = a % lower + b % lower
                carry = low >= lower
                # chain: places below whose digit sum is exactly 9
                chain = 0
                for q in range(place + 1, 4):
                    da, db = (a // 10 ** (3 - q)) % 10, (b // 10 ** (3 - q)) % 10
                    if da + db == 9: chain += 1
                    else: break
            else:
                carry, chain = None, None
            kinds[(f"digit {place}", f"carry {carry}", f"9-run {chain}")] += 1
        elif "####" in line:
            kinds[("answer line",)] += 1
        else:
            kinds[("other", line[-12:])] += 1
    print(name, sum(kinds.values()), sorted(kinds.items(), key=lambda kv: -kv[1])[:8])
