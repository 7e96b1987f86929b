"""The server's batch decoder (tah.generation.slots): requests join a running batch between steps and
leave when done or cancelled; each row's tokens, passes and sampling draws are its solo run's."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import randomize_lora, tiny_tah
from tah import generate
from tah.generation.generate import _generator
from tah.generation.sampling import Sampler
from tah.generation.slots import BatchDecoder, Request

EOS = 7


def strong_model(max_iter: int, decider: str):
    model = tiny_tah(decider=decider, random_rate=0.5, max_iter=max_iter, lora_per_depth=True)
    randomize_lora(model, std=2.0, seed=3)
    model.set_threshold(0.4)
    return model


def mixed_requests(count: int, seed: int = 0) -> list[tuple[list[int], dict]]:
    """Prompts of 1-12 tokens with 1-30 new tokens, greedy and seeded sampling alternating."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        prompt = [rng.randint(3, 63) for _ in range(rng.randint(1, 12))]
        settings = dict(max_new_tokens=rng.randint(1, 30))
        if i % 2:
            settings.update(do_sample=True, temperature=rng.choice([0.7, 1.3]), top_k=rng.choice([0, 10]),
                            top_p=rng.choice([1.0, 0.9]), seed=i)
        cases.append((prompt, settings))
    return cases


def as_request(prompt: list[int], settings: dict, logprobs: int | None = None) -> Request:
    sampler = Sampler(settings.get("do_sample", False), settings.get("temperature", 1.0), settings.get("top_k", 0),
                      settings.get("top_p", 1.0), 0.0, _generator(settings.get("seed"), torch.device("cpu")))
    return Request(prompt, settings["max_new_tokens"], sampler, {EOS}, logprobs=logprobs)


@pytest.mark.parametrize("max_iter, decider", [(2, "mlp"), (2, "random"), (3, "random")])
def test_rows_joining_and_leaving_each_decode_as_alone(max_iter, decider):
    model = strong_model(max_iter, decider)
    cases = mixed_requests(10)
    decoder, rows, waiting = BatchDecoder(model), {}, list(range(len(cases)))
    steps = 0
    while waiting or decoder.rows:
        for _ in range(2):  # up to two join between steps, up to 5 decode together
            if waiting and len(decoder.rows) < 5:
                i = waiting.pop(0)
                rows[i] = decoder.join(as_request(*cases[i], logprobs=2))
        if decoder.rows:
            decoder.step()
            steps += 1
            decoder.leave([row for row in decoder.rows if row.done])
    iterated = 0
    for i, (prompt, settings) in enumerate(cases):
        out = generate(model, torch.tensor([prompt]), eos_token_id=EOS, **settings)
        count = int((out.iter_counts[0] > 0).sum())
        assert rows[i].tokens == out.sequences[0, len(prompt):len(prompt) + count].tolist(), (i, settings)
        assert rows[i].passes == out.iter_counts[0, :count].tolist(), (i, settings)
        assert len(rows[i].logprobs) == count
        iterated += sum(p > 1 for p in rows[i].passes)
    assert iterated > 0 and decoder.stats.drafts > 0  # deeper passes ran, fused with drafts
    assert steps < sum(len(row.tokens) for row in rows.values())  # the rows shared steps


def test_a_row_that_leaves_early_changes_nobody_else():
    model = strong_model(2, "mlp")
    (first, a), (second, b) = mixed_requests(2, seed=5)
    a["max_new_tokens"] = b["max_new_tokens"] = 20
    decoder = BatchDecoder(model)
    kept, dropped = decoder.join(as_request(first, a)), decoder.join(as_request(second, b))
    for _ in range(3):
        decoder.step()
    decoder.leave([dropped])  # cancelled mid-way
    assert decoder.rows == [kept] and decoder.cache.entries().shape == (1,)
    while not kept.done:
        decoder.step()
    out = generate(model, torch.tensor([first]), eos_token_id=EOS, **a)
    count = int((out.iter_counts[0] > 0).sum())
    assert kept.tokens == out.sequences[0, len(first):len(first) + count].tolist()


def test_greedy_logprobs_are_the_top_of_the_final_logits():
    model = strong_model(2, "mlp")
    prompt = [5, 9, 11, 13]
    decoder = BatchDecoder(model)
    row = decoder.join(as_request(prompt, {"max_new_tokens": 12}, logprobs=3))
    while not row.done:
        decoder.step()
    with torch.no_grad():
        final = torch.log_softmax(model(torch.tensor([prompt + row.tokens])).logits[0].float(), -1)
    for k, (token, (logprob, top)) in enumerate(zip(row.tokens, row.logprobs, strict=True)):
        assert logprob == pytest.approx(float(final[len(prompt) - 1 + k, token]), abs=1e-4)
        assert top[0][0] == token and len(top) == 3
