"""The server's batch on the static engine (tah.generation.static_slots, a GPU's serving path), run
here without CUDA graphs: requests join free rows of one fixed-size runner between steps and leave
when done or cancelled; each row's tokens, passes and draws are its solo static run's."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import tah.generation.static as static_engine
import tah.generation.static_slots as static_slots
from tah import InputError, TaHForCausalLM, generate
from tah.generation.slots import BatchDecoder
from tah.generation.static_slots import StaticBatchDecoder
from tah.kernels.host_reads import HostReads
from tah.model.checkpoint import load_tokenizer
from tah.serve.app import load_app, serving_device
from tah.serve.engine import Engine, Job, batch_decoder
from tah.serve.metrics import Metrics
from test_serve import NAME, ServerThread, ask, build_checkpoint, chat_ids
from test_serve_slots import EOS, as_request, mixed_requests, strong_model


def solo_static(model, prompt: list[int], settings: dict) -> tuple[list[int], list[int]]:
    """(tokens, passes) of `tah.generate` on the static engine for this request alone."""
    out = generate(model, torch.tensor([prompt]), eos_token_id=EOS, engine="static", **settings)
    count = int((out.iter_counts[0] > 0).sum())
    return out.sequences[0, len(prompt):len(prompt) + count].tolist(), out.iter_counts[0, :count].tolist()


def requests_of(count: int, seed: int, max_new_tokens) -> list:
    """mixed_requests with max_new_tokens set: one for all, or one each (a list)."""
    cases = mixed_requests(count, seed=seed)
    for i, (_, settings) in enumerate(cases):
        settings["max_new_tokens"] = max_new_tokens[i] if isinstance(max_new_tokens, list) else max_new_tokens
    return cases


def run_all(decoder, cases: list, at_once: int, logprobs: int | None = None, cancel: set | None = None) -> dict:
    """Decode `cases` with up to `at_once` rows, two joining between steps; rows in `cancel` leave after
    their third token. Returns {case index: row}."""
    rows, waiting, steps = {}, list(range(len(cases))), 0
    while waiting or decoder.rows:
        for _ in range(2):
            if waiting and len(decoder.rows) < at_once:
                i = waiting.pop(0)
                rows[i] = decoder.join(as_request(*cases[i], logprobs=logprobs))
        if decoder.rows:
            decoder.step()
            steps += 1
            assert steps < 1000, "rows stopped decoding"  # (every case ends within 30 tokens)
            cancelled = [rows[i] for i in cancel or () if i in rows and len(rows[i].tokens) >= 3]
            decoder.leave([row for row in decoder.rows if row.done] + cancelled)
    rows["steps"] = steps
    return rows


@pytest.mark.parametrize("decider", ["mlp", "random"])
def test_rows_joining_and_leaving_each_decode_as_their_solo_static_run(decider, monkeypatch):
    """More requests than rows, greedy and seeded sampling mixed, with log-probabilities: every row is
    its solo run, token for token, pass for pass; rows are reused and the runner grows when needed."""
    monkeypatch.setattr(static_engine, "SLOT_ROUNDING", 16)  # small capacities, so the runner grows mid-batch
    monkeypatch.setattr(static_slots, "JOIN_HEADROOM", 4)
    model = strong_model(2, decider).eval()
    cases = mixed_requests(12, seed=1)
    decoder = StaticBatchDecoder(model, max_batch=4, graphs=False)
    rows = run_all(decoder, cases, at_once=4, logprobs=2)
    iterated = 0
    for i, (prompt, settings) in enumerate(cases):
        tokens, passes = solo_static(model, prompt, settings)
        assert (rows[i].tokens, rows[i].passes) == (tokens, passes), (i, settings)
        assert len(rows[i].logprobs) == len(tokens) and all(len(top) == 2 for _, top in rows[i].logprobs)
        iterated += sum(p > 1 for p in passes)
    assert iterated > 0
    assert rows["steps"] < sum(len(rows[i].tokens) for i in range(len(cases)))  # the rows shared steps
    assert decoder.runner.cache.capacity > static_engine.rounded_capacity(12 + 4 + 2)  # it grew as rows filled
    assert decoder.runner.token.shape[0] == 4  # one runner of max_batch rows served all 12


def test_unseeded_rows_share_a_draw_and_leave_the_seeded_ones_their_own():
    """Rows sampling without a seed draw together from torch's default generator: the seeded rows
    beside them still draw their solo runs' tokens, and the unseeded ones really sample."""
    model = strong_model(2, "random").eval()
    cases = requests_of(8, seed=7, max_new_tokens=24)
    for _, settings in cases[1::4]:
        settings.pop("seed")  # an unseeded sampling row
    runs = [run_all(StaticBatchDecoder(model, max_batch=4, graphs=False), cases, at_once=4) for _ in range(2)]
    for i, (prompt, settings) in enumerate(cases):
        if "seed" in settings or not settings.get("do_sample"):
            assert runs[0][i].tokens == solo_static(model, prompt, settings)[0], i
    unseeded = [i for i in range(len(cases)) if i % 4 == 1]
    assert [runs[0][i].tokens for i in unseeded] != [runs[1][i].tokens for i in unseeded]


