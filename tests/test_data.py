"""tah.data: reading rows (malformed ones skipped and named), chat-template tokenisation with
assistant-only labels, truncation, aliases, datasets on disk, and the collator."""

from __future__ import annotations

import json
import logging
import string

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from tah.data import TaHCollator, build_dataset, load_rows
from tah.errors import InputError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Like Qwen3: the last assistant turn gets a think block that history turns do not.
REWRITING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
             "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}"
             "{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<s>", "<unk>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def chat_tokenizer(template: str = CHATML) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer (103 ids) with a ChatML-style chat template."""
    vocab = {token: i for i, token in enumerate(SPECIALS + list(string.printable[:95]) + ["\n"])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one id per char
    core.add_special_tokens(SPECIALS)
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                        eos_token="<|im_end|>", unk_token="<unk>")
    tokenizer.chat_template = template
    return tokenizer


def write_jsonl(path, lines: list) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def chat(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def assistant_text(tokenizer, row) -> str:
    return tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])


BAD_ROWS = {  # kind -> (JSONL line, words the reason must contain)
    "invalid json": ('{"messages": [', "invalid JSON"),
    "missing field": ({"text": "no messages here"}, "missing field"),
    "missing response": ({"prompt": "hi"}, "missing field `response`"),
    "wrong type": ({"messages": [{"role": "user", "content": 3}]}, "must be a string"),
    "messages not a list": ({"messages": "hello"}, "must be a list"),
    "empty text": (chat("hi", "   "), "empty text"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
                     "unknown role"),
    "no assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    "not an object": ([1, 2], "expected a JSON object"),
}


def test_malformed_rows_are_skipped_and_reported_by_row_number(tmp_path, caplog):
    lines = [chat("Hi", "Hello!")]
    for line, _ in BAD_ROWS.values():
        lines.append(line)
    lines += ["", {"prompt": "2+2?", "response": "4"}]  # a blank line is not a row
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    conversations, report = load_rows(path)
    assert len(conversations) == 2 and report.rows == [1, len(lines)]
    assert report.total == len(lines) - 1
    assert [row for row, _ in report.skipped] == list(range(2, 2 + len(BAD_ROWS)))
    for (row, reason), (kind, (_, words)) in zip(report.skipped, BAD_ROWS.items(), strict=True):
        assert words in reason, (kind, row, reason)
    with caplog.at_level(logging.WARNING, logger="tah.data"):
        dataset = build_dataset(path, chat_tokenizer(), max_length=256)
    assert len(dataset) == 2 and dataset.column_names == ["input_ids", "labels"]
    assert f"skipped {len(BAD_ROWS)}" in caplog.text and "row 2: invalid JSON" in caplog.text


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_strict_raises_naming_the_row(tmp_path, kind):
    path = write_jsonl(tmp_path / "data.jsonl", [chat("Hi", "Hello!"), chat("a", "b"), BAD_ROWS[kind][0]])
    with pytest.raises(InputError, match=r"data\.jsonl row 3: .*--strict") as err:
        build_dataset(path, chat_tokenizer(), max_length=256, strict=True)
    assert BAD_ROWS[kind][1] in str(err.value)
    assert len(build_dataset(path, chat_tokenizer(), max_length=256)) == 2  # not strict: skipped


