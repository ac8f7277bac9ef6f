"""The endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
and `GET /` (the page).

A request's prompt is encoded as the CLI encodes it (a special token's string is plain text), its
sampler settings go through `sampler_from_fields` (the one translation every surface uses), and its
answer is cut by the pipeline (at end-of-text, at `max_tokens`, at a stop string). A request whose
client goes away, streaming or not, is cancelled: the batcher stops denoising it before its next
step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from remask.errors import RemaskError
from remask.pipeline import Pipeline, cut_text
from remask.sampling import SamplerConfig
from remask.sampling.requests import sampler_from_fields
from remask.serve.batcher import Batcher, Failed, Finished, Job, Partial, QueueFull
from remask.serve.responses import DONE, SSE_HEADERS, APIError, Reply, error_body, sse
from remask.serve.schemas import ChatRequest, CommonFields, CompletionRequest

STATIC = Path(__file__).parent / "static"
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection (nobody reads it)

router = APIRouter()


@dataclass
class Served:
    """What the routes serve (the app's `state.served`)."""

    pipe: Pipeline
    batcher: Batcher
    model_name: str
    sampler: SamplerConfig  # the server's default settings; gen_length is the default max_tokens
    max_tokens_limit: int
    created: int = field(default_factory=lambda: int(time.time()))


def served(request: Request) -> Served:
    return request.app.state.served


@router.get("/health")
async def health(request: Request) -> dict:
    s = served(request)
    return {"status": "ok", "model": s.model_name} | s.batcher.load()


@router.get("/v1/models")
async def models(request: Request) -> dict:
    s = served(request)
    return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.created, "owned_by": "remask"}]}


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, req: CompletionRequest) -> Response | dict:
    s = served(request)
    return await answer(request, s, req, encode(s.pipe, req.text(), "prompt"), req.max_tokens, chat=False)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, req: ChatRequest) -> Response | dict:
    s = served(request)
    messages = [{"role": m.role, "content": m.content} for m in req.messages]
    return await answer(request, s, req, encode(s.pipe, messages, "messages"), req.limit(), chat=True)


def encode(pipe: Pipeline, prompt: str | list[dict], param: str) -> list[int]:
    """The prompt's ids, as every surface encodes them (text is plain text); a 400 naming `param`."""
    try:
        return pipe.encode_prompt(prompt)
    except RemaskError as e:
        raise APIError(400, str(e), param=param) from None


def plan(s: Served, req: CommonFields, prompt_len: int, max_tokens: int | None) -> tuple[SamplerConfig, int]:
    """The request's sampler (the server's default with the request's fields) and its token limit."""
    req.check_neutral()
    if req.model is not None and req.model != s.model_name:
        raise APIError(404, f"model {req.model!r} is not served here (this server serves {s.model_name!r})",
                       param="model", code="model_not_found")
    limit = max_tokens if max_tokens is not None else min(s.sampler.gen_length, s.max_tokens_limit)
    if limit > s.max_tokens_limit:
        raise APIError(400, f"max_tokens={limit} exceeds this server's limit of {s.max_tokens_limit}", param="max_tokens")
    try:
        sampler = sampler_from_fields(s.sampler, req.sampler_fields(), max_tokens=limit)
    except RemaskError as e:
        raise APIError(400, str(e), param=getattr(e, "field", None)) from None
    try:
        s.pipe.check_context(prompt_len, sampler.gen_length)
    except RemaskError as e:
        raise APIError(400, f"{e} (max_tokens={limit}: {sampler.gen_length} answer positions)", param="max_tokens",
                       code="context_length_exceeded") from None
    return sampler, limit


