"""What a command of `remask` is: the `Command` record the registry (`commands.COMMANDS`) holds,
and the tyro markers the command signatures use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tyro

# A nested config whose fields become top-level options (`--gen-length`, not `--sampler.gen-length`).
Flat = tyro.conf.arg(name="")
Positional = tyro.conf.Positional


@dataclass(frozen=True)
class Command:
    """A command: `schema` is what tyro parses (a function it calls, or a dataclass handed to
    `run`); `recipe` is the training config class a `--config` file holds, if any; a `raw`
    command gets its arguments unparsed."""

    schema: Callable[..., Any] | type
    run: Callable[[Any], None] | None = None
    recipe: type | None = None
    raw: bool = False

    @property
    def summary(self) -> str:
        return (self.schema.__doc__ or "").strip().splitlines()[0]
