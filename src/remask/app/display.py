"""Terminal view of the reverse process: masked positions as dim blocks, each revealed token
coloured by the step at which it was revealed (early = blue/cool, late = red/warm), as in the
LLaDA paper's sampling figure."""

from __future__ import annotations

import shutil
import sys
import unicodedata
from typing import TextIO

from remask.sampling import SamplerConfig, StepInfo
from remask.tokenizer import Tokenizer

MASK_GLYPH = "░"
RESET = "\x1b[0m"


def display_width(text: str) -> int:
    """Terminal columns of plain text (CJK characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def step_colour(step: int, total: int) -> str:
    """A 256-colour foreground escape on a blue -> green -> yellow -> red ramp."""
    ramp = [33, 39, 45, 50, 48, 82, 118, 154, 190, 226, 220, 214, 208, 202, 196]
    index = 0 if total <= 1 else round(step / (total - 1) * (len(ramp) - 1))
    return f"\x1b[38;5;{ramp[index]}m"


def render(pieces: list[str | None], steps: list[int], total_steps: int, *, colour: bool) -> str:
    """Join answer tokens; None marks a still-masked position."""
    out = []
    for text, step in zip(pieces, steps):
        if text is None:
            out.append(f"\x1b[2m{MASK_GLYPH}{RESET}" if colour else MASK_GLYPH)
        else:
            out.append(f"{step_colour(step, total_steps)}{text}{RESET}" if colour else text)
    return "".join(out)


class DenoisingView:
    """An `on_step` callback that redraws the answer after every step (in place on a terminal;
    on a pipe it prints only the final state). Positions after the answer's end-of-text are
    not shown."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: list[int], sampler: SamplerConfig, *,
                 stream: TextIO | None = None, colour: bool | None = None) -> None:
        self.tok, self.stops, self.sampler = tokenizer, set(stop_ids), sampler
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.colour = self.live if colour is None else colour
        self.drawn_lines = 0

    def pieces(self, ids: list[int], steps: list[int]) -> list[str | None]:
        out: list[str | None] = []
        ended = False
        for tid, step in zip(ids, steps):
            if ended or tid in self.stops:  # a revealed end-of-text, or the anchor (given: step -1)
                ended = True
                out.append("")  # the end-of-text and whatever follows it are not shown
            elif step < 0:
                out.append(None)
            else:
                out.append(self.tok.decode([tid], skip_special=True))
        return out

    def __call__(self, info: StepInfo) -> None:
        if not (self.live or info.done):
            return
        ids, steps = info.answer(0)
        pieces = self.pieces(ids, steps)
        if self.live and self.drawn_lines:
            self.stream.write(f"\x1b[{self.drawn_lines}F\x1b[J")  # back to the frame's first line, clear below
        self.stream.write(render(pieces, steps, self.sampler.steps, colour=self.colour) + "\n")
        self.stream.flush()
        width = max(shutil.get_terminal_size().columns, 1)
        plain = render(pieces, steps, self.sampler.steps, colour=False)
        self.drawn_lines = sum(max(1, -(-display_width(line) // width)) for line in plain.split("\n"))

    def legend(self) -> str:
        """A one-line key of the colour ramp."""
        total = self.sampler.steps
        if not self.colour:
            return f"(colour shows the step at which each token was revealed; {MASK_GLYPH} = still masked)"
        marks = sorted({0, total // 4, total // 2, 3 * total // 4, total - 1})
        parts = [f"{step_colour(s, total)}■{RESET} step {s + 1}" for s in marks]
        return "revealed at: " + "  ".join(parts) + f"   {MASK_GLYPH} still masked"
