"""``harmaug serve``: a guard as an HTTP moderation service (FastAPI on uvicorn, Prometheus metrics).

Endpoints: ``POST /v1/moderations`` in the shape of OpenAI's moderation API (so an application
switches by changing its base URL), ``POST /v1/classify`` for (prompt, response) rows,
``GET /health`` (alive), ``GET /ready`` (model loaded, not draining) and ``GET /metrics``
(Prometheus text format). Rows of concurrent requests share model calls, taking turns
(:class:`~harmaug_pl.deploy.microbatch.MicroBatcher`), and a text costs at most about what
``max_length`` tokens do (:mod:`harmaug_pl.data.encoding`). Every refusal answers with an OpenAI-style
error body naming the problem and an ``X-Request-Id`` header: 400 malformed JSON, 408 a body too
slow, 413 body too large (:mod:`harmaug_pl.deploy.http_limits`, whatever the FastAPI version),
422 a wrong or missing field or text that is not valid Unicode, 503 + ``Retry-After`` when the
queue is full; a 500 says only the request id (the cause goes to the server log) and closes the
connection. A request whose client disconnects leaves the queue. The model is loaded and tried on
one row before the port opens: a model that cannot load stops the command with one line. SIGTERM
(or Ctrl+C) turns ``/ready`` to 503, stops accepting connections and answers every request already
received.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harmaug_pl.data.encoding import text_problem
from harmaug_pl.deploy.http_limits import HTTP_PARSERS, BodyLimit, error_body, protocol_with_header_timeout
from harmaug_pl.deploy.microbatch import MicroBatcher, QueueFull

if TYPE_CHECKING:  # the guard (torch, transformers) loads only when the command serves, not for --help
    from harmaug_pl.deploy.guard import Guard
from harmaug_pl.errors import ConfigError, HarmAugError, ModelLoadError, first_line, one_line_errors

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
    from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictStr
    from starlette.exceptions import HTTPException
except ImportError as missing:  # the optional `serve` extra
    raise ModelLoadError(
        f"harmaug serve needs the '{missing.name}' package, which is not installed: "
        "pip install 'harmaug-pl[serve]'"
    ) from missing


log = logging.getLogger("harmaug.serve")
UNSAFE = "unsafe"  # the binary head's category (its own label, not one of OpenAI's)
Scored = tuple[float, bool, dict[str, float] | None]  # P(unsafe), truncated, P(category) by name
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ServeSettings:
    """Batching and the limits a request must respect (``harmaug serve --help`` says each)."""

    # measured best on a 2-core CPU (benchmarks/serving.py, docs/serving.md): up to 32 rows per model
    # call, run in length-sorted forward passes of 4 (padding to a call's longest row cost 1.7x)
    max_batch_size: int = 32
    forward_batch_size: int | None = 4
    # rows one request puts into a model call before the other waiting requests get their turn: a
    # one-row request sent while 41 rows of 100k characters are scored waited 0.16-0.54 s with 2
    # (0.71-0.92 s with 4) on a loaded 2-core machine (docs/serving.md), not the large request's 3-5 s
    turn_rows: int = 2
    max_wait_ms: float = 5.0
    max_queue_rows: int = 256
    max_rows: int = 64
    max_chars: int = 100_000
    max_body_bytes: int = 4 * 2**20
    threshold: float | None = None
    read_timeout_s: float = 10.0  # headers, then the body, must each arrive within this
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this
    max_connections: int = 256  # uvicorn answers 503 beyond this many connections + requests

    def check(self) -> None:
        names = ("max_batch_size", "turn_rows", "max_queue_rows", "max_rows", "max_chars", "max_body_bytes")
        for name in (*names, "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("read_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.forward_batch_size is not None and self.forward_batch_size < 1:
            raise ConfigError(f"--forward_batch_size must be >= 1, got {self.forward_batch_size}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_rows > self.max_queue_rows:
            raise ConfigError(
                f"--max_rows {self.max_rows} is above --max_queue_rows {self.max_queue_rows}: "
                "such a request could never be queued"
            )
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be in [0, 1], got {self.threshold}")


# -- request and response bodies --------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputPart(BaseModel):
    """One part of a multi-modal moderation input; a text guard reads ``{"type": "text"}`` parts."""

    type: StrictStr
    text: StrictStr | None = None


class ModerationRequest(BaseModel):
    """OpenAI's request; fields other clients may add (``user``, ...) are ignored, as OpenAI does."""

    input: StrictStr | list[StrictStr | InputPart]
    model: StrictStr | None = None


