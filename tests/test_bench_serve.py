"""bench_serve.py --smoke: both modes run against a real `tah serve` and the table comes out whole.
Timings are not checked (a smoke run's figures are noise); the counts are."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"


def test_bench_serve_smoke_prints_both_modes_and_the_ratio():
    run = subprocess.run([sys.executable, str(BENCH), "--smoke"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split("(")[0].strip(): line for line in run.stdout.splitlines() if re.match(r"(continuous|one at)", line)}
    assert set(rows) == {"continuous", "one at a time"}
    for line in rows.values():
        requests, tokens = line.split(")")[1].split()[:2]
        assert (int(requests), int(tokens)) == (3, 3 * 8)  # 3 clients x 1 request x 8 tokens, all served
    assert re.search(r"throughput ratio, continuous / one at a time: \d+\.\d+x", run.stdout)
