"""An OpenAI-compatible HTTP API over a remask model, and the page that shows the denoising live.

- `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` with OpenAI's request and
  response shapes, `stream: true` as server-sent events, usage counts, `stop` strings, `seed`;
  `max_tokens` is a limit (the answer ends at the end-of-text the model predicts, and
  `finish_reason` says which). remask's sampler settings are extra body fields under their
  `SamplerConfig` names (`steps`, `block_length`, `remasking`, `cache`, `parallel`, ...; all but
  `gen_length`, `temperature` and `stop_at_eos`); `remask_stream: "steps"` streams every denoising
  step's partial answer (tokens and the steps that revealed them) beside the text deltas.
- `GET /health`; `GET /` the page (`static/`).
- Every error has OpenAI's body `{"error": {"message", "type", "param", "code"}}`: malformed JSON,
  unknown fields, values of the wrong JSON type and out-of-range values are 400, a missing or wrong
  API key 401, an unknown route 404, a wrong method 405, a full queue 503 with `Retry-After`, an
  internal failure 500. The server keeps serving.

Modules: `schemas` (request bodies), `routes` (the endpoints), `responses` (what is sent),
`batcher` (the thread that denoises requests together). `bind` and `run` serve an app from the CLI.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from remask.errors import RemaskError
from remask.pipeline import Pipeline
from remask.sampling import SamplerConfig
from remask.serve.batcher import Batcher
from remask.serve.responses import APIError, error_body
from remask.serve.routes import STATIC, Served, router

GRACEFUL_SHUTDOWN_S = 1  # Ctrl-C: how long open connections may take to finish before they are cut


def create_app(pipe: Pipeline, *, model_name: str, sampler: SamplerConfig, api_key: str | None = None,
               max_tokens_limit: int = 512, max_batch: int = 16, max_queue: int = 64, batching: bool = True) -> FastAPI:
    """The FastAPI app; its batching thread starts and stops with the app's lifespan. `sampler` is
    the default a request's fields override (its gen_length the default max_tokens)."""
    batcher = Batcher(pipe, max_batch=max_batch, max_queue=max_queue, batching=batching)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="remask", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = Served(pipe, batcher, model_name, sampler, max_tokens_limit)
    app.state.batcher = batcher
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    if api_key is not None:
        app.add_middleware(RequireKey, key=api_key)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def api_error(_: Request, e: APIError) -> JSONResponse:
    return e.response()


async def invalid_body(_: Request, e: RequestValidationError) -> JSONResponse:
    return invalid_request(e).response()


def invalid_request(e: RequestValidationError) -> APIError:
    """A 400 naming the first problem of a body that does not fit its schema."""
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        message, where = "the request body is not valid JSON", None
    elif kind == "extra_forbidden":
        message = f"unknown field {where!r}"
    elif kind == "missing":
        message = f"missing required field {where!r}"
    else:
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
    return APIError(400, message, param=where)


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own errors (no such route, a wrong method, a missing static file) in OpenAI's shape."""
    messages = {404: f"no such route: {request.method} {request.url.path}",
                405: f"method {request.method} is not allowed on {request.url.path}"}
    message = messages.get(e.status_code, str(e.detail))
    kind = "invalid_request_error" if e.status_code < 500 else "server_error"
    return JSONResponse(error_body(message, kind), status_code=e.status_code, headers=getattr(e, "headers", None))


async def internal_error(_: Request, e: Exception) -> JSONResponse:
    return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)


class RequireKey:
    """ASGI middleware: `/v1/` needs `Authorization: Bearer KEY` (else a 401). Plain ASGI rather than
    Starlette's BaseHTTPMiddleware, which hides a client's disconnect from the routes."""

    def __init__(self, app, *, key: str) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.key.encode()):
                error = APIError(401, "invalid or missing API key", code="invalid_api_key")
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for `run`; RemaskError when the host is not a valid address
    (an IP literal is checked as one; a name such as localhost must resolve) or the port is taken."""
    if not 0 <= port <= 65535:
        raise RemaskError(f"--port is out of range: {port}")
    literal = host.strip("[]")
    try:
        ipaddress.ip_address(literal)
    except ValueError:
        if ":" in literal or all(c.isdigit() or c == "." for c in literal):
            raise RemaskError(f"--host {host} is not a valid IP address") from None
    family = socket.AF_INET6 if ":" in literal else socket.AF_INET  # as uvicorn: localhost is 127.0.0.1
    try:
        family, kind, proto, _, address = socket.getaddrinfo(literal, port, family, socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RemaskError(f"--host {host} is not an address this machine can resolve ({reason})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise RemaskError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None
    return sock


def run(app: FastAPI, sock: socket.socket, *, log_level: str = "warning") -> None:
    """Serve `app` on a socket from `bind` until Ctrl-C (or SIGTERM). The signal stops the batcher
    after its current step, so running requests end at once (503) and the server exits within about
    a second; uvicorn then re-raises the signal (Ctrl-C: KeyboardInterrupt)."""
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    StoppingServer(config, app.state.batcher).run(sockets=[sock])


class StoppingServer(uvicorn.Server):
    """uvicorn's server that, on its exit signal, also asks the batcher to stop (signal-safe: no lock)."""

    def __init__(self, config: uvicorn.Config, batcher: Batcher) -> None:
        super().__init__(config)
        self.batcher = batcher

    def handle_exit(self, sig: int, frame) -> None:
        self.batcher.request_stop()
        super().handle_exit(sig, frame)
