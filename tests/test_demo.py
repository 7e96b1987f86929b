"""`tah demo --quick`, run once as a user would (a subprocess, offline): every artefact exists and
agrees with the others, and the pipeline it drives (label -> prune -> stage 1 -> stage 2) did what
the training issue promises on the way: stage-1 loss falls, the decider beats the majority class
on held-out labels, and the saved model loads and generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from tah import TaHForCausalLM
from tah.data import load_labeled
from tah.toy.demo import MODELS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run `python -m tah.cli demo --quick` from an empty working directory, offline."""
    root = tmp_path_factory.mktemp("demo")
    cwd, out = root / "cwd", root / "cwd" / "out"
    cwd.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "COLUMNS": "200", "HF_HOME": str(root / "hf-home")}
    done = subprocess.run([sys.executable, "-m", "tah.cli", "demo", "--quick", "--out", "out"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    return {"out": out, "cwd": cwd, "stdout": done.stdout, "results": results, "run": results["runs"][0],
            "hf_home": root / "hf-home"}


def test_writes_only_under_out(demo):
    assert sorted(p.name for p in demo["cwd"].iterdir()) == ["out"]
    for name in ("results.json", "sweep.png", "samples.html", "seed-0"):
        assert (demo["out"] / name).exists(), name
    assert not demo["hf_home"].exists() or not any(demo["hf_home"].rglob("*.safetensors"))


def test_results_name_the_machine_and_library_versions(demo):
    """The figures depend on the CPU's kernels and may on the libraries: results.json says which ran."""
    import accelerate
    import torch
    import transformers

    machine = demo["results"]["machine"]
    for name, module in (("torch", torch), ("transformers", transformers), ("accelerate", accelerate)):
        assert f"{name} {module.__version__}" in machine, machine
    assert "CPUs" in machine, machine


def test_printed_table_rows_match_results_json(demo):
    rows = {line.split("│")[1].strip(): line for line in demo["stdout"].splitlines() if line.startswith("│")}
    assert [r["name"] for r in demo["results"]["models"]] == list(MODELS)
    for row in demo["results"]["models"]:
        line = rows[row["name"]]
        for key in ("answer_accuracy", "next_token_accuracy", "iterated_share"):
            assert f"{100 * row[key]:.1f}%" in line, (key, line)
        assert f"{row['parameters']:,}" in line
        assert f"{row['flops_per_token'] / 1e6:.2f}M" in line


def test_a_verdict_is_printed_for_every_claim(demo):
    claims = demo["results"]["claims"]
    assert len(claims) >= 6
    lines = [line for line in demo["stdout"].splitlines() if "hold" in line]
    for claim in claims:
        line = next(line for line in lines if claim["claim"] in line)
        assert ("does not hold" not in line) == claim["holds"], line


def test_flops_per_token_follow_the_passes(demo):
    models = {row["name"]: row for row in demo["results"]["models"]}
    standard, always = models["Standard"]["flops_per_token"], models["AlwaysIterate"]["flops_per_token"]
    assert 2 * standard < always < 2.5 * standard  # a second pass, plus its LoRA
    assert standard < models["TaH+"]["flops_per_token"] < always


def test_tah_iterates_some_tokens_standard_none_always_all(demo):
    models = {row["name"]: row for row in demo["results"]["models"]}
    assert models["Standard"]["iterated_share"] == 0.0
    assert models["AlwaysIterate"]["iterated_share"] == 1.0
    for name in ("TaH", "TaH+"):
        assert 0.0 < models[name]["iterated_share"] < 1.0, name
    # TaH has one layer fewer than TaH+; its extra parameters are LoRA and the decider.
    assert models["TaH"]["parameters"] < models["Standard"]["parameters"] < models["TaH+"]["parameters"]


def test_oracle_is_at_least_both_fixed_depths_on_the_same_tokens(demo):
    analysis = demo["run"]["depth_analysis"]
    tokens = {analysis[k]["tokens"] for k in ("always1", "always2", "oracle")}
    assert tokens == {analysis["tokens"]}
    oracle = analysis["oracle"]["correct"]
    assert oracle >= analysis["always1"]["correct"] and oracle >= analysis["always2"]["correct"]
    # Per token it takes depth 0 where depth 0 is right, so it iterates exactly the depth-0 misses.
    assert analysis["oracle"]["iterated"] == analysis["tokens"] - analysis["always1"]["correct"]
    over = analysis["overthinking"]
    assert 0.0 <= over["overthink_share"] <= 1.0 and 0.0 <= over["fix_share"] <= 1.0


class _Spans(HTMLParser):
    """Counts the token spans (those with data-passes) inside each sample, by kind (generated, reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: dict[str, list[list[int]]] = {"generated": [], "reference": []}
        self.current: list[int] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "div" and "sample" in classes:
            self.current = []
            self.samples[next(kind for kind in self.samples if kind in classes)].append(self.current)
        elif tag == "span" and "data-passes" in attrs:
            assert f"p{attrs['data-passes']}" in attrs["class"].split()
            self.current.append(int(attrs["data-passes"]))


def test_samples_html_colours_every_solution_token(demo):
    parser = _Spans()
    parser.feed((demo["out"] / "samples.html").read_text(encoding="utf-8"))
    heldout = load_labeled(demo["out"] / "seed-0" / "data" / "labeled-heldout")
    references = parser.samples["reference"]
    expected = [sum(label != -100 for label in heldout[i]["labels"][1:]) for i in range(len(references))]
    assert len(references) == demo["results"]["settings"]["samples"]
    assert [len(s) for s in references] == expected
    assert {p for s in references for p in s} <= {1, 2}


def test_samples_html_shows_the_models_own_answers_labelled(demo):
    text = (demo["out"] / "samples.html").read_text(encoding="utf-8")
    parser = _Spans()
    parser.feed(text)
    generated = parser.samples["generated"]
    assert len(generated) == demo["results"]["settings"]["samples"] and all(generated)
    assert {p for s in generated for p in s} <= {1, 2}
    assert text.count("generated by TaH+") == len(generated) and "The model&#x27;s own answers" in text
    assert text.index("generated by TaH+") < text.index("reference solution")


def test_sweep_png_is_a_valid_image(demo):
    from PIL import Image

    with Image.open(demo["out"] / "sweep.png") as image:
        image.verify()
        assert image.format == "PNG" and min(image.size) > 100
    sweep = demo["run"]["sweep"]
    shares = [point["iterated_share"] for point in sweep]
    assert shares == sorted(shares, reverse=True)  # a higher threshold never iterates more


def test_stage1_loss_falls(demo):
    losses = demo["run"]["stage1_loss"]
    assert len(losses) >= 3 and losses[-1] < losses[0]


def test_stage2_decider_beats_majority_on_heldout_labels(demo):
    run_dir = demo["out"] / "seed-0"
    model = TaHForCausalLM.from_pretrained(run_dir / "runs" / "tah-stage2" / "final").eval()
    heldout = load_labeled(run_dir / "data" / "labeled-heldout")
    right = judged = positives = 0
    with torch.no_grad():
        for example in heldout:
            passes = model(torch.tensor([example["input_ids"]])).iter_count[0]
            for went_on, label in zip((passes > 1).tolist(), example["iter_labels"], strict=True):
                if label != -100:
                    judged += 1
                    positives += label > 1
                    right += went_on == (label > 1)
    majority = max(positives, judged - positives) / judged
    assert right / judged > majority, (right / judged, majority)


def test_saved_model_loads_and_generates(demo):
    from transformers import AutoTokenizer

    from tah.generation import generate

    path = demo["out"] / "seed-0" / "runs" / "tah-stage2" / "final"
    model = TaHForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "12+34=?"}], add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = generate(model, ids, max_new_tokens=12)
    assert out.sequences.shape[1] > ids.shape[1]
    assert Path(path, "tah_config.json").is_file()


def test_the_readme_generate_example_runs_on_the_demo_checkpoint(demo):
    """The README's `tah generate` line, pointed at this demo's output, answers in the task's form."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    line = next(line for line in readme.splitlines() if line.startswith("tah generate --model tah-demo/"))
    argv = shlex.split(line.replace("tah-demo/", f"{demo['out']}/"))[1:]
    done = subprocess.run([sys.executable, "-m", "tah.cli", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 0 and "tah: warning" not in done.stderr, done.stderr[-2000:]
    assert re.search(r"^\d+\+\d+=\d+$", done.stdout, flags=re.M), done.stdout  # a step of the task's form
    assert "passes per token:" in done.stdout
