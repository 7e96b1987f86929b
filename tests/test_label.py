"""`tah label` / tah.data.label_dataset: hard labels are exactly the reference's argmax misses, deeper
passes follow its cross-entropy, a killed run resumes without redoing or losing a shard, and two
processes under `accelerate launch` write what one does."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import datasets
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_lm, tiny_tah
from tah.cli import main
from tah.data import TaHCollator, build_dataset, label_dataset, load_labeled, pass_counts
from tah.data.label import PAUSE_ENV
from tah.errors import InputError
from test_data import chat_tokenizer, write_jsonl

VOCAB = 104  # chat_tokenizer's 103 ids, rounded up
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


class RuleReference(nn.Module):
    """A 'reference model' whose argmax at t is (3 * id + 1) mod V and whose confidence grows with id."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.ones(()))
        self.seen_masks: list[torch.Tensor] = []

    def predict(self, ids: torch.Tensor) -> torch.Tensor:
        return (3 * ids + 1) % self.vocab

    def forward(self, input_ids, attention_mask, **_):
        self.seen_masks.append(attention_mask.clone())
        logits = F.one_hot(self.predict(input_ids), self.vocab).float() * (1.0 + input_ids.unsqueeze(-1) / 4)
        return type("Out", (), {"logits": logits * self.scale})()


def rule_dataset(vocab: int = 16, rows: int = 11, seed: int = 0) -> datasets.Dataset:
    """Rows of varied lengths whose next token follows RuleReference's prediction about half the time."""
    gen = torch.Generator().manual_seed(seed)
    input_ids, labels = [], []
    for r in range(rows):
        ids = [int(torch.randint(vocab, (1,), generator=gen))]
        for _ in range(2 + (r * 5) % 13):
            follow = torch.rand((), generator=gen) < 0.5
            ids.append((3 * ids[-1] + 1) % vocab if follow else int(torch.randint(vocab, (1,), generator=gen)))
        input_ids.append(ids)
        labels.append([-100] * (len(ids) // 2) + ids[len(ids) // 2:])  # the second half is "assistant"
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def test_hard_labels_are_exactly_where_the_reference_argmax_misses(tmp_path):
    reference, data = RuleReference(), rule_dataset()
    stats = label_dataset(reference, data, tmp_path / "out", batch_size=3, shard_size=4, save_stats=True,
                          progress=False)
    labelled = load_labeled(tmp_path / "out")
    assert len(labelled) == len(data) and labelled["input_ids"] == data["input_ids"]
    assert labelled["labels"] == data["labels"]
    assert any(int(m.min()) == 0 for m in reference.seen_masks)  # batches really were padded
    hard = total = assistant = assistant_hard = 0
    for ids, labels, iters, ce in zip(data["input_ids"], data["labels"], labelled["iter_labels"],
                                      labelled["ref_ce"], strict=True):
        pairs = zip(ids[:-1], ids[1:], strict=True)
        expected = [2 if reference.predict(torch.tensor(a)) != b else 1 for a, b in pairs]
        assert iters == expected + [-100]
        assert ce[-1] == 0.0 and all(c > 0 for c in ce[:-1])
        hard += expected.count(2)
        total += len(expected)
        on_reply = [e for e, label in zip(expected, labels[1:], strict=True) if label != -100]
        assistant += len(on_reply)
        assistant_hard += on_reply.count(2)
    assert 0 < hard < total
    assert stats["rows"] == len(data) and stats["labelled_tokens"] == total and stats["hard_tokens"] == hard
    assert stats["hard_share"] == pytest.approx(hard / total)
    assert stats["assistant_hard_share"] == pytest.approx(assistant_hard / assistant)
    assert stats["iter_histogram"] == {"1": total - hard, "2": hard}
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["hard_tokens"] == hard
    assert not (tmp_path / "out" / "shards").exists()  # merged, then removed


def test_deeper_passes_count_the_ce_thresholds_a_hard_token_exceeds():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 30, 6, generator=gen) * 1.5
    ids = torch.randint(6, (2, 30), generator=gen)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 20:] = 0  # right padding
    thresholds = [2.0, 3.5]
    out = pass_counts(logits, ids, mask, max_iter=4, deep_ce=thresholds)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    for b, n in ((0, 30), (1, 20)):
        for t in range(30):
            if t >= n - 1:
                assert out["iter_labels"][b, t] == -100
            elif logits[b, t].argmax() == ids[b, t + 1]:
                assert out["iter_labels"][b, t] == 1
            else:
                assert out["iter_labels"][b, t] == 2 + sum(ce[b, t].item() > x for x in thresholds)
    assert {1, 2, 3, 4} <= set(out["iter_labels"].flatten().tolist())
    assert torch.allclose(out["ref_ce"][0, :-1], ce[0])
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert torch.allclose(out["ref_entropy"][0, :-1], entropy[0, :-1])
    # Left padding: the same row shifted right gives the same labels.
    left = pass_counts(logits[1:].roll(10, 1), ids[1:].roll(10, 1), mask[1:].roll(10, 1), max_iter=2)
    right = pass_counts(logits[1:], ids[1:], mask[1:], max_iter=2)
    assert left["iter_labels"].roll(-10, 1).tolist() == right["iter_labels"].tolist()
    for bad in ({"max_iter": 3}, {"max_iter": 3, "deep_ce": [2.0, 1.0]}, {"max_iter": 4, "deep_ce": [2.0, 1.0]},
                {"max_iter": 2, "deep_ce": [1.0]}, {"max_iter": 1}):
        with pytest.raises(InputError):
            pass_counts(logits, ids, mask, **bad)