def test_empty_result_is_an_error(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [BAD_ROWS["missing field"][0], BAD_ROWS["invalid json"][0]])
    with pytest.raises(InputError, match=r"bad\.jsonl: no usable rows .*row 1: missing field"):
        build_dataset(bad, chat_tokenizer(), max_length=256)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(InputError, match="no rows"):
        load_rows(empty)
    array = tmp_path / "array.json"
    array.write_text(json.dumps([chat("a", "b"), chat("c", "d")], indent=1))
    with pytest.raises(InputError, match="JSON array"):
        load_rows(array)
    with pytest.raises(InputError, match="does not exist"):
        load_rows(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("template", [CHATML, REWRITING], ids=["chatml", "rewrites-history"])
def test_labels_cover_exactly_the_assistant_text(tmp_path, template):
    tokenizer = chat_tokenizer(template)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6, of course."}]
    path = write_jsonl(tmp_path / "data.jsonl", [{"messages": messages}])
    row = build_dataset(path, tokenizer, max_length=512)[0]
    think = "<think></think>" if template == REWRITING else ""
    assert assistant_text(tokenizer, row) == f"It is 4.<|im_end|>{think}6, of course.<|im_end|>"
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(row["input_ids"]) == rendered
    assert all(label in (-100, token) for token, label in zip(row["input_ids"], row["labels"], strict=True))
    assert row["labels"][0] == -100 and row["labels"][-1] == -100  # the trailing newline is not the reply's


def test_truncation_to_max_length(tmp_path):
    tokenizer = chat_tokenizer()
    path = write_jsonl(tmp_path / "data.jsonl", [chat("Hi", "A long answer " * 5), chat("x" * 60, "short")])
    full = build_dataset(path, tokenizer, max_length=1024)
    cut, report = build_dataset(path, tokenizer, max_length=40, return_report=True)
    assert len(full[0]["input_ids"]) > 40 and len(cut) == 1
    assert cut[0]["input_ids"] == full[0]["input_ids"][:40] and cut[0]["labels"] == full[0]["labels"][:40]
    assert report.skipped == [(2, "no assistant token within max_length=40 (the prompt is too long)")]
    with pytest.raises(InputError, match="row 2: no assistant token within max_length=40"):
        build_dataset(path, tokenizer, max_length=40, strict=True)


def test_prompt_response_and_question_answer_are_a_user_assistant_chat(tmp_path):
    tokenizer = chat_tokenizer()
    rows = [chat("2+2?", "4"), {"prompt": "2+2?", "response": "4"}, {"question": "2+2?", "answer": "4"}]
    dataset = build_dataset(write_jsonl(tmp_path / "data.jsonl", rows), tokenizer, max_length=256)
    assert len(dataset) == 3 and dataset[0] == dataset[1] == dataset[2]
    assert assistant_text(tokenizer, dataset[2]) == "4<|im_end|>"


def test_a_datasets_dataset_on_disk_is_input_too(tmp_path):
    tokenizer = chat_tokenizer()
    rows = [chat("Hi", "Hello!"), {"messages": None, "prompt": None, "response": None}, chat("2+2?", "4")]
    jsonl = write_jsonl(tmp_path / "data.jsonl", rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    from_disk, report = build_dataset(tmp_path / "disk", tokenizer, max_length=256, return_report=True)
    from_jsonl = build_dataset(jsonl, tokenizer, max_length=256)
    assert from_disk.to_dict() == from_jsonl.to_dict() and len(from_disk) == 2
    assert report.rows == [1, 3] and report.skipped[0][0] == 2 and "missing field" in report.skipped[0][1]


def test_a_tokenizer_without_chat_template_is_refused(tmp_path):
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(InputError, match="chat template"):
        build_dataset(write_jsonl(tmp_path / "d.jsonl", [chat("a", "b")]), tokenizer, max_length=64)


def test_collator_pads_right():
    collate = TaHCollator(pad_token_id=7, pad_to_multiple_of=4)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "iter_labels": [1, 2, -100]},
                     {"input_ids": torch.tensor([4, 5]), "labels": torch.tensor([4, 5]), "iter_labels": [2, -100],
                      "extra": "dropped"}])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "iter_labels"}
    assert all(v.dtype == torch.long and v.shape == (2, 4) for v in batch.values())
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7], [4, 5, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [4, 5, -100, -100]]
    assert batch["iter_labels"].tolist() == [[1, 2, -100, -100], [2, -100, -100, -100]]
    plain = TaHCollator(0)([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    assert "iter_labels" not in plain and plain["input_ids"].shape == (2, 3)
    with pytest.raises(InputError, match="same length"):
        TaHCollator(0)([{"input_ids": [1, 2], "labels": [1]}])
