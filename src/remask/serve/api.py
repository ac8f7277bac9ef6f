"""An OpenAI-compatible HTTP API over a remask model, and the page that shows the denoising live.

- `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` with OpenAI's request and
  response shapes, `stream: true` as server-sent events, usage counts, `stop` strings, `seed`;
  `max_tokens` is a limit (the answer ends at the end-of-text the model predicts, and
  `finish_reason` says which). remask's sampler settings are extra body fields under their
  `SamplerConfig` names (`steps`, `block_length`, `remasking`, `cache`, `parallel`, ...; all but
  `gen_length`, `temperature` and `stop_at_eos`); `remask_stream: "steps"` streams every denoising
  step's partial answer (tokens and the steps that revealed them) beside the text deltas.
- `GET /health`; `GET /` the page (`static/`).
- Errors have OpenAI's body `{"error": {"message", "type", "param", "code"}}`: malformed JSON,
  unknown fields and out-of-range values are 400, a missing or wrong API key 401, a full queue
  503 with `Retry-After`. The server keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
import time
import typing
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, create_model

from remask.errors import RemaskError
from remask.pipeline import Generation, Pipeline
from remask.sampling import SamplerConfig
from remask.serve.batcher import Batcher, Job, QueueFull, StepEvent, answer_tokens

STATIC = Path(__file__).parent / "static"


class APIError(Exception):
    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = status, message, kind, param, code, headers


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- requests -------------------------------------------------------------------------------------------


# Every SamplerConfig field is a body field of the same name, except those OpenAI's own fields set
# (gen_length from max_tokens, temperature) and stop_at_eos (a served answer ends at its end-of-text).
NOT_BODY_FIELDS = ("gen_length", "temperature", "stop_at_eos")


def body_type(hint: Any) -> type:
    """A sampler field's JSON type; choices arrive as strings and SamplerConfig checks them."""
    return next((t for t in (bool, int, float) if hint is t or t in typing.get_args(hint)), str)


