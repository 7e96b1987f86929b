"""`tah serve` end to end: a real uvicorn server on a free loopback port, a tiny random checkpoint
with a chat template, the official `openai` client. Every answer is held against `tah.generate`
run on the same request alone."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from conftest import randomize_lora, tiny_lm
from tah import TaHConfig, TaHForCausalLM, generate
from tah.serve.app import load_app
from tah.toy.tokenizer import build_char_tokenizer

CONTEXT = 512
THRESHOLD = 0.55  # this random decider then iterates some tokens of the greedy tests' answers, not all
NAME = "tiny-tah"


def build_checkpoint(path: Path) -> Path:
    tokenizer = build_char_tokenizer()
    config = TaHConfig(max_iter=2, input_topk=8, lora_rank=4, lora_alpha=8.0, decider_hidden_dims=[16],
                       decider_topk=8, decider_expansion=2, threshold=THRESHOLD)
    model = TaHForCausalLM.from_base(tiny_lm(vocab=len(tokenizer), max_positions=CONTEXT, seed=1), config)
    randomize_lora(model, std=1.0, seed=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` in a background thread of this process."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **options)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        return sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(checkpoint):
    running = ServerThread(load_app(str(checkpoint), served_name=NAME, device="cpu"))  # as `solo`, on a GPU machine too
    yield running
    running.stop()


@pytest.fixture(scope="module")
def solo(checkpoint):
    """tah.generate on one request alone (a model of its own): (tokens, passes) of the new tokens."""
    model = TaHForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = build_char_tokenizer()

    def run(prompt_ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
            min_p: float = 0.0, seed: int | None = None, stop=None):
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed) \
            if temperature > 0 else {}
        out = generate(model, torch.tensor([prompt_ids]), max_new_tokens=max_tokens,
                       eos_token_id=tokenizer.eos_token_id, stop_strings=stop, tokenizer=tokenizer, **sampling)
        count = int((out.iter_counts[0] > 0).sum())
        return out.sequences[0, len(prompt_ids):len(prompt_ids) + count].tolist(), out.iter_counts[0, :count].tolist()

    run.tokenizer = tokenizer
    return run


def chat_ids(tokenizer, content: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


def expected_text(tokenizer, tokens: list[int], stop=None) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop or [] if s in text]
    return text[:min(cuts)] if cuts else text


def ask(client: openai.OpenAI, chat: bool, prompt: str, stream: bool, **settings) -> dict:
    """One request; returns text, tah tokens and passes, finish_reason and usage, whichever the mode."""
    if chat:
        call = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                              stream=stream, **settings)
    else:
        call = client.completions.create(model=NAME, prompt=prompt, stream=stream, **settings)
    if not stream:
        choice = call.choices[0]
        text = choice.message.content if chat else choice.text
        return dict(text=text, tokens=call.tah["tokens"], passes=call.tah["passes"], reason=choice.finish_reason,
                    usage=call.usage, logprobs=choice.logprobs)
    reply = dict(text="", tokens=[], passes=[], reason=None, usage=None, chunks=0)
    for chunk in call:
        reply["chunks"] += 1
        if chunk.usage is not None:
            reply["usage"] = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        reply["text"] += (choice.delta.content or "") if chat else choice.text
        reply["tokens"] += chunk.tah["tokens"]
        reply["passes"] += chunk.tah["passes"]
        reply["reason"] = choice.finish_reason or reply["reason"]
    return reply


def test_models_health_and_help(server):
    assert [m.id for m in server.client().models.list().data] == [NAME]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    from tah.cli import build_parser
    assert "serve" in build_parser().format_help()


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_greedy_answers_equal_generate(server, solo, chat, stream):
    prompt = "What is 47+38?" if chat else "Count to a thousand"
    ids = chat_ids(solo.tokenizer, prompt) if chat else solo.tokenizer(prompt)["input_ids"]
    tokens, passes = solo(ids, 40)
    reply = ask(server.client(), chat, prompt, stream, max_tokens=40, temperature=0,
                **({"stream_options": {"include_usage": True}} if stream else {}))
    assert reply["tokens"] == tokens and reply["passes"] == passes
    assert 1 in passes and 2 in passes  # the decider iterates some tokens, not all
    assert reply["text"] == expected_text(solo.tokenizer, tokens)
    assert reply["reason"] == "length"
    assert (reply["usage"].prompt_tokens, reply["usage"].completion_tokens) == (len(ids), len(tokens))
    if stream:
        assert reply["chunks"] > len(tokens) // 2  # streamed as it decoded, not in one piece


def test_seeded_sampling_equals_generate(server, solo):
    settings = dict(temperature=0.9, top_p=0.95, seed=1234)
    ids = chat_ids(solo.tokenizer, "tell me a story")
    tokens, passes = solo(ids, 60, **settings)
    reply = ask(server.client(), True, "tell me a story", False, max_tokens=60, extra_body={"top_k": 40, "min_p": 0.01},
                **settings)
    expected_tokens, expected_passes = solo(ids, 60, top_k=40, min_p=0.01, **settings)
    assert (reply["tokens"], reply["passes"]) == (expected_tokens, expected_passes)
    assert len(set(expected_tokens)) > 3 and expected_tokens != tokens  # really sampled, and top_k/min_p count


def test_sixteen_concurrent_mixed_requests_each_equal_their_solo_run(server, solo):
    words = ["hi", "What is 2+2?", "a much longer question about the weather on the moon", "x" * 40, "ok?"]
    cases = []
    for i in range(16):
        settings = dict(max_tokens=[5, 20, 45, 70][i % 4])
        if i % 3:
            settings.update(temperature=[0.6, 1.0, 1.3][i % 3], seed=i, top_p=[1.0, 0.9][i % 2])
        else:
            settings.update(temperature=0)
        if i % 5 == 4:
            settings["stop"] = ["8", "q"]
        cases.append((i % 2 == 0, words[i % len(words)] + f" #{i}", i % 4 == 1, settings))
    steps_before, tokens_before = server.metric("tah_step_seconds_count"), server.metric("tah_generated_tokens_total")

    def run(case):
        chat, prompt, stream, settings = case
        return ask(server.client(), chat, prompt, stream, **settings)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(run, cases))
    for (chat, prompt, _, settings), reply in zip(cases, replies, strict=True):
        ids = chat_ids(solo.tokenizer, prompt) if chat else solo.tokenizer(prompt)["input_ids"]
        stop = settings.get("stop")
        sampling = {k: v for k, v in settings.items() if k in ("temperature", "top_p", "seed")}
        tokens, passes = solo(ids, settings["max_tokens"], stop=stop, **sampling)
        assert (reply["tokens"], reply["passes"]) == (tokens, passes), (prompt, settings)
        assert reply["text"] == expected_text(solo.tokenizer, tokens, stop)
        assert reply["reason"] == ("length" if len(tokens) == settings["max_tokens"] and reply["text"] ==
                                   solo.tokenizer.decode(tokens, skip_special_tokens=True) else "stop")
    generated = server.metric("tah_generated_tokens_total") - tokens_before
    steps = server.metric("tah_step_seconds_count") - steps_before
    assert generated == sum(len(reply["tokens"]) for reply in replies)
    assert steps < generated / 3  # the requests decoded together


def test_a_cancelled_stream_frees_its_slot(server, solo):
    prompt = "Count to a thousand"
    tokens, _ = solo(chat_ids(solo.tokenizer, prompt), 400)
    assert len(tokens) == 400  # alone, it would run to its limit
    before = server.metric("tah_generated_tokens_total")
    client = server.client()
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=400, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.time() + 10
    while server.metric("tah_running_requests") > 0:
        assert time.time() < deadline, "the cancelled request still holds its place in the batch"
        time.sleep(0.02)
    assert server.metric("tah_generated_tokens_total") - before < 400
    assert ask(client, True, "still there?", False, max_tokens=5, temperature=0)["reason"] == "length"


def test_logprobs_are_the_final_logits(server, solo, checkpoint):
    model = TaHForCausalLM.from_pretrained(checkpoint).eval()
    ids = chat_ids(solo.tokenizer, "why?")
    chat = server.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "why?"}],
                                                   max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    tokens = chat.tah["tokens"]
    with torch.no_grad():
        final = torch.log_softmax(model(torch.tensor([ids + tokens])).logits[0].float(), -1)
    for k, (token, entry) in enumerate(zip(tokens, chat.choices[0].logprobs.content, strict=True)):
        assert entry.logprob == pytest.approx(float(final[len(ids) - 1 + k, token]), abs=1e-4)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy takes the top token
        assert len(entry.top_logprobs) == 3
    completion = server.client().completions.create(model=NAME, prompt="why?", max_tokens=6, temperature=0,
                                                    logprobs=2)
    assert len(completion.choices[0].logprobs.token_logprobs) == 6
    assert all(len(top) <= 2 for top in completion.choices[0].logprobs.top_logprobs)


BAD_REQUESTS = [  # (endpoint, body, the field the error must name)
    ("chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ("chat/completions", {"model": NAME}, "messages"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x" * CONTEXT}]}, "messages"),
    ("completions", {"model": NAME, "prompt": "hi", "max_tokens": CONTEXT}, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "hi", "temperature": -1}, "temperature"),
    ("completions", {"model": NAME, "prompt": "hi", "top_p": 0}, "top_p"),
    ("completions", {"model": NAME, "prompt": "hi", "top_k": -3}, "top_k"),
    ("completions", {"model": NAME, "prompt": "hi", "min_p": 1.5}, "min_p"),
    ("completions", {"model": NAME, "prompt": "hi", "n": 2}, "n"),
    ("completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"model": NAME, "prompt": [5, 100000]}, "prompt"),
    ("completions", {"model": NAME, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("completions", "{not json", None),
]


@pytest.mark.parametrize("endpoint, body, param", BAD_REQUESTS, ids=[str(p) for _, _, p in BAD_REQUESTS])
def test_a_bad_request_gets_400_naming_the_field_and_the_server_goes_on(server, endpoint, body, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server.url}/v1/{endpoint}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    if param:
        assert param.split(".")[0] in error["message"]
    if endpoint == "chat/completions":  # the official client sees it as BadRequestError
        with pytest.raises(openai.BadRequestError):
            server.client().chat.completions.create(**body) if isinstance(body, dict) and "messages" in body \
                else server.client().post("/chat/completions", body=body, cast_to=object)
    assert ask(server.client(), False, "fine", False, max_tokens=3, temperature=0)["reason"] == "length"


def test_a_full_queue_answers_503(checkpoint):
    busy = ServerThread(load_app(str(checkpoint), served_name=NAME, max_batch=1, max_waiting=1, device="cpu"))
    try:
        client = busy.client()
        long = dict(model=NAME, prompt="go", max_tokens=300, temperature=0)
        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(client.completions.create, **long)]
            while busy.metric("tah_running_requests") < 1:
                time.sleep(0.01)
            running.append(pool.submit(client.completions.create, **long))
            while busy.metric("tah_waiting_requests") < 1:
                time.sleep(0.01)
            with pytest.raises(openai.InternalServerError) as refused:
                client.completions.create(**long)
            assert refused.value.status_code == 503
            assert all(len(future.result().tah["tokens"]) > 0 for future in running)
    finally:
        busy.stop()


def test_sigterm_finishes_the_running_requests_then_exits(checkpoint):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "tah.cli", "serve", "--model", str(checkpoint), "--port",
                                str(port), "--served-name", NAME], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model=NAME, prompt="go", max_tokens=200, temperature=0, stream=True)
        chunks = iter(stream)
        first = next(chunks)
        process.send_signal(signal.SIGTERM)
        tokens = list(first.tah["tokens"])
        reasons = []
        for chunk in chunks:
            tokens += chunk.tah["tokens"]
            reasons.append(chunk.choices[0].finish_reason)
        assert len(tokens) == 200 and reasons[-1] == "length"  # the running request finished
        with pytest.raises(openai.APIConnectionError):  # no new requests
            client.completions.create(model=NAME, prompt="late", max_tokens=2)
        # uvicorn re-raises the signal once it has shut down cleanly, so the exit reads as SIGTERM's
        assert process.wait(30) in (0, -signal.SIGTERM)
        assert "Finished server process" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
