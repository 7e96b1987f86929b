"""`tah eval`: benchmark files as problems, the runner's files, resume after a kill, thresholds, bad input."""

from __future__ import annotations

import gzip
import importlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import randomize_lora, tiny_lm
from tah import TaHConfig, TaHForCausalLM
from tah.cli import main
from tah.errors import InputError
from tah.eval.tasks import load_problems
from tah.toy.tokenizer import build_char_tokenizer

BENCHMARKS = Path(os.environ.get("TAH_BENCHMARKS", Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))
needs_benchmarks = pytest.mark.skipif(not (BENCHMARKS / "gsm8k_test.jsonl").is_file(),
                                      reason=f"benchmark files not found at {BENCHMARKS} (set TAH_BENCHMARKS)")
COPIES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"  # GSM8K's first 400 rows, HumanEval, MATH-500
TAH = [sys.executable, "-m", "tah.cli"]
VOLATILE = ("tokens_per_second", "generation_seconds")  # timings differ between runs; nothing else may
MADE_UP = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
            "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b:,}"}
           for a, b in [(3, 4), (12, 30), (7, 8), (1200, 34), (5, 5)]]


def run_tah(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*TAH, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random TaH model (MLP decider) with the character tokenizer and its chat template."""
    tokenizer = build_char_tokenizer(model_max_length=2048)
    base = tiny_lm(vocab=len(tokenizer), max_positions=1024)
    model = TaHForCausalLM.from_base(base, TaHConfig(max_iter=2, input_topk=8, lora_rank=4, lora_alpha=8.0,
                                                     decider_hidden_dims=[16], decider_topk=8, decider_expansion=2))
    randomize_lora(model)
    where = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


@pytest.fixture(scope="module")
def gsm8k_five(tmp_path_factory) -> Path:
    """GSM8K's first five test problems (from the copy in tests/fixtures/benchmarks)."""
    where = tmp_path_factory.mktemp("gsm8k") / "gsm8k_five.jsonl"
    with gzip.open(COPIES / "gsm8k_test.jsonl.gz", "rt") as rows:
        where.write_text("".join(itertools.islice(rows, 5)))
    return where


@pytest.fixture(scope="module")
def made_up_five(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "gsm8k.jsonl", MADE_UP)


def summary_of(directory: Path) -> dict:
    summary = json.loads((directory / "summary.json").read_text())
    return {key: value for key, value in summary.items() if key not in VOLATILE}


# -- tasks: files as problems --------------------------------------------------------------------------------


def test_gsm8k_rows_become_problems_with_the_number_after_hashes(made_up_five):
    loaded = load_problems("gsm8k", made_up_five)
    assert [p.id for p in loaded.problems] == ["0", "1", "2", "3", "4"]  # no id field: the line number
    assert [p.gold for p in loaded.problems] == ["7", "42", "15", "1234", "10"]  # thousands comma dropped
    assert loaded.problems[0].question.startswith("Tom has 3 apples") and loaded.skipped == []


def test_malformed_rows_are_skipped_and_named_unless_strict(tmp_path):
    data = write_jsonl(tmp_path / "mixed.jsonl", [
        {"id": "a", "problem": "1+1?", "answer": "2"},
        {"id": "b", "problem": "no answer here"},
        "{not json",
        {"id": "a", "problem": "again", "answer": "3"},
        {"question": "a question field works too", "answer": 5},
    ])
    loaded = load_problems("math", data)
    assert [(p.id, p.gold) for p in loaded.problems] == [("a", "2"), ("4", "5")]
    assert loaded.skipped == [f"{data} row 1: no 'answer' field", f"{data} row 2: not valid JSON "
                              "(Expecting property name enclosed in double quotes)", f"{data} row 3: repeated id 'a'"]
    with pytest.raises(InputError, match=r"mixed.jsonl row 1: no 'answer' field; fix the row"):
        load_problems("math", data, strict=True)


@needs_benchmarks
def test_every_benchmark_file_loads_whole():
    sizes = {"gsm8k": ("gsm8k_test.jsonl", 1319), "math500": ("math500.jsonl", 500), "aime24": ("aime24.jsonl", 30),
             "aime25": ("aime25.jsonl", 30), "amc23": ("amc23.jsonl", 40), "humaneval": ("humaneval.jsonl.gz", 164)}
    for task, (name, rows) in sizes.items():
        loaded = load_problems(task, BENCHMARKS / name, strict=True)
        assert len(loaded.problems) == rows, task
    humaneval = load_problems("humaneval", BENCHMARKS / "humaneval.jsonl.gz").problems[0]
    assert humaneval.id == "HumanEval/0" and humaneval.extras["entry_point"] == "has_close_elements"
    assert humaneval.question == humaneval.extras["prompt"] and "def check(candidate)" in humaneval.extras["test"]
    assert load_problems("aime24", BENCHMARKS / "aime24.jsonl").problems[0].id == "2024-I-1"


# -- the runner ----------------------------------------------------------------------------------------------


def test_eval_killed_midway_resumes_to_the_uninterrupted_result(checkpoint, gsm8k_five, tmp_path):
    """Seeded sampling, 2 samples a problem, batches of 2: a real `tah eval` killed (SIGKILL) after its
    first batch is written, then the same command again, gives the files of a run never stopped."""
    command = ["eval", "--model", checkpoint, "--task", "gsm8k", "--data", gsm8k_five, "--samples", "2",
               "--batch-size", "2", "--max-new-tokens", "16", "--seed", "7", "--no-progress"]
    assert main([*map(str, command), "--out", str(tmp_path / "whole")]) == 0

    stopped = tmp_path / "stopped"
    child = subprocess.Popen([*TAH, *map(str, command), "--out", str(stopped)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    written = 0
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        samples = stopped / "samples.jsonl"
        written = len(samples.read_text().splitlines()) if samples.is_file() else 0
        if written >= 2:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    child.wait()
    assert child.returncode == -signal.SIGKILL and 2 <= written < 10, "the run ended before it could be killed"
    assert len((stopped / "samples.jsonl").read_text().splitlines()) < 10

    assert main([*map(str, command), "--out", str(stopped)]) == 0  # the same command resumes
    assert summary_of(stopped) == summary_of(tmp_path / "whole")
    assert (stopped / "samples.jsonl").read_text() == (tmp_path / "whole" / "samples.jsonl").read_text()
    assert sorted(path.name for path in stopped.iterdir()) == ["samples.jsonl", "summary.json"]
    summary = summary_of(stopped)
    assert summary["n"] == 5 and summary["samples"] == 2 and set(summary["pass_at_k"]) == {"1", "2"}
    assert summary["settings"] == {"threshold": 0.9, "max_iter": 2, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                   "max_new_tokens": 16, "greedy": False, "prompt_template": None, "samples": 2,
                                   "limit": None, "seed": 7, "batch_size": 2}
    records = [json.loads(line) for line in (stopped / "samples.jsonl").read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in records] == [(str(i), s) for i in range(5) for s in range(2)]
    first = load_problems("gsm8k", gsm8k_five).problems[0]
    assert records[0]["gold"] == first.gold and records[0]["prompt"] == f"<bos><|user|>{first.question}<|assistant|>"
    assert all(r["tokens"] == len(r["passes"]) and r["completion"] is not None for r in records)
    assert summary["tokens"] == sum(r["tokens"] for r in records)


def test_a_rerun_generates_only_the_unfinished_problems(checkpoint, gsm8k_five, tmp_path, monkeypatch):
    generation = importlib.import_module("tah.generation.generate")  # the module; the package re-exports the function
    rows = []
    real = generation.generate

    def counting(model, input_ids, *args, **kwargs):
        rows.append(input_ids.shape[0])
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", counting)
    base = ["eval", "--model", str(checkpoint), "--task", "gsm8k", "--data", str(gsm8k_five), "--out",
            str(tmp_path / "run"), "--greedy", "--max-new-tokens", "8", "--batch-size", "2", "--no-progress"]
    assert main([*base, "--limit", "3"]) == 0
    assert rows == [2, 1]
    first = (tmp_path / "run" / "samples.jsonl").read_text()
    assert main(base) == 0  # batches (0, 1) (2, 3) (4): the first is done; (2, 3) is decoded whole again
    assert rows == [2, 1, 2, 1]
    assert (tmp_path / "run" / "samples.jsonl").read_text().startswith(first.split("\n", 2)[0])
    assert main(base) == 0  # all done: nothing generated
    assert rows == [2, 1, 2, 1]
    assert summary_of(tmp_path / "run")["n"] == 5


def test_several_thresholds_share_the_model_and_write_a_directory_each(checkpoint, gsm8k_five, tmp_path, capsys):
    assert main(["eval", "--model", str(checkpoint), "--task", "gsm8k", "--data", str(gsm8k_five), "--out",
                 str(tmp_path), "--threshold", "0,1", "--greedy", "--max-new-tokens", "8", "--limit", "2",
                 "--no-progress"]) == 0
    always, never = summary_of(tmp_path / "threshold-0"), summary_of(tmp_path / "threshold-1")
    assert always["settings"]["threshold"] == 0 and never["settings"]["threshold"] == 1
    assert never["iterated_share"] == 0 and always["iterated_share"] > 0.5  # the decider's p > 1 never holds
    assert always["n"] == never["n"] == 2 and always["settings"]["greedy"] is True
    assert capsys.readouterr().out.count("gsm8k: accuracy") == 2


def test_a_plain_hugging_face_model_is_evaluated_as_the_one_pass_baseline(gsm8k_five, tmp_path, capsys):
    """A Standard model trained anywhere (no tah_config.json) answers exactly as HF's greedy generate does."""
    tokenizer = build_char_tokenizer(model_max_length=2048)
    base = tiny_lm(vocab=len(tokenizer), max_positions=1024, seed=3)
    where = tmp_path / "plain"
    base.save_pretrained(where)
    tokenizer.save_pretrained(where)
    assert main(["eval", "--model", str(where), "--task", "gsm8k", "--data", str(gsm8k_five), "--out",
                 str(tmp_path / "out"), "--greedy", "--max-new-tokens", "6", "--limit", "2", "--no-progress"]) == 0
    assert "plain Hugging Face model: evaluated as one pass" in capsys.readouterr().err
    assert summary_of(tmp_path / "out")["iterated_share"] == 0
    for record in map(json.loads, (tmp_path / "out" / "samples.jsonl").read_text().splitlines()):
        ids = torch.tensor([tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]])
        expected = base.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        assert record["completion"] == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


def test_a_directory_of_another_run_is_refused(checkpoint, gsm8k_five, tmp_path, capsys):
    base = ["eval", "--model", str(checkpoint), "--task", "gsm8k", "--data", str(gsm8k_five), "--out",
            str(tmp_path), "--max-new-tokens", "4", "--limit", "1", "--no-progress"]
    assert main(base) == 0
    assert main([*base, "--temperature", "1.0"]) == 2
    assert f"{tmp_path} holds another run (temperature 0.6 there, 1.0 now)" in capsys.readouterr().err


def test_eval_on_humaneval_runs_the_tests_in_the_sandbox(checkpoint, tmp_path):
    assert main(["eval", "--model", str(checkpoint), "--task", "humaneval", "--data",
                 str(COPIES / "humaneval.jsonl.gz"), "--out", str(tmp_path), "--greedy", "--max-new-tokens", "4",
                 "--limit", "2", "--no-progress", "--timeout", "5"]) == 0
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["HumanEval/0", "HumanEval/1"]
    assert not any(r["correct"] for r in records) and all(r["error"] for r in records)  # random text fails


# -- bad input: one clear line each, from the real command ---------------------------------------------------


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tah: error: "), result.stderr
    return lines[0]


def test_a_missing_data_file_is_named(checkpoint, tmp_path):
    line = one_error_line(run_tah("eval", "--model", checkpoint, "--task", "gsm8k", "--data", tmp_path / "nope.jsonl",
                                  "--out", tmp_path / "out"))
    assert f"--data {tmp_path / 'nope.jsonl'}: no such file" in line and "gsm8k_test.jsonl" in line


def test_an_unknown_task_is_named_with_the_choices(tmp_path, gsm8k_five):
    line = one_error_line(run_tah("grade", "--task", "gsm9k", "--data", gsm8k_five, "--samples", gsm8k_five,
                                  "--out", tmp_path))
    assert "--task 'gsm9k' is not a task; choose one of gsm8k, math500" in line


def test_a_row_without_an_answer_is_named_or_skipped_and_counted(tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1?", "answer": "2"}, {"question": "2+2?"}])
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": 0, "completion": "\\boxed{2}"}])
    line = one_error_line(run_tah("grade", "--task", "math", "--data", data, "--samples", samples, "--out",
                                  tmp_path / "out", "--strict"))
    assert f"{data} row 1: no 'answer' field" in line
    skipping = run_tah("grade", "--task", "math", "--data", data, "--samples", samples, "--out", tmp_path / "out",
                       "--no-progress")
    assert skipping.returncode == 0 and f"skipped {data} row 1: no 'answer' field" in skipping.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped"] == 1 and summary["accuracy"] == 1.0 and summary["n"] == 1


def test_a_checkpoint_without_a_tokenizer_is_named(checkpoint, gsm8k_five, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "tah_config.json"):
        if (checkpoint / name).is_file():
            (bare / name).symlink_to(checkpoint / name)
    line = one_error_line(run_tah("eval", "--model", bare, "--task", "gsm8k", "--data", gsm8k_five, "--out",
                                  tmp_path / "out"))
    assert f"--model {bare}: no tokenizer there" in line and "--tokenizer DIR" in line