SAMPLER_HINTS = typing.get_type_hints(SamplerConfig)
SamplerFields = create_model(
    "SamplerFields", __config__=ConfigDict(extra="forbid"),
    __doc__="remask's sampler settings, as extra body fields (None: the server's default).",
    **{f.name: (body_type(SAMPLER_HINTS[f.name]) | None, None) for f in dataclasses.fields(SamplerConfig)
       if f.name not in NOT_BODY_FIELDS},
    remask_stream=(Literal["text", "steps"], "text"))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CommonFields(SamplerFields):
    """The OpenAI fields both endpoints take. Sampling options remask cannot honour must keep
    their neutral values (a different value is a 400, never silently ignored)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    user: str | None = None


class CompletionRequest(CommonFields):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(CommonFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def check_neutral(req: CommonFields) -> None:
    """400 for OpenAI options whose non-default values remask does not implement."""
    unsupported = {"n": (req.n, (None, 1)), "top_p": (req.top_p, (None, 1, 1.0)),
                   "presence_penalty": (req.presence_penalty, (None, 0, 0.0)),
                   "frequency_penalty": (req.frequency_penalty, (None, 0, 0.0)),
                   "logit_bias": (req.logit_bias, (None, {})), "logprobs": (req.logprobs, (None, False)),
                   "top_logprobs": (req.top_logprobs, (None, 0))}
    if isinstance(req, CompletionRequest):
        unsupported |= {"echo": (req.echo, (False,)), "suffix": (req.suffix, (None, "")),
                        "best_of": (req.best_of, (None, 1))}
    for name, (value, neutral) in unsupported.items():
        if value not in neutral:
            raise APIError(400, f"{name}={value!r} is not supported by remask", param=name)


# --- the app ------------------------------------------------------------------------------------------------


def create_app(pipe: Pipeline, *, model_name: str, sampler: SamplerConfig, api_key: str | None = None,
               max_tokens_limit: int = 512, max_batch: int = 16, max_queue: int = 64, batching: bool = True) -> FastAPI:
    """The FastAPI app; its batching thread starts and stops with the app's lifespan."""
    batcher = Batcher(pipe, max_batch=max_batch, max_queue=max_queue, batching=batching)
    context = pipe.model.config.max_sequence_length
    created = int(time.time())

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="remask", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
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
        return JSONResponse(error_body(message, "invalid_request_error", where), status_code=400)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return JSONResponse(error_body("invalid or missing API key", "invalid_request_error", code="invalid_api_key"),
                                    status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name} | batcher.load()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "remask"}]}

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def settings(req: CommonFields, max_tokens: int | None, prompt_len: int) -> tuple[SamplerConfig, int]:
        """The request's sampler (the server's default, its fields overridden) and its token limit."""
        check_neutral(req)
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} is not served here (this server serves {model_name!r})",
                           param="model", code="model_not_found")
        limit = max_tokens if max_tokens is not None else min(sampler.gen_length, max_tokens_limit)
        if limit > max_tokens_limit:
            raise APIError(400, f"max_tokens={limit} exceeds this server's limit of {max_tokens_limit}", param="max_tokens")
        given = {k: v for k, v in req.model_dump(include=set(SamplerFields.model_fields) - {"remask_stream"}).items()
                 if v is not None}
        if req.temperature is not None:
            given["temperature"] = req.temperature
        block = given.get("block_length", min(sampler.effective_block_length, limit))
        gen_length = math.ceil(limit / block) * block
        changes = {"gen_length": gen_length, "block_length": block,
                   "steps": given.pop("steps", gen_length)} | {k: v for k, v in given.items() if k != "block_length"}
        try:
            chosen = sampler.replace(**changes)
        except RemaskError as e:
            field = getattr(e, "field", None)
            raise APIError(400, str(e), param=field) from None
        if prompt_len + chosen.gen_length > context:
            raise APIError(400, f"the prompt ({prompt_len} tokens) and max_tokens ({limit}, {chosen.gen_length} "
                           f"answer positions) exceed the model's context of {context} tokens",
                           param="max_tokens", code="context_length_exceeded")
        return chosen, limit

    async def run(request: Request, req: CommonFields, prompt_ids: list[int], max_tokens: int | None, chat: bool):
        sampler_cfg, limit = settings(req, max_tokens, len(prompt_ids))
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop must be up to 4 non-empty strings", param="stop")
        job = Job(prompt_ids, sampler_cfg, req.seed, stream_steps=req.stream, loop=asyncio.get_running_loop())
        try:
            batcher.submit(job)
        except QueueFull:
            raise APIError(503, "the server is at capacity; retry shortly", kind="server_error", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            events = stream(job, req, ident, chat, limit, stops, len(prompt_ids))
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "error":
                    raise APIError(500, payload, kind="server_error")
                if kind == "done":
                    break
        except asyncio.CancelledError:
            job.cancel()
            raise
        text, reason, tokens = finish(payload, limit, stops)
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": tokens, "total_tokens": len(prompt_ids) + tokens}
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "usage": usage}

    def finish(generation: Generation, limit: int, stops: list[str]) -> tuple[str, str, int]:
        """(text, finish_reason, completion tokens): the answer cut at max_tokens and at a stop string."""
        tokens = answer_tokens(generation)
        ids = [t for t in generation.ids[:limit] if t not in pipe.stop_ids()]
        text = pipe.tokenizer.decode(ids)
        reason = "stop" if generation.ended and tokens <= limit else "length"
        cut = min((text.index(s) for s in stops if s in text), default=None)
        if cut is not None:
            text, reason = text[:cut], "stop"
        return text, reason, min(tokens, limit)

    async def stream(job: Job, req: CommonFields, ident: str, chat: bool, limit: int, stops: list[str],
                     prompt_len: int) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        sent = ""
        hold = max((len(s) for s in stops), default=1) - 1  # text that might begin a stop string waits

        def chunk(delta: str, reason: str | None = None, extra: dict | None = None) -> bytes:
            choice = ({"index": 0, "delta": ({"role": "assistant", "content": delta} if not sent and chat else
                                              {"content": delta}), "finish_reason": reason} if chat else
                      {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason})
            body = {"id": ident, "object": obj, "created": int(time.time()), "model": model_name, "choices": [choice]}
            if extra:
                body |= extra
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

        try:
            while True:
                kind, payload = await job.events.get()
                if kind == "error":
                    yield f"data: {json.dumps(error_body(payload, 'server_error'))}\n\n".encode()
                    return
                if kind == "step":
                    event: StepEvent = payload
                    settled = settled_text(event, limit)
                    cut = min((settled.index(s) for s in stops if s in settled), default=None)
                    ready = settled[:cut] if cut is not None else settled[:max(len(sent), len(settled) - hold)]
                    extra = ({"remask": {"step": event.step, "tokens": step_tokens(event),
                                         "reveal_step": event.reveal_step}} if req.remask_stream == "steps" else None)
                    if len(ready) > len(sent) or extra:
                        delta, sent = ready[len(sent):], ready if len(ready) > len(sent) else sent
                        yield chunk(delta, extra=extra)
                    if cut is not None:  # a stop string is settled: the answer is complete
                        job.cancel()
                        yield chunk("", "stop")
                        break
                    continue
                text, reason, tokens = finish(payload, limit, stops)
                if text.startswith(sent) and len(text) > len(sent):
                    yield chunk(text[len(sent):])
                yield chunk("", reason)
                if req.stream_options is not None and req.stream_options.include_usage:
                    usage = {"prompt_tokens": prompt_len, "completion_tokens": tokens, "total_tokens": prompt_len + tokens}
                    body = {"id": ident, "object": obj, "created": int(time.time()), "model": model_name, "choices": [],
                            "usage": usage}
                    yield f"data: {json.dumps(body)}\n\n".encode()
                break
            yield b"data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that went away stops its work

    def settled_text(event: StepEvent, limit: int) -> str:
        """The answer's text before its first still-masked position (and before its end-of-text)."""
        stops, mask = set(pipe.stop_ids()), pipe.tokenizer.mask_id
        out = []
        for t in event.ids[:limit]:
            if t == mask or t in stops:
                break
            out.append(t)
        return pipe.tokenizer.decode(out)

    def step_tokens(event: StepEvent) -> list[str | None]:
        """Each answer position's text (None while masked, "" from the end-of-text on)."""
        stops, mask = set(pipe.stop_ids()), pipe.tokenizer.mask_id
        out, ended = [], False
        for t, r in zip(event.ids, event.reveal_step):
            if ended or (r >= 0 and t in stops):
                ended = True
                out.append("")
            else:
                out.append(None if t == mask else pipe.tokenizer.decode([t]))
        return out

    mask_string = pipe.tokenizer.special_tokens["mask"]

    def no_mask_token(text: str, param: str) -> None:
        if mask_string and mask_string in text:
            raise APIError(400, f"the {param} contains the mask token {mask_string!r}; remask fills masks only "
                           "in the answer", param=param)

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt must be one string (batches of prompts are not supported)", param="prompt")
        no_mask_token(prompts[0], "prompt")
        try:
            ids = pipe.encode_prompt(prompts[0])
        except RemaskError as e:
            raise APIError(400, str(e), param="prompt") from None
        return await run(request, req, ids, req.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatRequest):
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        for m in messages:
            no_mask_token(m["content"], "messages")
        try:
            ids = pipe.encode_prompt(messages)
        except RemaskError as e:
            raise APIError(400, str(e), param="messages") from None
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await run(request, req, ids, limit, chat=True)

    return app
