"""tah.eval on tiny random models: policies, the oracle, overthinking, sweeps, answers, reports."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import pytest
import torch
from rich.console import Console

from conftest import randomize_lora, tiny_tah
from tah.data.chat import tokenize_conversations
from tah.errors import InputError
from tah.eval import (
    answer_accuracy,
    depth_analysis,
    depth_table,
    next_token_accuracy,
    overthinking,
    plot_sweep,
    results_table,
    samples_html,
    solution_records,
    threshold_sweep,
    write_results,
)
from tah.toy.task import TaskConfig, make_problems
from tah.toy.tokenizer import build_char_tokenizer

TOKENIZER = build_char_tokenizer()


def toy_model(seed: int = 0, **config):
    """A tiny TaH model on the toy vocabulary whose passes really disagree. Tied embeddings make a
    random model copy its input (right on repeated characters, at every depth); a slightly untied
    head keeps some of those hits and large LoRA weights let depth 1 both fix and break tokens."""
    model = tiny_tah(seed=seed, vocab=len(TOKENIZER), **config)
    gen = torch.Generator().manual_seed(seed)
    head = model.lm.get_output_embeddings()
    noise = torch.randn(head.weight.shape, generator=gen) * 0.05
    head.weight = torch.nn.Parameter(head.weight.detach().clone() + noise)
    randomize_lora(model, std=0.5, seed=seed)
    return model.eval()


def toy_data(count: int = 12, seed: int = 0, labels: bool = True) -> list[dict]:
    problems = make_problems(count, seed, TaskConfig.quick())
    columns = tokenize_conversations([p.messages() for p in problems], TOKENIZER, 128)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for ids, target in zip(columns["input_ids"], columns["labels"], strict=True):
        row = {"input_ids": ids, "labels": target}
        if labels:
            hard = 1 + (torch.rand(len(ids), generator=gen) < 0.3).long()
            hard[-1] = -100
            row["iter_labels"] = hard.tolist()
        rows.append(row)
    return rows


def per_token(model, data, passes) -> list[tuple[int, int, int]]:
    """(target, prediction, passes) of every supervised token, one unpadded example at a time."""
    out = []
    with torch.no_grad():
        for row in data:
            ids = torch.tensor([row["input_ids"]])
            iter_labels = None if passes is None else torch.full_like(ids, passes)
            result = model(ids, iter_labels=iter_labels)
            for t in range(ids.shape[1] - 1):
                if row["labels"][t + 1] != -100:
                    out.append((row["labels"][t + 1], int(result.logits[0, t].argmax()), int(result.iter_count[0, t])))
    return out


@pytest.fixture(scope="module")
def data():
    return toy_data()


@pytest.mark.parametrize("policy,passes", [("always1", 1), ("always2", 2), ("model", None)])
def test_next_token_accuracy_matches_manual(data, policy, passes):
    model = toy_model(decider="random", random_rate=0.3)
    got = next_token_accuracy(model, data, policy, batch_size=5)
    tokens = per_token(model, data, passes)
    assert got["tokens"] == len(tokens) == sum(label != -100 for row in data for label in row["labels"][1:])
    assert got["correct"] == sum(t == p for t, p, _ in tokens)
    assert got["iterated"] == sum(n > 1 for _, _, n in tokens)
    assert got["accuracy"] == pytest.approx(got["correct"] / got["tokens"])
    assert got["iterated_share"] == {"always1": 0.0, "always2": 1.0}.get(policy, got["iterated"] / got["tokens"])
    assert 0 < got["iterated"] < got["tokens"] or policy != "model"


def test_ready_batches_and_datasets_give_the_same_numbers(data):
    import datasets

    from tah.data.collator import TaHCollator

    model = toy_model(decider="random", random_rate=0.3)
    expected = next_token_accuracy(model, data, "model", batch_size=5)
    batches = [TaHCollator(0)(data[:7]), TaHCollator(0)(data[7:])]
    assert next_token_accuracy(model, batches, "model") == expected
    assert next_token_accuracy(model, iter(batches), "model") == expected
    assert next_token_accuracy(model, datasets.Dataset.from_list(data), "model", batch_size=4) == expected
    with pytest.raises(InputError, match="labels"):
        next_token_accuracy(model, [{"input_ids": batches[0]["input_ids"]}])
    with pytest.raises(InputError, match="no evaluation data"):
        next_token_accuracy(model, [])


def test_labels_policy_follows_iter_labels(data):
    model = toy_model()
    got = next_token_accuracy(model, data, "labels", batch_size=4)
    hard = sum(row["iter_labels"][t] > 1 for row in data for t in range(len(row["labels"]) - 1)
               if row["labels"][t + 1] != -100)
    assert got["iterated"] == hard > 0


@pytest.mark.parametrize("seed", range(4))
def test_oracle_beats_both_fixed_depths(seed):
    model, data = toy_model(seed=seed), toy_data(10, seed=seed)
    analysis = depth_analysis(model, data, batch_size=4)
    one, two, oracle = (analysis[k] for k in ("always1", "always2", "oracle"))
    assert one["tokens"] == two["tokens"] == oracle["tokens"] == analysis["tokens"]
    assert oracle["correct"] >= one["correct"] and oracle["correct"] >= two["correct"]
    # It is exactly the union of the two runs' hits, and it iterates exactly depth 0's misses.
    first, second = per_token(model, data, 1), per_token(model, data, 2)
    assert oracle["correct"] == sum(t == p1 or t == p2 for (t, p1, _), (_, p2, _) in zip(first, second, strict=True))
    assert oracle["iterated"] == one["tokens"] - one["correct"]
    assert one["correct"] != two["correct"] or oracle["correct"] > one["correct"]  # depth 1 does change things
    assert next_token_accuracy(model, data, "oracle", batch_size=3)["correct"] == oracle["correct"]


def test_joint_oracle_iterates_depth0_misses(data):
    model = toy_model(seed=1)
    analysis = depth_analysis(model, data, batch_size=4)
    assert analysis["oracle_joint"]["iterated"] == analysis["always1"]["tokens"] - analysis["always1"]["correct"]
    assert next_token_accuracy(model, data, "oracle_joint", batch_size=4) == analysis["oracle_joint"]


def test_overthinking_matches_per_token_recount(data):
    model = toy_model(seed=2)
    got = overthinking(model, data, batch_size=4)
    first, second = per_token(model, data, 1), per_token(model, data, 2)
    right = [t == p for t, p, _ in first]
    final = [t == p for t, p, _ in second]
    turned = sum(r and not f for r, f in zip(right, final, strict=True))
    fixed = sum(f and not r for r, f in zip(right, final, strict=True))
    assert got["right_after_depth0"] == sum(right) and got["wrong_after_depth0"] == len(right) - sum(right)
    assert (got["turned_wrong"], got["fixed"]) == (turned, fixed)
    assert got["overthink_share"] == pytest.approx(turned / sum(right))
    assert got["fix_share"] == pytest.approx(fixed / (len(right) - sum(right)))
    assert turned + fixed > 0


def test_policies_are_checked(data):
    standard = tiny_tah(vocab=len(TOKENIZER), max_iter=1)
    for policy in ("always2", "oracle", "oracle_joint"):
        with pytest.raises(InputError, match="max_iter"):
            next_token_accuracy(standard, data, policy)
    with pytest.raises(InputError, match="policy must be one of"):
        next_token_accuracy(toy_model(), data, "sometimes")
    with pytest.raises(InputError, match="iter_labels"):
        next_token_accuracy(toy_model(), toy_data(labels=False), "labels")
    assert next_token_accuracy(standard, data)["iterated_share"] == 0.0


def test_threshold_sweep_trades_compute(data):
    model = toy_model(seed=3)
    model.set_threshold(0.9)
    thresholds = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]
    sweep = threshold_sweep(model, data, thresholds, batch_size=6)
    shares = [point["iterated_share"] for point in sweep]
    assert [point["threshold"] for point in sweep] == thresholds
    assert all(a >= b for a, b in zip(shares, shares[1:], strict=False))
    assert shares[-1] == 0.0 and shares[0] == 1.0 and len(set(shares)) > 2
    assert sweep[-1]["accuracy"] == next_token_accuracy(model, data, "always1")["accuracy"]
    assert model.tah_config.threshold == 0.9 and model.decider.threshold == 0.9
    with pytest.raises(InputError, match="MLP decider"):
        threshold_sweep(toy_model(decider="always"), data)


def test_threshold_sweep_with_answers():
    model = toy_model(seed=4)
    problems = make_problems(3, 0, TaskConfig.quick())
    sweep = threshold_sweep(model, toy_data(4), [0.0, 1.0], tokenizer=TOKENIZER, problems=problems, max_new_tokens=6)
    assert sweep[0]["answer_iterated_share"] == 1.0 and sweep[1]["answer_iterated_share"] == 0.0


def test_answer_accuracy_records_generation():
    model = toy_model(seed=5, decider="random", random_rate=0.4)
    problems = make_problems(5, 0, TaskConfig.quick())
    got = answer_accuracy(model, TOKENIZER, problems, max_new_tokens=12, batch_size=2)
    assert got["problems"] == 5 and len(got["records"]) == 5
    counts = [c for r in got["records"] for c in r["iter_counts"]]
    assert got["generated_tokens"] == len(counts) and got["iterated_share"] == sum(c > 1 for c in counts) / len(counts)
    for problem, record in zip(problems, got["records"], strict=True):
        assert len(record["tokens"]) == len(record["iter_counts"]) <= 12 and min(record["iter_counts"]) >= 1
        # Batched, left-padded generation equals generating the prompt alone.
        text = TOKENIZER.apply_chat_template(problem.messages()[:1], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([TOKENIZER(text)["input_ids"]])
        alone = model.generate(ids, max_new_tokens=12, eos_token_id=TOKENIZER.eos_token_id)[0, ids.shape[1]:]
        assert "".join(record["tokens"]) == TOKENIZER.decode(alone)
        assert record["correct"] is (record["predicted"] == problem.answer)
    # Grading goes through answer_of: an oracle grader makes every problem right.
    answers = iter(p.answer for p in problems)
    assert answer_accuracy(model, TOKENIZER, problems, 4, answer_of=lambda text: next(answers))["accuracy"] == 1.0


def test_solution_records_follow_the_data(data):
    model = toy_model(seed=6, decider="random", random_rate=0.3)
    problems = make_problems(3, 0, TaskConfig.quick())
    records = solution_records(model, TOKENIZER, data, count=3, batch_size=2)
    assert len(records) == 3
    for problem, record, row in zip(problems, records, data[:3], strict=True):
        assert "".join(record["tokens"]) == problem.solution + "<eos>"
        assert record["question"] == problem.question
        supervised = [t for t in range(len(row["labels"]) - 1) if row["labels"][t + 1] != -100]
        assert record["hard"] == [row["iter_labels"][t] > 1 for t in supervised]
        assert len(record["iter_counts"]) == len(record["predicted"]) == len(record["token_correct"]) == len(supervised)


class Spans(HTMLParser):
    """Collects the token spans of each sample, and every start tag."""

    def __init__(self):
        super().__init__()
        self.samples, self.tags, self.depth = [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        classes = (attrs.get("class") or "").split()
        if "text" in classes:
            self.samples.append([])
        if tag == "span" and "tok" in classes and self.samples and "data-passes" in attrs:
            self.samples[-1].append((classes, int(attrs["data-passes"])))


def test_samples_html_colours_every_token(data, tmp_path):
    model = toy_model(seed=7, decider="random", random_rate=0.3)
    records = solution_records(model, TOKENIZER, data, count=4)
    records.append({"question": "<script>alert(1)</script>", "tokens": ["<", "&", "\n", "b"],
                    "iter_counts": [1, 2, 3, 5], "hard": [2, 1, 2, 1], "correct": False})
    path = samples_html(records, tmp_path / "samples.html", max_iter=2)
    parser = Spans()
    parser.feed(path.read_text(encoding="utf-8"))
    assert "script" not in parser.tags  # text is escaped
    assert [len(spans) for spans in parser.samples] == [len(r["tokens"]) for r in records]
    for spans, record in zip(parser.samples, records, strict=True):
        assert [passes for _, passes in spans] == record["iter_counts"]
        assert all(f"p{passes}" in classes for classes, passes in spans)
        hard = [h if isinstance(h, bool) else h > 1 for h in record["hard"]]
        mismatches = [h != (n > 1) for h, n in zip(hard, record["iter_counts"], strict=True)]
        assert ["mismatch" in classes for classes, _ in spans] == mismatches
    assert any("mismatch" in c for spans in parser.samples for c, _ in spans)
    text = path.read_text(encoding="utf-8")
    for passes in (1, 2, 3, 5):
        assert f".p{passes} {{ background:" in text  # every pass count used has a colour
    assert "Legend" in text
    with pytest.raises(InputError, match="iter_counts"):
        samples_html([{"tokens": ["a"], "iter_counts": [1, 2]}], tmp_path / "bad.html")


def test_plot_sweep_writes_a_png(tmp_path):
    from matplotlib.image import imread

    sweep = [{"threshold": t / 4, "accuracy": 0.5 + t / 20, "iterated_share": 1 - t / 4, "answer_accuracy": 0.3}
             for t in range(5)]
    path = plot_sweep(sweep, tmp_path / "plots" / "sweep.png",
                      references={"Standard": {"iterated_share": 0.0, "accuracy": 0.5}})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert [p.name for p in path.parent.iterdir()] == ["sweep.png"]


RESULTS = {
    "settings": {"seed": 0},
    "models": [
        {"name": "Standard", "answer_accuracy": 0.4, "next_token_accuracy": 0.91234, "iterated_share": 0.0,
         "parameters": 123456, "train_time_s": 12.34, "eval_time_s": 1.5},
        {"name": "TaH", "answer_accuracy": 0.5, "next_token_accuracy": 0.93, "iterated_share": 0.125,
         "parameters": 120000, "train_time_s": 30.0, "eval_time_s": None},
    ],
}


def render(table) -> list[str]:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text().splitlines()


def test_results_table_matches_results():
    lines = render(results_table(RESULTS))
    standard = next(line for line in lines if "Standard" in line)
    tah = next(line for line in lines if "TaH " in line or line.strip("│ ").startswith("TaH"))
    for cell in ("40.0%", "91.2%", "0.0%", "123,456", "12.3", "1.5"):
        assert cell in standard
    for cell in ("50.0%", "93.0%", "12.5%", "120,000", "30.0", "-"):
        assert cell in tah
    assert render(results_table(RESULTS["models"])) == lines
    with pytest.raises(InputError, match="models"):
        results_table({"rows": []})


def test_depth_table_shows_each_policy():
    analysis = {"always1": {"accuracy": 0.8, "iterated_share": 0.0}, "always2": {"accuracy": 0.82, "iterated_share": 1.0},
                "oracle": {"accuracy": 0.9, "iterated_share": 0.2},
                "overthinking": {"overthink_share": 0.05, "turned_wrong": 4, "right_after_depth0": 80,
                                 "fix_share": 0.5, "fixed": 10, "wrong_after_depth0": 20}}
    text = "\n".join(render(depth_table(analysis)))
    for cell in ("Always-1", "80.0%", "Always-2", "82.0%", "100.0%", "Oracle", "90.0%", "20.0%", "5.0%", "4/80", "10/20"):
        assert cell in text


def test_write_results_is_strict_json(tmp_path):
    results = {**RESULTS, "sweep": [{"threshold": 0.5, "accuracy": torch.tensor(0.75).item()}],
               "tensor": torch.tensor([1, 2]), "missing": math.nan, "path": tmp_path}
    path = write_results(results, tmp_path / "out" / "results.json")
    loaded = json.loads(path.read_text())
    assert loaded["models"] == RESULTS["models"] and loaded["tensor"] == [1, 2]
    assert loaded["missing"] is None and loaded["path"] == str(tmp_path)
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
    with pytest.raises(InputError, match="JSON"):
        write_results({"model": object()}, tmp_path / "bad.json")