class ClassifyRow(_Body):
    prompt: StrictStr
    response: StrictStr | None = None


class ClassifyRequest(_Body):
    rows: list[ClassifyRow]
    threshold: StrictFloat | None = Field(default=None, ge=0.0, le=1.0)  # not "0.5", not true


class RequestError(Exception):
    """A request the service refuses, with the field it is about (OpenAI's ``param``)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error shape (:func:`~harmaug_pl.deploy.http_limits.error_body`); after a 500 the
    connection is closed (``Connection: close``), so a client never reuses one in an unknown state."""
    headers = dict(headers or {})
    if status >= 500 and status != 503:
        headers["Connection"] = "close"
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def request_id(request: Request) -> str:
    """The id :class:`MetricsMiddleware` gave the request (its ``X-Request-Id`` header)."""
    return request.scope.get(REQUEST_ID, "unknown")


async def disconnected(request: Request) -> None:
    """Return when the client disconnects (after the body, a read waits for exactly that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _field(loc: tuple[Any, ...]) -> str:
    """``("body", "rows", 0, "prompt")`` -> ``rows[0].prompt``."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


# -- metrics ----------------------------------------------------------------------------------
class ServeMetrics:
    """The service's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "harmaug_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "harmaug_request_seconds", "time to answer a request", ["endpoint"], registry=r
        )
        self.rows = Counter("harmaug_rows", "rows scored", ["endpoint"], registry=r)
        self.truncated = Counter("harmaug_truncated_rows", "rows longer than max_length", registry=r)
        self.batch_rows = Histogram(
            "harmaug_batch_rows", "rows per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.model_seconds = Histogram(
            "harmaug_model_seconds", "time per model call (tokenise + forward)", registry=r
        )
        self.model_cpu = Counter(
            "harmaug_model_cpu_seconds", "CPU time of the model calls (their thread's)", registry=r
        )
        self.queued = Gauge("harmaug_queue_rows", "rows waiting for a model call", registry=r)

    def on_batch(self, rows: int, seconds: float, cpu_seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.model_seconds.observe(seconds)
        self.model_cpu.inc(cpu_seconds)


KNOWN_PATHS = frozenset({"/v1/moderations", "/v1/classify", "/health", "/ready", "/metrics"})
REQUEST_ID = "harmaug.request_id"  # the scope key of a request's id


class MetricsMiddleware:
    """ASGI middleware counting every request by path and status, with its latency; it gives each
    request an id (``X-Request-Id`` on every answer, the server log names it)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]
        scope[REQUEST_ID] = rid = f"req_{uuid.uuid4().hex}"

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


