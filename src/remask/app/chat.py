"""Multi-turn chat: a session that keeps the dialogue (and forgets its oldest exchanges to fit the
context), and the terminal loop over it, with commands to change the sampler settings. Ctrl-C
stops the answer being denoised, not the chat. Both run without a terminal: tests drive them with
strings."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from remask.app.display import DenoisingView
from remask.errors import RemaskError
from remask.pipeline import Generation, Pipeline
from remask.sampling import SamplerConfig, StepInfo
from remask.sampling.requests import sampler_from_words
from remask.tokenizer import check_text, decode_utf8


@dataclass
class ChatSession:
    pipeline: Pipeline
    sampler: SamplerConfig
    seed: int = 0
    history: list[dict] = field(default_factory=list)
    turns: int = 0

    def fit(self, history: list[dict]) -> tuple[list[dict], list[int]]:
        """The longest suffix of whole exchanges of `history` whose prompt fits the context with
        gen_length answer positions, and its ids (each candidate encoded once)."""
        limit = self.pipeline.model.config.max_sequence_length - self.sampler.gen_length
        ids = self.pipeline.encode_prompt(history)
        while len(ids) > limit and len(history) > 1:
            history = history[2:]  # forget the oldest exchange
            ids = self.pipeline.encode_prompt(history)
        if len(ids) > limit:
            raise RemaskError(f"this message does not fit the model's context with gen_length {self.sampler.gen_length}")
        return history, ids

    def ask(self, message: str, on_step: Callable[[StepInfo], None] | None = None) -> Generation:
        """Answer one user message; a bad message raises RemaskError and leaves the dialogue as it was."""
        check_text(message, "chat message")
        history, ids = self.fit([*self.history, {"role": "user", "content": message}])
        result = self.pipeline.generate_ids(ids, self.sampler, seed=self.seed + self.turns, on_step=on_step)
        self.history = [*history, {"role": "assistant", "content": result.text}]
        self.turns += 1
        return result

    def reset(self) -> None:
        self.history = []


HELP = """commands:
  /set KEY=VALUE ...   change sampler settings (e.g. /set temperature=0.5 steps=64 cache=dual)
  /settings            show the sampler settings
  /reset               forget the dialogue
  /help                this list
an empty line or Ctrl-D ends the chat; Ctrl-C stops the answer being written"""


def read_line(stream: BinaryIO) -> str | None:
    """One line of UTF-8 input without its newline; None at end of input. Invalid UTF-8 raises
    RemaskError (the line is consumed, so the conversation can go on)."""
    data = stream.readline()
    if not data:
        return None
    return decode_utf8(data, "your message").rstrip("\r\n")


def terminal_chat(session: ChatSession, *, stdin: BinaryIO | None = None, stdout: TextIO | None = None,
                  stderr: TextIO | None = None) -> None:
    """Read messages until an empty line or end of input; commands start with / (see HELP). Each
    answer unmasks live on a terminal. A message that cannot be answered is reported and skipped;
    Ctrl-C while an answer is denoised drops that answer and the chat goes on."""
    stdin = stdin or sys.stdin.buffer
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    print("remask chat -- an empty line or Ctrl-D ends; /help lists the commands.", file=stderr)
    while True:
        stdout.write("you> ")
        stdout.flush()
        try:
            line = read_line(stdin)
        except RemaskError as e:
            print(f"error: {e}", file=stderr)
            continue
        except KeyboardInterrupt:
            print("\n(an empty line or Ctrl-D ends the chat)", file=stderr)
            continue
        if line is None or not line.strip():
            return
        words = line.split()
        if words[0] in ("/reset", "/help", "/settings", "/set"):
            command(session, words, stderr)
            continue
        view = DenoisingView(session.pipeline.tokenizer, session.pipeline.stop_ids(), session.sampler, stream=stdout)
        try:
            session.ask(line.strip(), on_step=view)
        except RemaskError as e:
            print(f"error: {e}", file=stderr)
        except KeyboardInterrupt:
            print("\n(stopped; the answer was dropped)", file=stderr)


def command(session: ChatSession, words: list[str], out: TextIO) -> None:
    name = words[0]
    if name == "/reset":
        session.reset()
        print("(the dialogue is forgotten)", file=out)
    elif name == "/help":
        print(HELP, file=out)
    elif name == "/settings":
        print(" ".join(f"{k}={v}" for k, v in session.sampler.to_dict().items()), file=out)
    else:
        try:
            session.sampler = sampler_from_words(session.sampler, words[1:])
        except RemaskError as e:
            print(f"error: {e}", file=out)
            return
        print(" ".join(f"{k}={v}" for k, v in session.sampler.to_dict().items()), file=out)