async def answer(request: Request, s: Served, req: CommonFields, prompt_ids: list[int], max_tokens: int | None, *,
                 chat: bool) -> Response | dict:
    """Queue the request's job and answer with its completion, or stream it."""
    sampler, limit = plan(s, req, len(prompt_ids), max_tokens)
    text = AnswerText(s.pipe, limit, req.stops())
    job = Job(prompt_ids, sampler, req.seed, stream_steps=req.stream, loop=asyncio.get_running_loop())
    try:
        s.batcher.submit(job)
    except QueueFull:
        raise APIError(503, "the server is at capacity; retry shortly", kind="server_error", code="overloaded",
                       headers={"Retry-After": "1"}) from None
    reply = Reply(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", s.model_name, chat, len(prompt_ids))
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        events = stream(job, reply, text, steps=req.remask_stream == "steps", usage=usage)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    event = await outcome(request, job)
    if event is None:
        return Response(status_code=CLIENT_GONE)
    if isinstance(event, Failed):
        raise APIError(event.status, event.message, kind="invalid_request_error" if event.status < 500 else "server_error")
    return reply.completion(*text.final(event))


async def outcome(request: Request, job: Job) -> Finished | Failed | None:
    """A non-streaming job's one event, or None when its client disconnected first. The job is
    cancelled whenever this returns or is cancelled before the answer came."""
    gone = asyncio.ensure_future(disconnected(request))
    done = asyncio.ensure_future(job.events.get())
    try:
        await asyncio.wait((gone, done), return_when=asyncio.FIRST_COMPLETED)
        return done.result() if done.done() else None
    finally:
        job.cancel()
        gone.cancel()
        done.cancel()


async def disconnected(request: Request) -> None:
    """Return once the client has closed its connection (the body has been read: what comes next
    is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def stream(job: Job, reply: Reply, text: AnswerText, *, steps: bool, usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events: text deltas as positions settle (`steps`: every step's partial answer
    too), the finishing chunk, the usage (`usage`), [DONE]. Leaving early cancels the job."""
    try:
        while True:
            event = await job.events.get()
            if isinstance(event, Failed):
                yield sse(error_body(event.message, "server_error"))
                return
            if isinstance(event, Partial):
                delta, stopped = text.advance(event)
                extra = {"remask": {"step": event.step, "tokens": text.positions(event),
                                    "reveal_step": event.reveal_step}} if steps else None
                if delta or extra:
                    yield reply.chunk(delta, extra=extra)
                if stopped:  # a stop string is settled: the answer is complete
                    job.cancel()
                    yield reply.chunk("", "stop")
                    break
                continue
            whole, reason, tokens = text.final(event)
            if rest := text.rest(whole):
                yield reply.chunk(rest)
            yield reply.chunk("", reason)
            if usage:
                yield reply.usage_chunk(tokens)
            break
        yield DONE
    finally:
        job.cancel()  # a client that went away stops its work


@dataclass
class AnswerText:
    """One answer's text, cut by the pipeline at end-of-text, at `limit` tokens and at a stop
    string: whole (`final`), or as a stream's deltas (`advance`, then `rest`). A stream holds back
    the last characters that might begin a stop string until they cannot."""

    pipe: Pipeline
    limit: int  # max_tokens (the sampler's answer positions are whole blocks, possibly more)
    stops: list[str]
    sent: str = ""  # the text streamed so far

    @property
    def hold(self) -> int:
        return max((len(s) for s in self.stops), default=1) - 1

    def final(self, done: Finished) -> tuple[str, str, int]:
        """(text, finish_reason, completion tokens: up to the end-of-text, not counting it)."""
        gen = self.pipe.answer(done.ids[:self.limit], done.reveal_step[:self.limit], stops=self.stops)
        at_end = bool(gen.ids) and gen.ids[-1] in self.pipe.stop_ids()
        return gen.text, "stop" if gen.ended else "length", len(gen.ids) - at_end

    def advance(self, partial: Partial) -> tuple[str, bool]:
        """(text to send now, whether a settled stop string completed the answer) after a step:
        the answer's text before its first still-masked position, less what may begin a stop string."""
        ids = partial.ids[:self.limit]
        mask = self.pipe.tokenizer.mask_id
        settled = self.pipe.answer(ids[:next((i for i, t in enumerate(ids) if t == mask), len(ids))]).text
        cut, stopped = cut_text(settled, self.stops)
        ready = cut if stopped else cut[:max(len(self.sent), len(cut) - self.hold)]
        delta = ready[len(self.sent):]
        if len(ready) > len(self.sent):
            self.sent = ready
        return delta, stopped

    def rest(self, whole: str) -> str:
        """What the stream has not yet sent of the final text."""
        return whole[len(self.sent):] if whole.startswith(self.sent) else ""

    def positions(self, partial: Partial) -> list[str | None]:
        """Each answer position's text (None while masked, "" from the end-of-text on)."""
        stops, mask = set(self.pipe.stop_ids()), self.pipe.tokenizer.mask_id
        out, ended = [], False
        for t, r in zip(partial.ids, partial.reveal_step):
            ended = ended or (r >= 0 and t in stops)
            out.append("" if ended else None if t == mask else self.pipe.tokenizer.decode([t]))
        return out