def test_confidence_also_marks_the_right_but_unsure_tokens_hard():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 40, 5, generator=gen) * 2
    ids = torch.randint(5, (2, 40), generator=gen)
    mask = torch.ones(2, 40, dtype=torch.long)
    plain = pass_counts(logits, ids, mask)["iter_labels"]
    unsure = pass_counts(logits, ids, mask, confidence=0.6)["iter_labels"]
    p_true = logits[:, :-1].softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    right = logits[:, :-1].argmax(-1) == ids[:, 1:]
    expected = torch.where(right & (p_true >= 0.6), 1, 2)
    assert unsure[:, :-1].tolist() == expected.tolist() and (unsure[:, -1] == -100).all()
    assert ((unsure == 2) & (plain == 1)).any()  # right but unsure: hard only with confidence
    assert ((plain == 2) <= (unsure == 2)).all()  # every miss stays hard
    for bad in (0.0, 1.0, 1.5, True):
        with pytest.raises(InputError, match="confidence"):
            pass_counts(logits, ids, mask, confidence=bad)


def test_prompt_easy_keeps_the_prompt_one_pass_and_the_answer_as_before(tmp_path):
    reference, data = RuleReference(), rule_dataset()
    label_dataset(reference, data, tmp_path / "plain", batch_size=3, shard_size=4, progress=False)
    plain = load_labeled(tmp_path / "plain")
    stats = label_dataset(reference, data, tmp_path / "easy", batch_size=3, shard_size=4, prompt_easy=True,
                          progress=False)
    easy = load_labeled(tmp_path / "easy")
    prompt_hard = 0
    for labels, before, after in zip(data["labels"], plain["iter_labels"], easy["iter_labels"], strict=True):
        answer_next = [label != -100 for label in labels[1:]] + [False]
        for t, is_answer in enumerate(answer_next):
            assert after[t] == (before[t] if is_answer or before[t] == -100 else 1), (t, before, after)
            prompt_hard += not is_answer and before[t] == 2
    assert prompt_hard > 0  # the plain rule did mark prompt positions hard
    assert stats["prompt_easy"] and stats["assistant_hard_tokens"] == stats["hard_tokens"] > 0
    with pytest.raises(InputError, match="other settings|different"):  # a resumed run keeps its rule
        label_dataset(reference, data, tmp_path / "easy", batch_size=3, shard_size=4, progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random HF reference with a chat tokenizer saved to a directory, JSONL data, and the
    labels `label_dataset` writes in this process (the runs below must reproduce them)."""
    root = tmp_path_factory.mktemp("label")
    tokenizer = chat_tokenizer()
    model = tiny_lm(vocab=VOCAB, seed=1)
    model.save_pretrained(root / "ref")
    tokenizer.save_pretrained(root / "ref")
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: " + "abc" * (i % 4)},
                          {"role": "assistant", "content": f"Answer {i * 7}." + " ok" * (i % 3)}]} for i in range(12)]
    data = write_jsonl(root / "data.jsonl", rows[:5] + ["{broken"] + rows[5:])
    dataset = build_dataset(data, tokenizer, max_length=64)
    label_dataset(model, dataset, root / "expected", batch_size=3, shard_size=4, progress=False,
                  save_stats=True)
    return {"root": root, "model": model, "data": data, "dataset": dataset,
            "expected": load_labeled(root / "expected" / "dataset")}


def test_labels_equal_an_unbatched_run_of_the_reference(reference):
    model, expected = reference["model"], reference["expected"]
    assert len(expected) == 12
    for row in expected:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0]
        misses = (logits[:-1].argmax(-1) != ids[0, 1:]).long() + 1
        assert row["iter_labels"] == misses.tolist() + [-100]
        ce = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
        assert torch.allclose(torch.tensor(row["ref_ce"][:-1]), ce, atol=1e-4)


def test_labelled_batches_drive_the_oracle_iterations(reference):
    batch = TaHCollator(0)([reference["expected"][i] for i in range(4)])
    model = tiny_tah(vocab=VOCAB, decider="oracle")
    out = model(**batch)
    assert out.loss is not None and torch.isfinite(out.loss)
    real = batch["attention_mask"].bool()
    wanted = batch["iter_labels"].clamp(min=1)  # -100: no label, one pass
    assert torch.equal(out.iter_count[real], wanted[real])


def test_finished_run_is_reused_and_other_settings_are_refused(reference, tmp_path):
    out = reference["root"] / "expected"
    stats_before = (out / "stats.json").read_text()
    again = label_dataset(reference["model"], reference["dataset"], out, batch_size=3, shard_size=4,
                          progress=False, save_stats=True)
    assert (out / "stats.json").read_text() == stats_before and again["rows"] == 12
    with pytest.raises(InputError, match="other settings or data.*shard_size"):
        label_dataset(reference["model"], reference["dataset"], out, batch_size=3, shard_size=5, progress=False,
                      save_stats=True)
    with pytest.raises(InputError, match="run `tah label"):
        load_labeled(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match="unfinished"):
        load_labeled(tmp_path)
    with pytest.raises(InputError, match="not a labelled one"):
        datasets.Dataset.from_dict({"input_ids": [[1]], "labels": [[1]]}).save_to_disk(str(tmp_path / "plain"))
        load_labeled(tmp_path / "plain")


def test_cli_refuses_bad_settings_before_loading(reference, tmp_path, capsys):
    args = ["label", "--model", str(reference["root"] / "ref"), "--data", reference["data"], "--out", str(tmp_path)]
    assert main(args + ["--max-iter", "3"]) == 2
    assert "--deep-ce" in capsys.readouterr().err
    assert main(args + ["--confidence", "1.2"]) == 2
    assert "--confidence" in capsys.readouterr().err
    assert main(["label", "--model", str(tmp_path / "nope"), "--data", reference["data"], "--out",
                 str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_cli_prompt_easy_labels_only_answer_tokens(reference, tmp_path):
    assert main(label_command(reference, tmp_path / "out", "--prompt-easy")[2:]) == 0
    got, expected = load_labeled(tmp_path / "out"), reference["expected"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["prompt_easy"] is True
    for labels, iters, before in zip(got["labels"], got["iter_labels"], expected["iter_labels"], strict=True):
        answer_next = [label != -100 for label in labels[1:]] + [False]
        assert iters == [b if b == -100 or a else 1 for a, b in zip(answer_next, before, strict=True)]


def label_command(reference, out, *extra) -> list[str]:
    return ["-m", "tah.cli", "label", "--model", str(reference["root"] / "ref"), "--data", reference["data"],
            "--out", str(out), "--max-length", "64", "--batch-size", "3", "--shard-size", "4", "--save-stats",
            "--no-progress", *extra]


def assert_same_as_expected(reference, out) -> dict:
    got, expected = load_labeled(out), reference["expected"]
    assert got.column_names == expected.column_names
    for name in ("input_ids", "labels", "iter_labels"):
        assert got[name] == expected[name], name
    for name in ("ref_ce", "ref_entropy"):
        assert torch.allclose(torch.tensor(sum(got[name], [])), torch.tensor(sum(expected[name], [])), atol=1e-5)
    return json.loads((out / "stats.json").read_text())


def test_a_killed_run_resumes_without_redoing_or_losing_a_shard(reference, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, *label_command(reference, out)], env={**ENV, PAUSE_ENV: "30"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / "shards" / "shard-00000").exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first shard never appeared"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate()  # reaps it and closes its pipes
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000"]
    assert not (out / "dataset").exists()
    (out / "shards" / ".shard-00001.tmp").mkdir()  # as if killed while writing shard 1
    (out / "shards" / ".shard-00001.tmp" / "data-00000-of-00001.arrow").write_bytes(b"half")

    second = subprocess.run([sys.executable, *label_command(reference, out)], env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "resuming: 1 of 3 shards already done" in second.stderr
    assert "skipped 1 (row 6: invalid JSON" in second.stderr and "hard overall" in second.stdout
    stats = assert_same_as_expected(reference, out)
    writers = [shard["written_by_pid"] for shard in stats["shards"]]
    assert writers[0] == first.pid and first.pid not in writers[1:] and len(writers) == 3
    assert stats["data"]["skipped"] == 1 and stats["data"]["kept"] == 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_accelerate_write_what_one_does(reference, tmp_path):
    out = tmp_path / "out"
    # On CPU, accelerate's --cpu launcher starts one process (without MPI); --multi_gpu starts torchrun,
    # and `tah label` (which passes cpu=True to PartialState without CUDA) then talks over gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    run = subprocess.run(launch + label_command(reference, out), env=ENV, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    stats = assert_same_as_expected(reference, out)
    writers = [shard["written_by_pid"] for shard in stats["shards"]]
    assert writers[0] == writers[2] != writers[1]  # process 0 took shards 0 and 2, process 1 shard 1
