"""The toy arithmetic task and its character tokenizer."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from tah.data.chat import build_dataset, tokenize_chat
from tah.errors import InputError
from tah.toy.task import (
    Problem,
    TaskConfig,
    extract_answer,
    hard_chars,
    hard_share,
    is_correct,
    make_problems,
    make_splits,
    read_jsonl,
    solve,
    split_of,
    to_jsonl,
)
from tah.toy.tokenizer import ALPHABET, build_char_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


# -- problems ----------------------------------------------------------------------------------
def test_problems_are_deterministic_per_seed():
    config = TaskConfig.quick()
    assert make_problems(50, 3, config) == make_problems(50, 3, config)
    assert make_problems(50, 3, config) != make_problems(50, 4, config)
    assert make_splits(config)[1] == make_splits(config)[1]


@pytest.mark.parametrize("config", [TaskConfig.quick(), TaskConfig()], ids=["quick", "default"])
def test_solutions_and_answers_are_right(config):
    for problem in make_problems(300, 0, config):
        expression = problem.question.removesuffix("=?")
        assert re.fullmatch(r"\d+([+-]\d+)+", expression)
        assert int(eval(expression)) == problem.answer  # the arithmetic, computed independently
        terms = re.findall(r"\d+", expression)
        assert config.terms[0] <= len(terms) <= config.terms[1]
        assert all(config.digits[0] <= len(t) <= config.digits[1] for t in terms)
        *steps, last = problem.solution.split("\n")
        assert last == f"#### {problem.answer}" and len(steps) == len(terms) - 1
        running = int(terms[0])
        for step, term in zip(steps, terms[1:], strict=True):
            left, result = step.split("=")
            assert re.fullmatch(rf"{running}[+-]{term}", left)
            assert int(eval(left)) == int(result) >= 0
            running = int(result)


def test_heldout_never_overlaps_train():
    config = TaskConfig.quick(heldout_fraction=0.2)
    train, heldout = make_splits(config)
    assert len(train) == config.train_size and len(heldout) == config.heldout_size
    assert not {p.question for p in train} & {p.question for p in heldout}
    # Whatever the seeds: the split is a function of the question text alone.
    other_train = make_problems(2000, 7, config, "train")
    assert not {p.question for p in other_train} & {p.question for p in make_problems(400, 8, config, "heldout")}
    assert all(split_of(p.question, 0.2) == "heldout" for p in heldout)
    assert all(split_of(p.question, 0.2) == "train" for p in train)
    assert len({p.question for p in train}) == len(train)  # distinct within a split


def test_unsplit_problems_cover_both_sides():
    sides = {split_of(p.question, 0.1) for p in make_problems(500, 0, TaskConfig.quick())}
    assert sides == {"train", "heldout"}


def test_hard_chars_mark_computed_digits():
    problem = solve([47, 38, 21], ["+", "-"])
    assert problem == Problem("47+38-21=?", "47+38=85\n85-21=64\n#### 64", 64)
    marked = "".join(ch for ch, hard in zip(problem.solution, hard_chars(problem), strict=True) if hard)
    assert marked == "8564"
    assert len(hard_chars(problem)) == len(problem.solution)


def test_width_pads_every_number_and_keeps_the_arithmetic():
    problem = solve([47, 38, 921], ["+", "+"], width=4)
    assert problem == Problem("0047+0038+0921=?", "0047+0038=0085\n0085+0921=1006\n#### 1006", 1006)
    marked = "".join(ch for ch, hard in zip(problem.solution, hard_chars(problem), strict=True) if hard)
    assert marked == "00851006"
    config = TaskConfig.quick(width=4)
    for problem in make_problems(200, 0, config):
        assert all(len(number) == 4 for number in re.findall(r"\d+", problem.question + problem.solution))
        assert sum(int(term) for term in problem.question.removesuffix("=?").split("+")) == problem.answer
        assert is_correct(problem.solution, problem)
    with pytest.raises(InputError, match="width"):
        TaskConfig.quick(width=3)  # three 3-digit terms can sum to 2997


@pytest.mark.parametrize("config", [TaskConfig.quick(), TaskConfig()], ids=["quick", "default"])
def test_hard_share_is_a_minority(config):
    assert 0.1 <= hard_share(make_problems(500, 0, config)) <= 0.3


def test_extract_answer_and_is_correct():
    problem = solve([5, 7], ["+"])
    assert extract_answer("5+7=12\n#### 12") == 12
    assert extract_answer("#### 3\n#### -4") == -4  # the last one counts
    assert extract_answer("#### 12a") == 12
    assert extract_answer("5+7=12") is None and extract_answer("") is None
    assert is_correct(problem.solution, problem)
    assert not is_correct("5+7=13\n#### 13", problem)
    assert not is_correct("12", problem)


def test_config_errors_name_the_field():
    with pytest.raises(InputError, match="terms"):
        TaskConfig(terms=(1, 3))
    with pytest.raises(InputError, match="digits"):
        TaskConfig(digits=(3, 2))
    with pytest.raises(InputError, match="ops"):
        TaskConfig(ops="*")
    with pytest.raises(InputError, match="heldout_fraction"):
        TaskConfig(heldout_fraction=1.0)
    with pytest.raises(InputError, match="too small"):
        make_problems(200, 0, TaskConfig(terms=(2, 2), digits=(1, 1), ops="+"))  # 100 questions exist
    with pytest.raises(InputError, match="split"):
        make_problems(1, 0, split="test")
    from tah.toy.pipeline import DemoSettings

    with pytest.raises(InputError, match="label_reference"):
        DemoSettings(label_reference="teacher")


def test_jsonl_round_trip(tmp_path):
    problems = make_problems(20, 0)
    path = to_jsonl(problems, tmp_path / "data" / "train.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["messages"] == problems[0].messages() and rows[0]["answer"] == str(problems[0].answer)
    assert read_jsonl(path) == problems
    assert not list(path.parent.glob(".*tmp*"))
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(InputError, match="line 1"):
        read_jsonl(tmp_path / "bad.jsonl")


# -- tokenizer ---------------------------------------------------------------------------------
def test_tokenizer_is_one_token_per_character(tokenizer):
    ids = tokenizer(ALPHABET, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(ALPHABET) == len(set(ids))
    assert tokenizer.decode(ids) == ALPHABET
    text = "12+3=15\n#### 15  ok"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # no special tokens added on encode
    assert tokenizer.convert_ids_to_tokens(tokenizer("é")["input_ids"]) == ["<unk>"]
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [0, 1, 2, 3]


def test_chat_template_renders_and_prompts(tokenizer):
    problem = solve([12, 30], ["+"])
    text = tokenizer.apply_chat_template(problem.messages(), tokenize=False)
    assert text == "<bos><|user|>12+30=?<|assistant|>12+30=42\n#### 42<eos>"
    prompt = tokenizer.apply_chat_template(problem.messages()[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><|user|>12+30=?<|assistant|>" and text.startswith(prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 + len(problem.question) + len(problem.solution) + 1  # specials are one token each
    assert tokenizer.decode(ids, skip_special_tokens=True) == problem.question + problem.solution
    with pytest.raises(Exception, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_assistant_mask_covers_solution_and_eos(tokenizer):
    problem = solve([9, 9, 9], ["+", "+"])
    ids, mask = tokenize_chat(tokenizer, problem.messages())
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(learned) == problem.solution + "<eos>"


def test_tokenizer_survives_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.chat_template == tokenizer.chat_template
    messages = solve([1, 2, 3], ["+", "-"]).messages()
    for prompt in (False, True):
        assert loaded.apply_chat_template(messages, add_generation_prompt=prompt) == \
            tokenizer.apply_chat_template(messages, add_generation_prompt=prompt)
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_build_dataset_on_toy_data(tokenizer, tmp_path):
    problems = make_problems(8, 1)
    data = build_dataset(to_jsonl(problems, tmp_path / "toy.jsonl"), tokenizer, max_length=128)
    assert len(data) == len(problems)
    for row, problem in zip(data, problems, strict=True):
        assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(problem.messages(), tokenize=False)
        learned = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
        assert tokenizer.decode(learned) == problem.solution + "<eos>"


# -- carry chains ------------------------------------------------------------------------------
def _pass_through_places(problem) -> tuple[int, int]:
    """(places of the added operands whose digits pass a carry or borrow straight through, all of their places)."""
    terms = [int(t) for t in re.findall(r"\d+", problem.question)]
    ops = re.findall(r"[+-]", problem.question)
    running, passing, places = terms[0], 0, 0
    for op, term in zip(ops, terms[1:], strict=True):
        for place in range(len(str(term))):
            mine, theirs = term // 10**place % 10, running // 10**place % 10
            passing += (mine + theirs == 9) if op == "+" else (mine == theirs)
            places += 1
        running = running + term if op == "+" else running - term
    return passing, places


@pytest.mark.parametrize("ops", ["+", "+-"])
def test_carry_chains_make_places_that_pass_a_carry_through_and_stay_right(ops):
    plain = TaskConfig.quick(ops=ops, width=4)
    chained = TaskConfig.quick(ops=ops, width=4, carry_chains=0.5)
    share = {}
    for name, config in (("plain", plain), ("chained", chained)):
        counts = [_pass_through_places(p) for p in make_problems(400, 0, config)]
        share[name] = sum(c[0] for c in counts) / sum(c[1] for c in counts)
    assert share["plain"] < 0.15 and share["chained"] > 0.4
    for problem in make_problems(300, 0, replace(chained, width=0)):  # still right, still the configured sizes
        expression = problem.question.removesuffix("=?")
        assert int(eval(expression)) == problem.answer
        assert all(2 <= len(t) <= 3 for t in re.findall(r"\d+", expression))


def test_no_carry_chains_draws_the_problems_of_earlier_versions():
    # The first problems of seed 0 as drawn before carry_chains existed: the demo's settings without
    # the knob keep their data, so earlier results stay reproducible.
    assert [p.question for p in make_problems(3, 0, TaskConfig.quick(width=4), "train")] == [
        "0011+0372+0376=?", "0034+0060=?", "0097+0068+0089=?"]


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.3"])
def test_carry_chains_outside_zero_to_one_is_refused(value):
    with pytest.raises(InputError, match="carry_chains"):
        TaskConfig(carry_chains=value)
