"""bench_host.py (a training step's host work, measured on a CPU) runs on a small depth and reports
what it promises: every row, and the stage-1 rows' one host read a forward."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_host.py"


def test_bench_host_reports_every_row():
    run = subprocess.run([sys.executable, str(BENCH), "--layers", "2", "--steps", "1"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = {}
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 6 and re.fullmatch(r"[\d,]+", cells[1]):
            rows[cells[0]] = (int(cells[1].replace(",", "")), int(cells[3]))
    assert set(rows) == {"plain SFT of the base model", "TaH stage 1, 0% hard tokens", "TaH stage 1, 10% hard tokens"}
    assert rows["TaH stage 1, 10% hard tokens"][1] == rows["TaH stage 1, 0% hard tokens"][1] == 1
    assert rows["TaH stage 1, 10% hard tokens"][0] > rows["TaH stage 1, 0% hard tokens"][0] > 0
