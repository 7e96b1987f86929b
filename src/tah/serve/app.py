"""The FastAPI app: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, with /health and
/metrics. Each response carries `usage` and a `tah` field: the passes each generated token took
(1 = one pass, 2+ = iterated) and the token ids, in every streamed chunk too."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from tah.errors import InputError
from tah.generation.generate import _eos_set, _stop_checker
from tah.generation.sampling import Sampler
from tah.generation.slots import Request as DecodeRequest
from tah.serve.engine import Engine, Job, QueueFull, batch_decoder
from tah.serve.metrics import Metrics
from tah.serve.schemas import ChatRequest, CompletionRequest, RequestError, error_body
from tah.serve.text import TextStream, chat_logprobs, completion_logprobs

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat: up to the context)
DISCONNECT_POLL_SECONDS = 0.5


def build_app(model, tokenizer, *, model_name: str, max_batch: int = 32, max_waiting: int = 256,
              engine: str = "auto") -> FastAPI:
    """An app serving `model` (a TaHForCausalLM in eval mode) as `model_name`. Its engine thread
    starts with the app's lifespan and stops after it (uvicorn drains the running requests first).
    engine: the decode engine of the running batch (`tah.serve.engine.batch_decoder`); InputError
    here, before serving, if it cannot take the model."""
    batch_decoder(model, max_batch=max_batch, engine=engine)
    metrics = Metrics()
    server = _Server(model, tokenizer, model_name, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine = Engine(model, max_batch=max_batch, max_waiting=max_waiting, metrics=metrics, engine=engine)
        server.engine.start()
        yield
        server.engine.close()

    app = FastAPI(title="tah serve", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def _refused(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"][1:]) or None
        if first["type"] == "json_invalid":  # its loc holds a character offset, not a field
            param, message = None, f"the request body is not valid JSON ({first['msg']})"
        else:
            message = f"{param or 'body'}: {first['msg']}"
        metrics.requests.labels(request.url.path, "error").inc()
        return JSONResponse(error_body(message, param), status_code=400)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": server.engine.running, "waiting": server.engine.waiting.qsize()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "tah"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await server.complete(body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await server.complete(body, request, chat=False)

    return app


class _Server:
    """What the routes share: the model's limits, the tokenizer, the engine and the metrics."""

    def __init__(self, model, tokenizer, model_name: str, metrics: Metrics) -> None:
        self.model, self.tokenizer, self.model_name, self.metrics = model, tokenizer, model_name, metrics
        self.context = model.max_positions
        self.vocab = model.lm.get_input_embeddings().num_embeddings
        self.created = int(time.time())
        self.engine: Engine | None = None

    async def complete(self, body: ChatRequest | CompletionRequest, http: Request, *, chat: bool):
        endpoint = http.url.path
        try:
            job = Job(self._decode_request(body, chat), asyncio.get_running_loop())
            self.engine.submit(job)
        except RequestError:
            self.metrics.requests.labels(endpoint, "error").inc()
            raise
        except QueueFull as err:
            self.metrics.requests.labels(endpoint, "rejected").inc()
            raise RequestError(str(err), None, status=503, kind="server_overloaded") from None
        reply = _Reply(self, body, job, chat)
        if body.stream:
            return StreamingResponse(reply.stream(endpoint), media_type="text/event-stream")
        return await reply.collect(http, endpoint)

    def _decode_request(self, body: ChatRequest | CompletionRequest, chat: bool) -> DecodeRequest:
        """The decode request of a body, or RequestError naming the field at fault."""
        if body.model != self.model_name:
            raise RequestError(f"model {body.model!r} is not served here; this server serves {self.model_name!r} "
                               "(GET /v1/models)", "model")
        prompt = self._chat_ids(body) if chat else self._prompt_ids(body)
        field = "messages" if chat else "prompt"
        if not prompt:
            raise RequestError(f"{field}: the prompt is empty", field)
        if self.context is not None and len(prompt) >= self.context:
            raise RequestError(f"{field}: the prompt has {len(prompt)} tokens; the model takes {self.context} "
                               "positions in all, prompt and new tokens: shorten it", field)
        room = self.context - len(prompt) if self.context is not None else None
        limit = body.token_limit
        if limit is None:
            limit = room if chat and room is not None else min(COMPLETION_DEFAULT_MAX_TOKENS, room or COMPLETION_DEFAULT_MAX_TOKENS)
        elif room is not None and limit > room:
            raise RequestError(f"max_tokens: {limit} new tokens after a {len(prompt)}-token prompt exceed the "
                               f"model's {self.context} positions; ask for at most {room}", "max_tokens")
        generator = None
        if body.seed is not None:
            try:
                generator = torch.Generator(device=self.model.device).manual_seed(body.seed)
            except RuntimeError:
                raise RequestError(f"seed: {body.seed} is out of range (use 0 to 2**63 - 1)", "seed") from None
        try:
            sampler = Sampler(body.temperature > 0, body.temperature, max(body.top_k, 0), body.top_p, body.min_p,
                              generator)
            stop = _stop_checker(body.stop, self.tokenizer) if body.stop else None
            eos = _eos_set(self.tokenizer.eos_token_id)
        except InputError as err:
            raise RequestError(str(err)) from None
        return DecodeRequest(prompt, limit, sampler, eos, stop, body.logprobs_k)

    def _chat_ids(self, body: ChatRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template; use /v1/completions", "messages")
        messages = [message.model_dump() for message in body.messages]
        try:
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)
        except Exception as err:  # the template's own checks (jinja raises its own types)
            raise RequestError(f"messages: the chat template refused them: {err}", "messages") from None
        return list(rendered["input_ids"])

    def _prompt_ids(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise RequestError("prompt: one prompt per request is served; send a request for each", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        if not all(0 <= token < self.vocab for token in prompt):
            raise RequestError(f"prompt: token ids must be in [0, {self.vocab})", "prompt")
        return list(prompt)


class _Reply:
    """One response, built from the job's events: whole (`collect`) or as server-sent events (`stream`)."""

    def __init__(self, server: _Server, body, job: Job, chat: bool) -> None:
        self.server, self.body, self.job, self.chat = server, body, job, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text = TextStream(server.tokenizer, body.stop)
        self.tokens: list[int] = []
        self.passes: list[int] = []
        self.logprobs: list = []

    def _take(self, event: tuple) -> tuple[list[int], list[int], list]:
        _, tokens, passes, logprobs = event
        self.tokens += tokens
        self.passes += passes
        self.logprobs += logprobs
        self.text.add(tokens)
        return tokens, passes, logprobs

    async def collect(self, http: Request, endpoint: str) -> JSONResponse:
        done = False
        try:
            while not done:
                try:
                    event = await asyncio.wait_for(self.job.events.get(), DISCONNECT_POLL_SECONDS)
                except TimeoutError:
                    if await http.is_disconnected():
                        self.job.cancelled = True
                        self.server.metrics.requests.labels(endpoint, "cancelled").inc()
                        return JSONResponse(error_body("the client went away", None), status_code=499)
                    continue
                if event[0] == "tokens":
                    self._take(event)
                elif event[0] == "error":
                    self.server.metrics.requests.labels(endpoint, "error").inc()
                    done = True
                    kind = "invalid_request_error" if event[2] < 500 else "server_error"
                    raise RequestError(event[1], None, status=event[2], kind=kind)
                else:
                    done = True
        finally:
            if not done:  # the handler was cancelled: its row leaves at the next step
                self.job.cancelled = True
        reason = event[1]
        text = self.text.delta(final=True)
        choice = {"index": 0, "finish_reason": reason, "logprobs": self._logprobs(self.tokens, self.logprobs)}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        self.server.metrics.requests.labels(endpoint, "ok").inc()
        return JSONResponse({**self._head(), "choices": [choice], "usage": self._usage(),
                             "tah": {"tokens": self.tokens, "passes": self.passes}})

    async def stream(self, endpoint: str):
        finished = False
        try:
            if self.chat:
                yield self._chunk({"role": "assistant", "content": ""}, None)
            while True:
                event = await self.job.events.get()
                if event[0] == "error":
                    self.server.metrics.requests.labels(endpoint, "error").inc()
                    yield _sse(error_body(event[1], None, "server_error"))
                    break
                if event[0] == "tokens":
                    tokens, passes, logprobs = self._take(event)
                    text = self.text.delta(final=False)
                    yield self._chunk(text, None, tokens, passes, logprobs)
                    continue
                text = self.text.delta(final=True)
                yield self._chunk(text, event[1])
                if self.body.include_usage:
                    yield _sse({**self._head(chunk=True), "choices": [], "usage": self._usage()})
                self.server.metrics.requests.labels(endpoint, "ok").inc()
                finished = True
                break
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (or an error): its row leaves at the next step
                self.job.cancelled = True
                self.server.metrics.requests.labels(endpoint, "cancelled").inc()

    def _chunk(self, text: str | dict, reason: str | None, tokens: list[int] = (), passes: list[int] = (),
               logprobs: list = ()) -> str:
        choice = {"index": 0, "finish_reason": reason, "logprobs": self._logprobs(tokens, logprobs) if tokens else None}
        if self.chat:
            choice["delta"] = text if isinstance(text, dict) else ({"content": text} if text or reason is None else {})
        else:
            choice["text"] = text
        return _sse({**self._head(chunk=True), "choices": [choice], "tah": {"tokens": list(tokens), "passes": list(passes)}})

    def _head(self, chunk: bool = False) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.server.model_name}

    def _usage(self) -> dict:
        prompt = len(self.job.request.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": len(self.tokens), "total_tokens": prompt + len(self.tokens)}

    def _logprobs(self, tokens: list[int], logprobs: list) -> dict | None:
        if self.body.logprobs_k is None:
            return None
        build = chat_logprobs if self.chat else completion_logprobs
        return build(self.server.tokenizer, tokens, logprobs, self.body.logprobs_k)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def load_app(model_dir: str, *, threshold: float | None = None, served_name: str | None = None,
             max_batch: int = 32, max_waiting: int = 256, device: str = "auto", engine: str = "auto") -> FastAPI:
    """The app `tah serve` runs: the checkpoint and its tokenizer loaded from `model_dir`, on `device`
    ("auto": CUDA in bfloat16 when there is a GPU, else the CPU in float32; or "cpu", "cuda", "cuda:N")."""
    from tah.generation.generate import ENGINES
    from tah.model.checkpoint import load_tokenizer
    from tah.model.tah_model import TaHForCausalLM

    for option, value in (("--max-batch", max_batch), ("--max-waiting", max_waiting)):
        if value < 1:
            raise InputError(f"{option} must be >= 1; got {value}")
    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    where = serving_device(device)
    overrides = {} if threshold is None else {"threshold": threshold}
    dtype = torch.bfloat16 if where.type == "cuda" else None
    model = TaHForCausalLM.from_pretrained(model_dir, dtype=dtype, **overrides).to(where).eval()
    tokenizer = load_tokenizer(model_dir)
    return build_app(model, tokenizer, model_name=served_name or str(model_dir), max_batch=max_batch,
                     max_waiting=max_waiting, engine=engine)


def serving_device(name: str) -> torch.device:
    """`--device`: "auto" is CUDA when there is a GPU, else the CPU. InputError for a device that is not
    there (before the model loads)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}")
    return device


def serve(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32, max_waiting: int = 256,
          threshold: float | None = None, threads: int | None = None, served_name: str | None = None,
          device: str = "auto", engine: str = "auto") -> None:
    """Serve a TaH checkpoint over HTTP with the OpenAI API: POST /v1/chat/completions and
    /v1/completions (streaming or not), GET /v1/models, /health and /metrics (Prometheus). Requests
    join the running batch between decode steps and leave it when done (continuous batching); each
    response carries a `tah` field with the passes per generated token (1, or 2+ where it iterated).
    SIGTERM (or Ctrl-C) stops taking requests, finishes the running ones, then exits.

    Args:
        model_dir: the checkpoint directory, with its tokenizer files.
        host, port, max_batch, max_waiting, threshold, served_name, device, engine: as `load_app` and
            uvicorn take them.
        threads: CPU threads for torch's products (None: torch's default).
    Raises:
        InputError: a setting below 1, before the model loads.
    """
    import uvicorn

    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be >= 1; got {threads}")
        torch.set_num_threads(threads)
    app = load_app(model_dir, threshold=threshold, served_name=served_name, max_batch=max_batch,
                   max_waiting=max_waiting, device=device, engine=engine)
    uvicorn.run(app, host=host, port=port, log_level="info")
