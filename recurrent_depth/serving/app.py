"""The OpenAI-compatible HTTP server over a serving engine (FastAPI on uvicorn).

`create_app(engine, tokenizer=..., model_name=...)` answers:
- `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI's bodies (see `protocol`), each choice one engine
  request, streamed as server-sent events ending in `data: [DONE]` or answered whole;
- `GET /v1/models` (with the served model's context, depth cap and chat template under `recurrent_depth`),
  `GET /health` (503 until the engine is warm, or once it has died), `GET /metrics` (Prometheus, see `metrics`);
- `GET /`: the playground page (`static/`).

The engine calls back from its own thread; each callback only hands the event to the request's asyncio queue.  A
client that disconnects cancels its engine requests at once (streaming: Starlette cancels the response; otherwise a
watch on the connection every `DISCONNECT_POLL_S`).  `BackgroundServer` runs an app in a thread (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import threading
import time
import uuid
from importlib import resources

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from recurrent_depth.data.tokenizer import Tokenizer
from recurrent_depth.decoding.chat_session import check_chat_template
from recurrent_depth.decoding.exit_criteria import DEFAULT_THRESHOLDS
from recurrent_depth.serving.metrics import CONTENT_TYPE, Metrics
from recurrent_depth.serving.protocol import (
    REASONING_EFFORT,
    APIError,
    ChatBody,
    CompletionBody,
    Job,
    Limits,
    effort_steps,
    make_job,
    parse_body,
    usage,
)
from recurrent_depth.serving.requests import Done, QueueFull, RequestError, Token
from recurrent_depth.serving.text import ChoiceText

DISCONNECT_POLL_S = 0.1  # how often a non-streamed request checks that its client is still there
STATIC = resources.files("recurrent_depth.serving") / "static"
log = logging.getLogger(__name__)


def has_chat_template(tokenizer: Tokenizer | None) -> bool:
    if tokenizer is None:
        return False
    try:
        check_chat_template(tokenizer)
    except ValueError:
        return False
    return True


@dataclasses.dataclass
class _Choice:
    index: int
    text: ChoiceText
    handle: object = None
    tokens: list = dataclasses.field(default_factory=list)
    steps: list = dataclasses.field(default_factory=list)
    finish: str | None = None  # OpenAI's finish_reason once the choice has ended
    done: bool = False  # the engine said Done
    prompt_steps: int = 0
    last_token_at: float | None = None


@dataclasses.dataclass
class _Update:
    """What one event adds to a choice: text, tokens and their iterations, and the finish reason if it ended."""

    choice: _Choice
    text: str = ""
    tokens: tuple = ()
    steps: tuple = ()
    finish: str | None = None


class _Run:
    """One HTTP request's engine requests, their events, and the response built from them."""

    def __init__(self, served: Served, job: Job, endpoint: str, arrived: float):
        self.served, self.job, self.endpoint, self.arrived = served, job, endpoint, arrived
        self.id = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        tokenizer = served.limits.tokenizer
        self.choices = [_Choice(i, ChoiceText(tokenizer, job.text_stop_ids, job.stops))
                        for i in range(len(job.requests))]
        self.error: str | None = None

    def _callback(self, index: int):
        def on_event(event):  # the engine's thread: hand over, never block
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, time.perf_counter(), event))
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass
        return on_event

    def submit(self) -> None:
        try:
            for choice, request in zip(self.choices, self.job.requests):
                choice.handle = self.served.engine.submit(request, self._callback(choice.index))
        except QueueFull as err:
            self.cancel()
            raise APIError(429, f"the server is busy: every slot is in use and the queue is full ({err})",
                           code="queue_full", type="rate_limit_error") from None
        except RequestError as err:
            self.cancel()
            raise APIError(400, str(err), err.param, code="invalid_value") from None
        except RuntimeError as err:  # the engine stopped or died since the readiness check
            self.cancel()
            raise APIError(503, str(err), code="engine_dead", type="server_error") from None
        self.served.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in self.job.requests))

    def cancel(self, reason: str = "abort") -> None:
        """Frees the slots of the choices still generating (a disconnected client, or a failure)."""
        for choice in self.choices:
            if choice.handle is not None and not choice.done:
                choice.handle.cancel()
                if choice.finish is None:
                    choice.finish = reason
                    self.served.metrics.requests.labels(self.endpoint, reason).inc()

    @property
    def finished(self) -> bool:
        return all(c.done for c in self.choices)

    def apply(self, index: int, at: float, event) -> _Update | None:
        choice, metrics = self.choices[index], self.served.metrics
        if isinstance(event, Token):
            if choice.finish is not None:  # after a stop string: the tokens before the cancel took hold
                return None
            metrics.generation_tokens.inc()
            metrics.iterations.observe(event.steps)
            if choice.last_token_at is None:
                metrics.ttft.observe(at - self.arrived)
            else:
                metrics.itl.observe(at - choice.last_token_at)
            choice.last_token_at = at
            choice.tokens.append(event.id)
            choice.steps.append(event.steps)
            text, stopped = choice.text.add(event.id)
            if stopped:
                choice.handle.cancel()
                self._finish(choice, "stop")
            return _Update(choice, text, (event.id,), (event.steps,), choice.finish)
        if isinstance(event, Done):
            choice.done, choice.prompt_steps = True, event.prompt_steps
            if choice.finish is not None:
                return None
            if event.reason == "error":
                self.error = event.error or "the engine failed"
                self._finish(choice, "error")
                return None
            text = choice.text.finish()
            reason = {"cancelled": "abort"}.get(event.reason, event.reason)
            self._finish(choice, "stop" if choice.text.stopped else reason)
            return _Update(choice, text, finish=choice.finish)
        return None

    def _finish(self, choice: _Choice, reason: str) -> None:
        choice.finish = reason
        self.served.metrics.requests.labels(self.endpoint, reason).inc()

    def usage(self) -> dict:
        return usage(self.job.prompt_tokens, [c.steps for c in self.choices], [c.prompt_steps for c in self.choices])

    def _extras(self, tokens, steps) -> dict:
        extras = {}
        if self.job.return_iterations:
            extras["iterations"] = list(steps)
        if self.job.return_token_ids:
            extras["token_ids"] = list(tokens)
        return extras

    def _envelope(self, choices: list, **fields) -> dict:
        kind = ("chat.completion" if self.endpoint == "chat" else "text_completion") + (
            ".chunk" if self.job.stream and self.endpoint == "chat" else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.served.model_name,
                "choices": choices, **fields}

    def response(self) -> dict:
        if self.error is not None:
            raise APIError(500, f"generation failed: {self.error}", code="engine_error", type="server_error")
        choices = []
        for c in self.choices:
            body = ({"message": {"role": "assistant", "content": c.text.text}} if self.endpoint == "chat"
                    else {"text": c.text.text})
            choices.append({"index": c.index, **body, "logprobs": None, "finish_reason": c.finish,
                            **self._extras(c.tokens, c.steps)})
        return self._envelope(choices, usage=self.usage())

    def chunk(self, update: _Update) -> dict:
        if self.endpoint == "chat":
            body = {"delta": {"content": update.text} if update.text or not update.finish else {}}
        else:
            body = {"text": update.text}
        choice = {"index": update.choice.index, **body, "logprobs": None, "finish_reason": update.finish,
                  **self._extras(update.tokens, update.steps)}
        return self._envelope([choice], **({"usage": None} if self.job.include_usage else {}))

    async def collect(self, request: HTTPRequest) -> dict:
        """The whole response; cancels the choices if the client goes away first."""
        watch = asyncio.create_task(self._watch(request))
        try:
            while not self.finished:
                self.apply(*await self.queue.get())
        finally:
            watch.cancel()
            self.cancel()
            self.served.metrics.duration.observe(time.perf_counter() - self.arrived)
        return self.response()

    async def _watch(self, request: HTTPRequest) -> None:
        """Cancels the choices once the client has disconnected (checked every DISCONNECT_POLL_S)."""
        while not self.finished:
            await asyncio.sleep(DISCONNECT_POLL_S)
            if await request.is_disconnected():
                self.cancel()
                return

    async def stream(self):
        """Server-sent events: a chunk per token (and per finished choice), usage if asked, then [DONE].  A
        disconnect cancels this generator (Starlette), and its `finally` frees the slots."""
        try:
            if self.endpoint == "chat":
                for c in self.choices:
                    yield _sse(self._envelope([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}],
                                              **({"usage": None} if self.job.include_usage else {})))
            asks_tokens = self.job.return_iterations or self.job.return_token_ids
            while not self.finished:
                update = self.apply(*await self.queue.get())
                if update is not None and (update.text or update.finish or (asks_tokens and update.tokens)):
                    yield _sse(self.chunk(update))
            if self.error is not None:
                yield _sse(APIError(500, f"generation failed: {self.error}", code="engine_error",
                                    type="server_error").body())
            elif self.job.include_usage:
                yield _sse(self._envelope([], usage=self.usage()))
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()
            self.served.metrics.duration.observe(time.perf_counter() - self.arrived)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class Served:
    """The engine, its tokenizer and name, what they allow, and the metrics: the state behind the routes."""

    def __init__(self, engine, tokenizer: Tokenizer | None, model_name: str):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.limits = Limits(max_len=engine.max_len, max_steps=engine.max_steps,
                             vocab_size=engine.config.vocab_size, tokenizer=tokenizer,
                             chat=has_chat_template(tokenizer))
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.start_error: str | None = None

    def warm_up(self) -> None:
        """Engine.start() (compiles, then starts the loop); a failure is what /health reports."""
        try:
            self.engine.start()
        except Exception as err:  # noqa: BLE001 - any failure leaves the server up, reporting it
            log.exception("the engine failed to start")
            self.start_error = f"{type(err).__name__}: {err}"

    def failure(self) -> str | None:
        return self.start_error or getattr(self.engine, "error", None)

    def check_ready(self) -> None:
        failure = self.failure()
        if failure:
            raise APIError(503, f"the engine has stopped: {failure}", code="engine_dead", type="server_error")
        if not self.engine.ready:
            raise APIError(503, "the engine is warming up (compiling); GET /health says when it is ready",
                           code="engine_not_ready", type="server_error")

    def model_card(self) -> dict:
        config = self.engine.config
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "recurrent-depth",
                "max_model_len": self.limits.max_len,
                "recurrent_depth": {
                    "max_steps": self.limits.max_steps, "default_num_steps": min(config.mean_recurrence,
                                                                                 self.limits.max_steps),
                    "max_len": self.limits.max_len, "slots": self.engine.slots, "chat": self.limits.chat,
                    "text": self.tokenizer is not None, "exit_criteria": DEFAULT_THRESHOLDS,
                    "reasoning_effort": {k: effort_steps(k, self.limits.max_steps) for k in REASONING_EFFORT}}}

    async def generate(self, request: HTTPRequest, kind, endpoint: str) -> Response:
        arrived = time.perf_counter()
        body = parse_body(await request.body(), kind)
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           "model", code="model_not_found")
        self.check_ready()
        run = _Run(self, make_job(body, self.limits), endpoint, arrived)
        run.submit()
        if run.job.stream:
            return StreamingResponse(run.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await run.collect(request))


