"""Issue 31, items 4 and 5, through the real `tah` command: help and argument errors answer without
loading torch, and `tah generate` warns, hints, refuses and prints depth as a new user needs."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import randomize_lora, tiny_tah
from tah.cli import MAX_DRAFT_CANDIDATES
from tah.toy.tokenizer import build_char_tokenizer

TAH = str(Path(sys.executable).with_name("tah"))  # the console script of the environment running the tests


def run_tah(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    env.pop("FORCE_COLOR", None)
    return subprocess.run([TAH, *args], capture_output=True, text=True, env=env, timeout=timeout)


def imported_packages(stderr: str) -> set[str]:
    """Top-level packages named by PYTHONPROFILEIMPORTTIME's lines ("import time: us | us | name")."""
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)", stderr, flags=re.M)
    return {name.split(".")[0] for name in names}


def startup_packages() -> set[str]:
    """What a bare interpreter of this environment imports (site hooks, .pth files)."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run([sys.executable, "-c", "pass"], capture_output=True, text=True, env=env, timeout=60)
    return imported_packages(done.stderr)


def subcommands() -> list[str]:
    usage = run_tah("--help").stdout
    return re.search(r"\{([\w,-]+)\}", usage).group(1).split(",")


# -- item 4: help and argument errors answer at once ---------------------------------------------
def test_every_help_imports_only_the_standard_library():
    """Holds every registered subcommand to the rule: a register module imports the standard library
    only at top level (torch, transformers, rich ... load when a command runs)."""
    allowed = set(sys.stdlib_module_names) | startup_packages() | {"tah"}
    commands = subcommands()
    assert {"demo", "generate", "label", "prune", "train"} <= set(commands)
    for argv in [["--help"], *[[command, "--help"] for command in commands]]:
        done = run_tah(*argv, env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert done.returncode == 0 and "usage: tah" in done.stdout, (argv, done.stderr[-2000:])
        assert imported_packages(done.stderr) - allowed == set(), argv


def test_help_answers_in_well_under_a_second():
    seconds = []
    for _ in range(5):
        began = time.perf_counter()
        assert run_tah("train", "--help").returncode == 0
        seconds.append(time.perf_counter() - began)
    assert statistics.median(seconds) < 1.0, seconds  # ~0.05 s on a quiet machine; torch alone takes 2-7


@pytest.mark.parametrize("argv, named", [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1; got -1"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--threshold", "1.5"], "--threshold must be in [0, 1]"),
    (["--draft-candidates", "9"], f"--draft-candidates must be 1 to {MAX_DRAFT_CANDIDATES}"),
    (["--do-sample", "--draft-candidates", "2"], "--draft-candidates above 1 needs greedy decoding"),
])
def test_generate_argument_errors_come_before_any_model_loads(argv, named, tmp_path):
    done = run_tah("generate", "--model", str(tmp_path), "--prompt", "1+2=?", *argv,
                   env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 2 and f"tah: error: {named}" in done.stderr, done.stderr[-500:]
    assert "torch" not in imported_packages(done.stderr) and "Traceback" not in done.stderr


def test_cli_draft_candidate_bound_is_generates():
    from tah.generation.generate import MAX_DRAFT_CANDIDATES as GENERATE_BOUND

    assert MAX_DRAFT_CANDIDATES == GENERATE_BOUND


# -- item 5: tah generate ------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["", "   "])
@pytest.mark.parametrize("chat", [[], ["--chat"]])
def test_an_empty_prompt_is_refused(prompt, chat, tmp_path):
    done = run_tah("generate", "--model", str(tmp_path), "--prompt", prompt, *chat)
    assert done.returncode == 2 and "tah: error: --prompt is empty" in done.stderr


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory) -> Path:
    """A tiny stage-1 checkpoint (MLP decider never trained) with the toy's character tokenizer."""
    tokenizer = build_char_tokenizer()
    model = tiny_tah(decider="mlp", max_iter=2, vocab=len(tokenizer))
    randomize_lora(model, std=0.5)
    path = tmp_path_factory.mktemp("gen") / "stage1"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def piped(stage1_checkpoint) -> subprocess.CompletedProcess:
    """`tah generate --show-depth` with its output piped: threshold 0 makes the untrained decider
    iterate every token, so the plain form has brackets to show; the prompt holds a character the
    tokenizer lacks."""
    done = run_tah("generate", "--model", str(stage1_checkpoint), "--prompt", "12+34=?€", "--chat",
                   "--max-new-tokens", "6", "--show-depth", "--threshold", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_piped_show_depth_prints_passes_in_plain_text(piped):
    assert "\x1b[" not in piped.stdout
    passes = re.search(r"^passes per token: ([\d ]+)$", piped.stdout, flags=re.M).group(1).split()
    assert passes == ["2"] * 6  # threshold 0: sigmoid > 0 for every token
    marked = piped.stdout.split("[[x]] = 3\n", 1)[1].split("\npasses per token")[0]
    assert re.fullmatch(r"(\[[^\[\]]+\]){6}", marked.replace("\n", "")), marked
    assert re.search(r"^6 tokens, [\d.]+ tokens/s, 100\.0% of tokens iterated$", piped.stdout, flags=re.M)


def test_unknown_prompt_characters_are_named(piped):
    assert "tah: warning:" in piped.stderr and "no token for '€'" in piped.stderr
    assert "'1'" not in piped.stderr.split("no token for", 1)[1].split("in the prompt")[0]


def test_a_stage1_checkpoint_says_its_decider_is_untrained(piped, stage1_checkpoint):
    hint = piped.stderr.split("tah: warning: ")[-1]
    assert hint.startswith(f"{stage1_checkpoint} is a stage-1 checkpoint: its decider is untrained")
    assert "stage 2" in hint and "100.0% here" in hint
