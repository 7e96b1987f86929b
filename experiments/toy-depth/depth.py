"""Standard models of several depths on a task: does depth matter for the hard tokens?"""
import os, sys, time, random
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import *
import tasks

task = getattr(tasks, sys.argv[1]); layers = int(sys.argv[2]); steps = int(sys.argv[3])
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 3e-3
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
train_rows, qs = encode(task, random.Random(seed), 8000)
test_rows, _ = encode(task, random.Random(1000 + seed), 400, exclude=qs)
print(train_rows[0][3], repr(train_rows[0][4]), len(train_rows[0][0]))
m = base(layers, seed=seed)
t = time.time()
for chunk in range(4):
    train(m, train_rows, steps // 4, lr, seed=seed * 10 + chunk) if False else None
loss = train(m, train_rows, steps, lr, seed=seed, log=steps // 5)
print(sys.argv[1:], "loss", round(loss, 4), evaluate(m, test_rows), f"{time.time()-t:.0f}s", flush=True)