def create_app(engine, *, tokenizer: Tokenizer | None = None, model_name: str = "model", warm_up: bool = False,
               stop_engine: bool = False) -> FastAPI:
    """The server's app.  `warm_up` starts the engine (compiling) in a thread when the app starts, so that the
    server answers /health (503) meanwhile; `stop_engine` stops it when the app shuts down."""
    served = Served(engine, tokenizer, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if warm_up:
            threading.Thread(target=served.warm_up, name="engine-warm-up", daemon=True).start()
        yield
        if stop_engine:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="recurrent-depth", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, err: APIError):
        served.metrics.rejected.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, err: HTTPException):
        return JSONResponse(APIError(err.status_code, str(err.detail), code=None).body(),
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await served.generate(request, CompletionBody, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await served.generate(request, ChatBody, "chat")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [served.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != served.model_name:
            raise APIError(404, f"the model {name!r} does not exist", "model", code="model_not_found")
        return served.model_card()

    @app.get("/health")
    async def health():
        failure = served.failure()
        if failure:
            return JSONResponse({"status": "error", "error": failure}, status_code=503)
        if not engine.ready:
            return JSONResponse({"status": "warming up"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(served.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); OSError if the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serves `app` on the listening socket until SIGINT/SIGTERM."""
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])


class BackgroundServer:
    """Serves an app from a thread on 127.0.0.1 (tests and benchmarks): `with BackgroundServer(app) as s: s.url`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = listen(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="uvicorn")

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
