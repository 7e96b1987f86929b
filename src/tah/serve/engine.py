"""The engine loop: one thread owns the model and steps the running batch.

Between two decode steps it drops cancelled requests, lets waiting ones join (each is prefilled
alone, then decodes with the others: `tah.generation.slots.BatchDecoder`), runs one step, hands
every request its new tokens, and lets finished ones leave. HTTP handlers talk to it through
`submit` (a bounded queue: a full one refuses) and each job's event queue on their asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from tah.errors import TaHError
from tah.generation.generate import _use_static
from tah.generation.slots import BatchDecoder, Request, Row
from tah.generation.static_slots import StaticBatchDecoder
from tah.serve.metrics import Metrics

log = logging.getLogger("tah.serve")
IDLE_POLL_SECONDS = 0.05


@dataclass
class Job:
    """One request in flight. Events on `events` (put from the engine thread): ("tokens", ids,
    passes, logprobs) as they come, then ("done", finish_reason) or ("error", message, HTTP status)."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set by the handler when its client goes away
    sent: int = 0  # tokens handed over so far

    def put(self, *event) -> None:
        deliver([(self, event)])


def deliver(events: list[tuple[Job, tuple]]) -> None:
    """Hand events to their jobs' queues from the engine thread: one wake-up of each asyncio loop
    for the lot (a step's tokens for every row), not one per event."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, tuple]]] = {}
    for job, event in events:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the loop is closed: nobody listens any more
            for job, _ in batch:
                job.cancelled = True


def _put_all(batch: list[tuple[Job, tuple]]) -> None:
    for job, event in batch:
        job.events.put_nowait(event)


class QueueFull(Exception):
    """Too many requests wait already."""


def batch_decoder(model, *, max_batch: int, engine: str = "auto") -> BatchDecoder | StaticBatchDecoder:
    """The running batch's decoder. engine "auto": the static engine's (CUDA graphs) on a GPU where it
    supports the model (max_iter <= 2), as `tah.generate` chooses, since the eager engine is bound by
    launching kernels there; else the eager engine's, the faster on a CPU. "eager" or "static" force
    one; InputError if the static engine cannot take the model."""
    if _use_static(model, engine, True, None, model.device):
        return StaticBatchDecoder(model, max_batch=max_batch)
    return BatchDecoder(model)


class Engine:
    def __init__(self, model, *, max_batch: int, max_waiting: int, metrics: Metrics, engine: str = "auto") -> None:
        self.model, self.max_batch, self.metrics = model, max_batch, metrics
        self._new_decoder = lambda: batch_decoder(model, max_batch=max_batch, engine=engine)
        self.decoder = self._new_decoder()
        self.waiting: queue.Queue[Job] = queue.Queue(max_waiting)
        self.jobs: dict[int, Job] = {}  # id(row) -> its job, for the rows in the batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tah-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the loop after its current step; requests still running get an error event."""
        self._stop.set()
        self._thread.join()
        for job in self.jobs.values():
            job.put("error", "the server is shutting down", 503)

    def submit(self, job: Job) -> None:
        """Queue a job for the next free place in the batch; raises QueueFull when the queue is full."""
        if self._stop.is_set():
            raise QueueFull("the server is shutting down")
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.waiting.maxsize} requests wait already; retry later") from None
        self.metrics.waiting.set(self.waiting.qsize())

    @property
    def running(self) -> int:
        return len(self.decoder.rows)

    # -- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._drop_cancelled()
                self._admit()
                if self.decoder.rows:
                    started = time.perf_counter()
                    self.decoder.step()
                    self.metrics.step_seconds.observe(time.perf_counter() - started)
                    self._publish(list(self.decoder.rows))
            except Exception:  # a bug must not take the server down: fail the batch, keep serving
                log.exception("decode step failed; the running requests get an error")
                for job in self.jobs.values():
                    job.put("error", "internal error while decoding (see the server log)", 500)
                self.jobs.clear()
                self.decoder = self._new_decoder()
            self.metrics.running.set(self.running)

    def _drop_cancelled(self) -> None:
        gone = [row for row in self.decoder.rows if self.jobs[id(row)].cancelled]
        if gone:
            self.decoder.leave(gone)
            for row in gone:
                self.jobs.pop(id(row))

    def _admit(self) -> None:
        """Let waiting jobs join while there is room; wait a little for one when idle."""
        while self.running < self.max_batch:
            try:
                timeout = None if self.decoder.rows else IDLE_POLL_SECONDS
                job = self.waiting.get_nowait() if timeout is None else self.waiting.get(timeout=timeout)
            except queue.Empty:
                break
            self.metrics.waiting.set(self.waiting.qsize())
            if job.cancelled:
                continue
            try:
                row = self.decoder.join(job.request)
            except TaHError as err:  # settings the checks before it let through
                job.put("error", str(err), 400)
                continue
            except Exception:  # a bug in one prefill fails that request, not the server
                log.exception("prefill failed; the request gets an error")
                job.put("error", "internal error while reading the prompt (see the server log)", 500)
                continue
            self.metrics.prompt_tokens.inc(len(job.request.prompt))
            self.jobs[id(row)] = job
            self._publish([row])

    def _publish(self, rows: list[Row]) -> None:
        """Hand each row's new tokens to its job; finished rows leave the batch."""
        finished, events, passes = [], [], []
        for row in rows:
            job = self.jobs[id(row)]
            if len(row.tokens) > job.sent:
                if job.sent == 0:
                    self.metrics.ttft.observe(time.perf_counter() - job.arrived)
                new = slice(job.sent, len(row.tokens))
                events.append((job, ("tokens", row.tokens[new], row.passes[new], row.logprobs[new])))
                passes += row.passes[new]
                job.sent = len(row.tokens)
            if row.done:
                events.append((job, ("done", finish_reason(row))))
                finished.append(row)
        deliver(events)
        self.metrics.count_tokens(passes)
        if finished:
            self.decoder.leave(finished)
            for row in finished:
                self.jobs.pop(id(row))


def finish_reason(row: Row) -> str:
    """OpenAI's finish_reason: "stop" (EOS or a stop string) or "length" (max_tokens)."""
    request = row.request
    if row.tokens[-1] in request.eos_ids or request.stop is not None and request.stop(row.tokens):
        return "stop"
    return "length"
