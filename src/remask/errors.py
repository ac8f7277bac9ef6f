"""Errors that mean "bad input": the CLI prints them as one line and exits with code 2."""


class RemaskError(ValueError):
    """The user's input (a file, a directory, an option) is invalid. The message names it."""
