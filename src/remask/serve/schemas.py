"""Request bodies of the OpenAI endpoints, with strict JSON types.

OpenAI's fields, and remask's sampler settings as extra fields under their `SamplerConfig` names
(all but `gen_length`, set from `max_tokens`, `temperature`, OpenAI's own, and `stop_at_eos`: a
served answer ends at its end-of-text). Types are strict: `"8"` is not a number, `true` is not a
count, `"yes"` is not a boolean (each a 400). Unknown fields are a 400; so is a value other than
the neutral one for an OpenAI option remask does not implement (never silently ignored).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from remask.sampling import SamplerConfig
from remask.serve.responses import APIError

STRICT = ConfigDict(extra="forbid", strict=True)
NOT_BODY_FIELDS = ("gen_length", "temperature", "stop_at_eos")
MAX_STOPS = 4


def body_type(hint: Any) -> type:
    """A sampler field's JSON type; choices arrive as strings and SamplerConfig checks them."""
    return next((t for t in (bool, int, float) if hint is t or t in typing.get_args(hint)), str)


_HINTS = typing.get_type_hints(SamplerConfig)
SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(SamplerConfig) if f.name not in NOT_BODY_FIELDS)
SamplerFields = create_model(
    "SamplerFields", __config__=STRICT,
    __doc__="remask's sampler settings, as extra body fields (None: the server's default).",
    **{name: (body_type(_HINTS[name]) | None, None) for name in SAMPLER_FIELDS},
    remask_stream=(Literal["text", "steps"], "text"))


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class CommonFields(SamplerFields):
    """The OpenAI fields both endpoints take."""

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

    def sampler_fields(self) -> dict[str, Any]:
        """The sampler settings given (None: not given), under `SamplerConfig` names."""
        return {name: getattr(self, name) for name in SAMPLER_FIELDS} | {"temperature": self.temperature}

    def stops(self) -> list[str]:
        """The stop strings: up to 4, none empty (else a 400)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise APIError(400, f"stop must be up to {MAX_STOPS} non-empty strings", param="stop")
        return stops

    def unsupported(self) -> dict[str, tuple[Any, tuple]]:
        """OpenAI options remask does not implement: name -> (value, the neutral values)."""
        return {"n": (self.n, (None, 1)), "top_p": (self.top_p, (None, 1, 1.0)),
                "presence_penalty": (self.presence_penalty, (None, 0, 0.0)),
                "frequency_penalty": (self.frequency_penalty, (None, 0, 0.0)),
                "logit_bias": (self.logit_bias, (None, {})), "logprobs": (self.logprobs, (None, False)),
                "top_logprobs": (self.top_logprobs, (None, 0))}

    def check_neutral(self) -> None:
        """400 for an unsupported option whose value is not its neutral one."""
        for name, (value, neutral) in self.unsupported().items():
            if value not in neutral:
                raise APIError(400, f"{name}={value!r} is not supported by remask", param=name)


class CompletionRequest(CommonFields):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> dict[str, tuple[Any, tuple]]:
        return super().unsupported() | {"echo": (self.echo, (False,)), "suffix": (self.suffix, (None, "")),
                                        "best_of": (self.best_of, (None, 1))}

    def text(self) -> str:
        """The one prompt (a batch of prompts is a 400)."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt must be one string (batches of prompts are not supported)", param="prompt")
        return prompts[0]


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(CommonFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def limit(self) -> int | None:
        """The answer's token limit asked for (max_completion_tokens, else max_tokens; None: the default)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