# -- the app ----------------------------------------------------------------------------------
def create_app(guard: Guard, settings: ServeSettings | None = None, model_name: str | None = None) -> FastAPI:
    """The service around a loaded guard; uvicorn (or a test client) runs its lifespan."""
    from harmaug_pl.deploy.guard import verdict

    settings = settings or ServeSettings()
    settings.check()
    name = model_name or Path(guard.source).name
    threshold = guard.threshold if settings.threshold is None else settings.threshold
    metrics = ServeMetrics()

    def score(rows: list[tuple[str, str | None]]) -> list[Scored]:
        prompts, responses = [p for p, _ in rows], [r for _, r in rows]
        scores = guard.score_all(prompts, responses, settings.forward_batch_size or len(rows))
        categories = scores.categories or [None] * len(rows)
        return list(zip(scores.p_unsafe, scores.truncated, categories, strict=True))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = MicroBatcher(
            score,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue_rows=settings.max_queue_rows,
            on_batch=metrics.on_batch,
            turn_rows=settings.turn_rows,
        )
        batcher.start()
        app.state.batcher = batcher
        metrics.queued.set_function(lambda: batcher.queued_rows)
        yield
        await batcher.stop()

    app = FastAPI(title="harmaug guard", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.draining = False
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.read_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: it counts the 408s and 413s too

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        if any(p["type"] == "json_invalid" for p in problems):
            detail, where = problems[0].get("ctx", {}).get("error", ""), problems[0]["loc"][-1]
            return error_response(400, f"malformed JSON body: {detail} (at character {where})")
        fields = [_field(tuple(p["loc"])) for p in problems]
        message = "; ".join(f"{f}: {p['msg']}" for f, p in zip(fields, problems))
        return error_response(422, message, param=fields[0])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    def failure(request: Request, error: BaseException) -> JSONResponse:
        rid = request_id(request)
        log.error("request %s failed", rid, exc_info=error)
        return error_response(
            500, f"the guard failed on this request (request id {rid})", code="internal_error"
        )

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        return failure(request, error)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.code, error.headers)

    async def run(
        request: Request, rows: list[tuple[str, str | None]], endpoint: str
    ) -> list[Scored] | JSONResponse:
        """The rows' scores; if the client disconnects first, its rows leave the queue."""
        if app.state.draining:
            raise RequestError(503, "the server is shutting down", code="shutting_down")
        scoring = asyncio.ensure_future(app.state.batcher.submit(rows))
        gone = asyncio.ensure_future(disconnected(request))
        await asyncio.wait({scoring, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not scoring.done():
            scoring.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scoring
            return error_response(499, "the client disconnected", code="client_disconnected")  # never read
        try:
            results = scoring.result()
        except QueueFull as full:
            retry = {"Retry-After": str(full.retry_after)}
            raise RequestError(503, f"server busy: {full}", code="queue_full", headers=retry) from full
        except Exception as error:  # the model failed on this request's rows (only its own: microbatch.py)
            return failure(request, error)
        metrics.rows.labels(endpoint).inc(len(rows))
        metrics.truncated.inc(sum(cut for _, cut, _ in results))
        return results

    def check_rows(count: int, field: str) -> None:
        if count == 0:
            raise RequestError(422, f"{field}: give at least one row", param=field)
        if count > settings.max_rows:
            raise RequestError(
                422, f"{field}: {count} rows, above the limit of {settings.max_rows} per request", param=field
            )

    def check_text(text: str, field: str) -> None:
        problem = text_problem(text)
        if problem:
            raise RequestError(422, f"{field}: {problem}", param=field, code="invalid_text")
        if len(text) > settings.max_chars:
            raise RequestError(
                422,
                f"{field}: {len(text)} characters, above the hard cap of {settings.max_chars} (rows longer "
                f"than the guard's {guard.settings.max_length} tokens are otherwise truncated and marked)",
                param=field,
            )

    @app.post("/v1/moderations", response_model=None)
    async def moderations(body: ModerationRequest, request: Request) -> dict[str, Any] | JSONResponse:
        texts = [body.input] if isinstance(body.input, str) else body.input
        check_rows(len(texts), "input")
        prompts = []
        for i, item in enumerate(texts):
            field = f"input[{i}]" if isinstance(body.input, list) else "input"
            if isinstance(item, InputPart):
                if item.type != "text" or item.text is None:
                    raise RequestError(
                        422,
                        f"{field}: a {item.type!r} part; this guard reads text only "
                        '({"type": "text", "text": ...})',
                        param=f"{field}.type",
                    )
                item = item.text
            check_text(item, field)
            prompts.append(item)
        results = await run(request, [(p, None) for p in prompts], "/v1/moderations")
        if isinstance(results, JSONResponse):
            return results
        return {
            "id": f"modr-{uuid.uuid4().hex}",
            "model": name,
            "results": [
                moderation_result(p, cut, threshold, cats, guard.category_thresholds, guard.public_names)
                for p, cut, cats in results
            ],
        }

    @app.post("/v1/classify", response_model=None)
    async def classify(body: ClassifyRequest, request: Request) -> dict[str, Any] | JSONResponse:
        check_rows(len(body.rows), "rows")
        for i, row in enumerate(body.rows):
            check_text(row.prompt, f"rows[{i}].prompt")
            if row.response is not None:
                check_text(row.response, f"rows[{i}].response")
        used = threshold if body.threshold is None else body.threshold
        results = await run(request, [(r.prompt, r.response or None) for r in body.rows], "/v1/classify")
        if isinstance(results, JSONResponse):
            return results
        return {
            "id": f"clf-{uuid.uuid4().hex}",
            "model": name,
            "threshold": used,
            "max_length": guard.settings.max_length,
            "results": [verdict(p, cut, used, cats, guard.category_thresholds) for p, cut, cats in results],
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        batcher = getattr(app.state, "batcher", None)
        if app.state.draining or batcher is None or not batcher.running or batcher.full:
            state = "draining" if app.state.draining else "busy" if batcher and batcher.full else "starting"
            return JSONResponse({"status": state}, status_code=503)
        return JSONResponse({"status": "ready", "model": name, "threshold": threshold})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def moderation_result(
    p_unsafe: float,
    truncated: bool,
    threshold: float,
    category_scores: dict[str, float] | None = None,
    category_thresholds: dict[str, float] | None = None,
    public_names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One ``results[]`` entry of OpenAI's moderation shape: ``unsafe`` (the binary head) and the
    guard's categories under OpenAI's names where its pack maps one (its own names otherwise).

    ``flagged`` is the binary head at ``threshold``; a category is true on a flagged row whose
    P(category) is above that category's threshold (it names the kind of harm; false on unflagged
    rows). Categories the guard does not model are absent (never false or 0). ``truncated`` is ours
    (OpenAI's clients keep unknown fields): the text was longer than the guard's max length and was
    scored on its first tokens.
    """
    from harmaug_pl.deploy.guard import verdict  # the one rule for a row's label and category flags

    answer = verdict(p_unsafe, truncated, threshold, category_scores, category_thresholds)
    flagged, named = answer["label"] == "unsafe", set(answer.get("categories", ()))
    flags, scores = {UNSAFE: flagged}, {UNSAFE: p_unsafe}
    names = public_names or {}
    for name, score in (category_scores or {}).items():
        key = names.get(name, name)
        flags[key] = name in named
        scores[key] = score
    return {
        "flagged": flagged,
        "categories": flags,
        "category_scores": scores,
        "category_applied_input_types": {key: ["text"] for key in flags},
        "truncated": truncated,
    }


# -- the command ------------------------------------------------------------------------------
def load_guard(path: str, threads: int | None) -> Guard:
    """Load the guard and score one row, so a broken model stops the command before it serves."""
    from harmaug_pl.deploy.guard import Guard

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        guard = Guard.from_pretrained(path, threads=threads)
        guard.score(["warm-up"], [None])
    except HarmAugError:
        raise
    except Exception as error:  # a corrupt file fails deep inside safetensors/onnxruntime/transformers
        raise ModelLoadError(f"cannot load the guard {path}: {first_line(error)}") from error
    return guard


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, which also turns ``/ready`` to 503 as soon as SIGTERM/SIGINT arrives
    (uvicorn itself then stops accepting and waits for the requests in flight)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.harmaug_app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.harmaug_app.state.draining = True
        super().handle_exit(sig, frame)


def build_parser() -> argparse.ArgumentParser:
    defaults = ServeSettings()
    parser = argparse.ArgumentParser(
        prog="harmaug serve",
        description=(
            "Serve a guard over HTTP: POST /v1/moderations (OpenAI's moderation shape), POST "
            "/v1/classify (prompt + response rows), GET /health, /ready, /metrics (Prometheus)."
        ),
    )
    parser.add_argument("--model", required=True, help="an exported guard folder, or an .onnx file in one")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model_name", help="the name responses carry (default: the folder or file name)")
    parser.add_argument(
        "--threshold", type=float, help="P(unsafe) above which a row is flagged (default: the export's)"
    )
    parser.add_argument(
        "--max_batch_size", type=int, default=defaults.max_batch_size, help="rows per model call"
    )
    parser.add_argument(
        "--forward_batch_size",
        type=int,
        default=defaults.forward_batch_size,
        help="rows per forward pass within a model call, grouped by length (0: all in one pass)",
    )
    parser.add_argument(
        "--turn_rows",
        type=int,
        default=defaults.turn_rows,
        help="rows one request puts into a model call before other waiting requests get their turn",
    )
    parser.add_argument(
        "--max_wait_ms",
        type=float,
        default=defaults.max_wait_ms,
        help="longest a row waits for its batch to fill (0: no wait)",
    )
    parser.add_argument(
        "--max_queue_rows",
        type=int,
        default=defaults.max_queue_rows,
        help="rows waiting at most; beyond, requests get 503 with Retry-After",
    )
    parser.add_argument("--max_rows", type=int, default=defaults.max_rows, help="rows per request at most")
    parser.add_argument(
        "--max_chars",
        type=int,
        default=defaults.max_chars,
        help="hard cap on characters per text (422 above); shorter texts past the guard's max length "
        "are truncated and marked",
    )
    parser.add_argument("--max_body_bytes", type=int, default=defaults.max_body_bytes, help="413 above")
    parser.add_argument(
        "--read_timeout_s",
        type=float,
        default=defaults.read_timeout_s,
        help="a request's headers, then its body, must each arrive within this (else closed / 408)",
    )
    parser.add_argument(
        "--keep_alive_s",
        type=float,
        default=defaults.keep_alive_s,
        help="idle kept-alive connections close after this",
    )
    parser.add_argument(
        "--max_connections",
        type=int,
        default=defaults.max_connections,
        help="open connections + requests at most; beyond, uvicorn answers 503",
    )
    parser.add_argument(
        "--http",
        default="auto",
        choices=HTTP_PARSERS,
        help="uvicorn's HTTP parser (auto: httptools if installed)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch / onnxruntime intra-op threads (default: theirs)"
    )
    parser.add_argument(
        "--drain_timeout_s",
        type=float,
        default=30.0,
        help="on SIGTERM, longest wait for the requests in flight",
    )
    parser.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    settings = ServeSettings(
        max_batch_size=args.max_batch_size,
        forward_batch_size=args.forward_batch_size or None,
        turn_rows=args.turn_rows,
        max_wait_ms=args.max_wait_ms,
        max_queue_rows=args.max_queue_rows,
        max_rows=args.max_rows,
        max_chars=args.max_chars,
        max_body_bytes=args.max_body_bytes,
        threshold=args.threshold,
        read_timeout_s=args.read_timeout_s,
        keep_alive_s=args.keep_alive_s,
        max_connections=args.max_connections,
    )
    settings.check()
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    guard = load_guard(args.model, args.threads)
    app = create_app(guard, settings, args.model_name)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.drain_timeout_s,
        access_log=args.log_level == "debug",
        http=protocol_with_header_timeout(args.http, settings.read_timeout_s),
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
    )
    asyncio.run(_DrainingServer(config, app).serve())  # a port it cannot bind: uvicorn logs why, exits 1


def console_main(argv: list[str]) -> None:
    """``harmaug serve ...``: our errors as one line and exit status 2, like the other commands."""
    with one_line_errors("harmaug serve"):
        main(argv)


if __name__ == "__main__":  # ``python -m harmaug_pl.deploy.serve``: without the training CLI's imports
    import sys

    console_main(sys.argv[1:])