def test_greedy_rows_equal_the_eager_server_and_report_its_logprobs():
    """Greedy tokens and passes are the eager batch's, and so are the log-probabilities (final logits)."""
    model = strong_model(2, "mlp").eval()
    cases = [(prompt, {"max_new_tokens": settings["max_new_tokens"]}) for prompt, settings in mixed_requests(6, seed=3)]
    static_rows = run_all(StaticBatchDecoder(model, max_batch=3, graphs=False), cases, at_once=3, logprobs=3)
    eager_rows = run_all(BatchDecoder(model), cases, at_once=3, logprobs=3)
    for i in range(len(cases)):
        mine, theirs = static_rows[i], eager_rows[i]
        assert (mine.tokens, mine.passes) == (theirs.tokens, theirs.passes), i
        for (logprob, top), (expected, expected_top) in zip(mine.logprobs, theirs.logprobs, strict=True):
            assert logprob == pytest.approx(expected, abs=1e-4)
            assert [t for t, _ in top] == [t for t, _ in expected_top]
            assert [v for _, v in top] == pytest.approx([v for _, v in expected_top], abs=1e-4)


def test_a_cancelled_row_frees_its_place_and_changes_nobody_else():
    model = strong_model(2, "mlp").eval()
    cases = requests_of(5, seed=5, max_new_tokens=20)
    decoder = StaticBatchDecoder(model, max_batch=2, graphs=False)
    rows = run_all(decoder, cases, at_once=2, cancel={0, 3})
    for i, (prompt, settings) in enumerate(cases):
        tokens, passes = solo_static(model, prompt, settings)
        if i in (0, 3):
            assert 3 <= len(rows[i].tokens) < 20 and rows[i].tokens == tokens[:len(rows[i].tokens)]
        else:
            assert (rows[i].tokens, rows[i].passes) == (tokens, passes), i
    assert not decoder.rows and not bool(decoder.runner.active.any())


def test_steps_run_on_the_fewest_leading_rows_that_hold_the_batch(monkeypatch):
    """With 8 places and fewer requests, a step computes a bucket of 1, 2 or 4 leading rows (views of
    the runner's buffers), rows leaving from the middle are replaced by the last, and every request
    still decodes its solo run."""
    model = strong_model(2, "mlp").eval()
    cases = requests_of(7, seed=11, max_new_tokens=[3, 20, 8, 14, 5, 26, 11])
    sizes = []
    step = static_engine.StaticRunner.step
    monkeypatch.setattr(static_engine.StaticRunner, "step",
                        lambda runner, *args: (sizes.append((len(decoder.rows), runner.token.shape[0])),
                                               step(runner, *args)))
    decoder = StaticBatchDecoder(model, max_batch=8, graphs=False)
    rows = run_all(decoder, cases, at_once=3)
    monkeypatch.undo()
    for i, (prompt, settings) in enumerate(cases):
        assert (rows[i].tokens, rows[i].passes) == solo_static(model, prompt, settings), i
    assert {bucket for _, bucket in sizes} == {1, 2, 4}
    assert all(rows_ <= bucket < 2 * rows_ for rows_, bucket in sizes)


