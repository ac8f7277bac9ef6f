"""Request settings -> `SamplerConfig`: the one translation every surface uses.

A surface hands over what its user wrote: typed values (an OpenAI JSON body's extra fields, lm-eval's
parsed model arguments) or text (`KEY=VALUE` words from chat's `/set`, a benchmark's method string,
lm-eval's `gen_kwargs` strings). The CLI's options are the `SamplerConfig` fields themselves (tyro
builds the config), so every surface names a setting the same way and a bad value gets the same
message (`SamplerConfig`'s own checks); an unknown name is `unknown sampler setting 'x'` everywhere.
An answer limit (`max_tokens`, `max_gen_toks`) becomes whole blocks of answer positions here too.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from remask.errors import ConfigError
from remask.sampling.config import SamplerConfig

SETTINGS = tuple(f.name for f in dataclasses.fields(SamplerConfig))
_HINTS = typing.get_type_hints(SamplerConfig)


def check_names(names: Iterable[str], *, allowed: Iterable[str] = SETTINGS) -> None:
    """ConfigError naming the first name that is not a sampler setting (of those `allowed`)."""
    allowed = tuple(allowed)
    for name in names:
        if name not in allowed:
            raise ConfigError(f"unknown sampler setting {name!r} (known: {', '.join(sorted(allowed))})", field=None)


def answer_positions(max_tokens: int, block_length: int) -> int:
    """The answer positions for a limit of `max_tokens`: whole blocks of `block_length` (the
    sampler reveals block by block; the answer still ends where the model puts end-of-text)."""
    if max_tokens < 1:
        raise ConfigError(f"must be at least 1, got {max_tokens}", field="max_tokens")
    return math.ceil(max_tokens / block_length) * block_length


def sampler_from_fields(base: SamplerConfig, fields: Mapping[str, Any], *, max_tokens: int | None = None,
                        allowed: Iterable[str] = SETTINGS) -> SamplerConfig:
    """`base` with `fields` (typed values under `SamplerConfig` names; None keeps the base's) applied.

    With `max_tokens`, gen_length becomes that limit in whole blocks (block_length: the one given,
    else the base's, at most max_tokens) and steps, unless given, one per position."""
    check_names(fields, allowed=allowed)
    given = {k: v for k, v in fields.items() if v is not None}
    if max_tokens is not None:
        block = given.get("block_length", min(base.effective_block_length, max_tokens))
        if not isinstance(block, int) or isinstance(block, bool):
            raise ConfigError(f"must be an integer, got {block!r}", field="block_length", owner=SamplerConfig)
        if block < 1:  # SamplerConfig's own wording; checked here, before it divides max_tokens
            raise ConfigError(f"must be > 0, got {block!r}", field="block_length", owner=SamplerConfig)
        gen_length = answer_positions(max_tokens, block)
        given = {"steps": gen_length} | given | {"gen_length": gen_length, "block_length": block}
    return base.replace(**given)


def parse_value(name: str, text: str) -> Any:
    """A `KEY=VALUE` word's value as its field's type (none/null -> None where the field allows it)."""
    check_names([name])
    tp = _HINTS[name]
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if text.lower() in ("none", "null") and type(None) in options:
        return None
    if bool in options:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ConfigError(f"takes true or false, got {text!r}", field=name, owner=SamplerConfig)
        return text.lower() in ("true", "1", "yes", "on")
    for kind, word in ((int, "an integer"), (float, "a number")):
        if kind in options:
            try:
                return kind(text)
            except ValueError:
                raise ConfigError(f"takes {word}, got {text!r}", field=name, owner=SamplerConfig) from None
    return text


def parse_settings(words: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` words (chat's `/set`, a benchmark's method string split at commas) as typed fields."""
    out = {}
    for word in words:
        key, sep, text = word.partition("=")
        if not sep:
            raise ConfigError(f"expected KEY=VALUE with KEY a sampler setting, got {word!r}")
        out[key] = parse_value(key, text)
    return out


def sampler_from_words(base: SamplerConfig, words: Iterable[str]) -> SamplerConfig:
    """`base` with `KEY=VALUE` changes (`KEY=none` sets a field that allows it to None)."""
    return base.replace(**parse_settings(words))
