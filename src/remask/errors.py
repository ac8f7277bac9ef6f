"""Errors that mean "bad input": the CLI prints them as one line and exits with code 2.

`RemaskError` is deliberately not a `ValueError`: argument parsers and other libraries catch
`ValueError` and re-render it, and our messages must reach the user whole.
"""

from __future__ import annotations


class RemaskError(Exception):
    """The user's input (a file, a directory, an option) is invalid. The message names it."""


class ConfigError(RemaskError):
    """A configuration value is invalid. `field` names it and `owner` is its config class, so a
    front end can show its own name for the field (the CLI shows the option, e.g. `--lr`)."""

    def __init__(self, detail: str, *, field: str | None = None, owner: type | None = None) -> None:
        self.detail, self.field, self.owner = detail, field, owner
        super().__init__(f"{field} {detail}" if field else detail)


def check_fits(prompt_tokens: int, new_tokens: int, context: int | None, *, what: str = "prompt") -> None:
    """RemaskError unless `prompt_tokens + new_tokens` fit a model's context (None: unchecked).
    The one wording of the context check, whichever surface (CLI, eval, serve, engine) meets it."""
    if context is not None and prompt_tokens + new_tokens > context:
        raise RemaskError(f"{what} ({prompt_tokens} tokens) + {new_tokens} new tokens exceeds the "
                          f"model's context of {context} tokens")
