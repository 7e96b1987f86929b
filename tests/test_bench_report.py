"""`tah eval --report`: the table and the trade-off plot from finished runs' summary.json files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from tah.errors import InputError
from tah.eval.bench_report import find_runs, report, table_rows


def _summary(directory: Path, model: str, task: str, accuracy: float, share: float | None,
             threshold: float | None, max_iter: int = 2) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    summary = {"task": task, "model": model, "n": 10, "samples": 1, "accuracy": accuracy, "iterated_share": share,
               "tokens": 100, "tokens_per_second": None, "skipped": 0,
               "settings": {"threshold": threshold, "max_iter": max_iter}}
    (directory / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    """A threshold sweep of one model on two tasks, a second model on one task, completions graded elsewhere."""
    sweep = tmp_path / "tah-plus"
    for t, (acc, share) in {0.5: (0.60, 0.30), 0.9: (0.55, 0.07), 0.99: (0.50, 0.01)}.items():
        _summary(sweep / "gsm8k" / f"threshold-{t}", "/ckpt/tah-plus", "gsm8k", acc, share, t)
        _summary(sweep / "math500" / f"threshold-{t}", "/ckpt/tah-plus", "math500", acc - 0.3, share * 2, t)
    _summary(tmp_path / "standard", "/ckpt/standard", "gsm8k", 0.52, 0.0, 0.9, max_iter=1)  # one pass: no threshold
    _summary(tmp_path / "graded", "/elsewhere/vllm", "gsm8k", 0.58, None, None)
    return [sweep, tmp_path / "standard", tmp_path / "graded"]


def test_report_table_has_a_row_per_model_and_threshold_and_a_column_per_task(runs, tmp_path):
    tasks, rows = table_rows(find_runs(runs))
    assert tasks == ["gsm8k", "math500"]
    assert [(r["model"], r["threshold"]) for r in rows] == [
        ("standard", None), ("tah-plus", 0.5), ("tah-plus", 0.9), ("tah-plus", 0.99), ("vllm", None)]
    assert rows[2]["gsm8k"].accuracy == 0.55 and rows[2]["math500"].iterated_share == pytest.approx(0.14)
    assert "math500" not in rows[0]


def test_report_prints_and_writes_json_and_png(runs, tmp_path, capsys):
    out = tmp_path / "report"
    written = report([str(d) for d in runs], out)
    printed = capsys.readouterr().out
    assert "55.0% (7.0%)" in printed and "58.0%" in printed and "tah-plus" in printed
    data = json.loads((out / "report.json").read_text())
    assert data["tasks"] == ["gsm8k", "math500"] and len(data["rows"]) == 5
    image = matplotlib.image.imread(written["png"])
    assert image.shape[1] > image.shape[0]  # two task panels side by side


def test_two_models_with_the_same_folder_name_keep_their_paths(tmp_path):
    _summary(tmp_path / "a", "/x/final", "gsm8k", 0.5, 0.1, 0.9)
    _summary(tmp_path / "b", "/y/final", "gsm8k", 0.6, 0.1, 0.9)
    _, rows = table_rows(find_runs([tmp_path / "a", tmp_path / "b"]))
    assert [r["model"] for r in rows] == ["/x/final", "/y/final"]


def test_report_errors_name_the_directory_or_file(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        find_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no summary.json"):
        find_runs([tmp_path / "empty"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text('{"task": "gsm8k"}')
    with pytest.raises(InputError, match=r"bad/summary.json: not a tah eval summary"):
        find_runs([tmp_path / "bad"])


def test_tah_eval_report_command_prints_the_table(runs, tmp_path):
    done = subprocess.run([sys.executable, "-m", "tah.cli", "eval", "--report", *map(str, runs), "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "tah-plus" in done.stdout and "55.0% (7.0%)" in done.stdout
    assert (tmp_path / "r" / "report.png").is_file() and (tmp_path / "r" / "report.json").is_file()
    missing = subprocess.run([sys.executable, "-m", "tah.cli", "eval", "--report", str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no such directory" in missing.stderr