def test_a_step_reads_the_device_once_without_logprobs():
    model = strong_model(2, "random").eval()
    cases = requests_of(4, seed=2, max_new_tokens=30)
    decoder = StaticBatchDecoder(model, max_batch=4, graphs=False)
    for case in cases:
        decoder.join(as_request(*case))
    decoder.step()  # warm
    with HostReads() as reads:
        for _ in range(6):
            decoder.step()
    assert reads.count == 6, reads.where


def test_the_server_picks_its_engine_by_device_and_model():
    model = strong_model(2, "mlp").eval()
    assert isinstance(batch_decoder(model, max_batch=4), BatchDecoder)  # CPU: the eager engine is the faster
    assert isinstance(batch_decoder(model, max_batch=4, engine="static"), StaticBatchDecoder)
    with pytest.raises(InputError, match="max_iter > 2"):
        batch_decoder(strong_model(3, "random"), max_batch=4, engine="static")
    assert serving_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad, words in (("tpu", "--device must be"), ("cuda:0", "CUDA is not available")):
        if bad.startswith("cuda") and torch.cuda.is_available():
            continue
        with pytest.raises(InputError, match=words):
            serving_device(bad)


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_a_failing_step_fails_its_requests_and_the_engine_serves_on(engine):
    """A bug in a decode step answers the running requests with an error (500) and the engine goes on
    with a new batch decoder of the same engine."""
    model = strong_model(2, "mlp").eval()
    server = Engine(model, max_batch=2, max_waiting=4, metrics=Metrics(), engine=engine)
    broken = server.decoder

    def step():
        raise RuntimeError("a bug")

    broken.step = step

    async def ask_engine() -> list:
        job = Job(as_request([5, 9, 11], {"max_new_tokens": 5}), asyncio.get_running_loop())
        server.submit(job)
        events = []
        while not events or events[-1][0] not in ("done", "error"):
            events.append(await asyncio.wait_for(job.events.get(), 60))
        return events

    server.start()
    try:
        failed, served = asyncio.run(ask_engine()), asyncio.run(ask_engine())
    finally:
        server.close()
    assert failed[-1][0] == "error" and failed[-1][2] == 500
    assert served[-1] == ("done", "length") and sum(len(event[1]) for event in served[:-1]) == 5
    assert type(server.decoder) is type(broken) and server.decoder is not broken


def test_the_http_server_on_the_static_engine_answers_as_generate(tmp_path):
    """The OpenAI API end to end on the static engine: concurrent greedy and seeded requests, more
    than its rows, each the solo static run of its prompt."""
    checkpoint = build_checkpoint(tmp_path / "tiny")
    with pytest.raises(InputError, match="engine must be one of"):
        load_app(str(checkpoint), engine="paged")
    server = ServerThread(load_app(str(checkpoint), served_name=NAME, engine="static", max_batch=3, device="cpu"))
    model = TaHForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = load_tokenizer(str(checkpoint))
    cases = [(f"question {i}?", dict(max_tokens=[6, 25, 40][i % 3], **(dict(temperature=0.8, seed=i) if i % 2
                                                                      else dict(temperature=0)))) for i in range(7)]
    try:
        with ThreadPoolExecutor(7) as pool:
            replies = list(pool.map(lambda case: ask(server.client(), True, case[0], False, **case[1]), cases))
    finally:
        server.stop()
    for (prompt, settings), reply in zip(cases, replies, strict=True):
        ids = chat_ids(tokenizer, prompt)
        sampling = dict(do_sample=True, temperature=settings["temperature"], seed=settings["seed"]) \
            if settings["temperature"] else {}
        out = generate(model, torch.tensor([ids]), max_new_tokens=settings["max_tokens"], engine="static",
                       eos_token_id=tokenizer.eos_token_id, **sampling)
        count = int((out.iter_counts[0] > 0).sum())
        assert reply["tokens"] == out.sequences[0, len(ids):len(ids) + count].tolist(), (prompt, settings)
        assert reply["passes"] == out.iter_counts[0, :count].tolist()
