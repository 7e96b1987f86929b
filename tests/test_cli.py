"""`tah generate` on a tiny model saved by the test: streamed, coloured text and a summary line."""

from __future__ import annotations

import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import randomize_lora, tiny_tah
from tah.cli import main

LETTERS = "abcdefghijklmnopqrstuvwxyz .,!?0123456789ABCDEFGHIJKLMNOPQRSTUVW"  # 64 one-char tokens


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(LETTERS[:61])}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


@pytest.fixture
def saved_model(tmp_path):
    model = tiny_tah(decider="random", random_rate=0.5, max_iter=2)
    randomize_lora(model, std=0.5)
    model.save_pretrained(tmp_path / "ckpt")
    char_tokenizer().save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_generate_show_depth_prints_coloured_text_and_a_summary(saved_model, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["generate", "--model", str(saved_model), "--prompt", "hello there", "--max-new-tokens", "24",
                 "--show-depth"]) == 0
    out = capsys.readouterr().out
    assert "passes:" in out  # the legend
    assert "\x1b[1;33m" in out  # bold yellow: tokens that made 2 passes
    summary = re.search(r"(\d+) tokens, ([\d.]+) tokens/s, ([\d.]+)% of tokens iterated", out)
    assert summary and int(summary.group(1)) == 24 and 0 < float(summary.group(3)) < 100


def test_generate_without_colour_prints_plain_text(saved_model, capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(["generate", "--model", str(saved_model), "--prompt", "abc", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out and "5 tokens" in out


def test_two_draft_candidates_print_the_same_text(saved_model, capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    texts = []
    for candidates in ("1", "2"):
        assert main(["generate", "--model", str(saved_model), "--prompt", "hello", "--max-new-tokens", "16",
                     "--draft-candidates", candidates]) == 0
        texts.append(capsys.readouterr().out.rsplit("\n16 tokens", 1)[0])
    assert texts[0] == texts[1] and texts[0].strip()
    assert main(["generate", "--model", str(saved_model), "--prompt", "abc", "--do-sample", "--max-new-tokens", "4",
                 "--draft-candidates", "2"]) == 2
    assert "greedy" in capsys.readouterr().err


def test_bad_request_is_a_clear_error_not_a_traceback(saved_model, capsys):
    assert main(["generate", "--model", str(saved_model), "--prompt", "abc", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    assert main(["generate", "--model", str(saved_model / "missing"), "--prompt", "abc"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("seeds", ["0", "-2"])
def test_demo_rejects_a_seed_count_below_one_before_doing_anything(seeds, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "out"), "--seeds", seeds]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_rejects_a_worker_count_below_one_before_doing_anything(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "out"), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
