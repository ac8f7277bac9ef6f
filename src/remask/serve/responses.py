"""What the server sends: OpenAI's response objects, server-sent-event chunks and error object.

Every error, whatever raised it (a bad body, an unknown route, a wrong method, a full queue, an
internal failure), has OpenAI's body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class APIError(Exception):
    """An answer that is an error: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = status, message, kind, param, code, headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), status_code=self.status,
                            headers=self.headers)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(body: dict) -> bytes:
    """One server-sent event carrying `body` as JSON."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Reply:
    """The objects of one answer: a completion (`chat`: a chat completion) or its stream's chunks."""

    ident: str
    model: str
    chat: bool
    prompt_tokens: int
    started: bool = field(default=False)  # a chunk was sent (a chat stream's first delta carries the role)

    def completion(self, text: str, reason: str, completion_tokens: int) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason} if self.chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        return {"id": self.ident, "object": "chat.completion" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": [choice],
                "usage": usage(self.prompt_tokens, completion_tokens)}

    def chunk(self, delta: str, reason: str | None = None, extra: dict | None = None) -> bytes:
        """A stream chunk adding `delta` to the text (`reason`: the last one); `extra` joins the body."""
        if self.chat:
            content = {"role": "assistant", "content": delta} if not self.started else {"content": delta}
            choice = {"index": 0, "delta": content, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}
        self.started = True
        return sse(self._chunk_body([choice]) | (extra or {}))

    def usage_chunk(self, completion_tokens: int) -> bytes:
        """The stream's last chunk under `stream_options.include_usage`: no choices, the usage."""
        return sse(self._chunk_body([]) | {"usage": usage(self.prompt_tokens, completion_tokens)})

    def _chunk_body(self, choices: list[dict]) -> dict:
        return {"id": self.ident, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": choices}
