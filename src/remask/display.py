"""Terminal view of the reverse process: masked positions as dim blocks, each revealed token
coloured by the step at which it was revealed (early = blue/cool, late = red/warm), as in the
LLaDA paper's sampling figure."""

from __future__ import annotations

import shutil
import sys
import unicodedata
from typing import TextIO

from remask.sampling import SamplerConfig, StepInfo

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
    on a pipe it prints only the final state)."""

    def __init__(self, pipeline, cfg: SamplerConfig, *, prompt_len: int, stream: TextIO | None = None,
                 colour: bool | None = None) -> None:
        self.tok = pipeline.tokenizer
        self.stops = set(pipeline.stop_ids())
        self.cfg, self.P = cfg, prompt_len
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.colour = self.live if colour is None else colour
        self.steps = [-1] * cfg.gen_length
        self.drawn_lines = 0

    def pieces(self, ids: list[int]) -> list[str | None]:
        out: list[str | None] = []
        ended = False
        for tid, step in zip(ids, self.steps):
            if step < 0:
                out.append(None)
            elif tid in self.stops or ended:
                ended = ended or tid in self.stops
                out.append("")  # end-of-text padding is not shown
            else:
                out.append(self.tok.decode([tid], skip_special=True))
        return out

    def frame(self, ids: list[int]) -> str:
        return render(self.pieces(ids), self.steps, self.cfg.steps, colour=self.colour)

    def __call__(self, info: StepInfo) -> None:
        for pos in info.revealed[0, self.P:].nonzero().flatten().tolist():
            self.steps[pos] = info.step
        ids = info.x[0, self.P:].tolist()
        final = info.step == self.cfg.steps - 1
        if not (self.live or final):
            return
        text = self.frame(ids)
        if self.live and self.drawn_lines:
            self.stream.write(f"\x1b[{self.drawn_lines}F\x1b[J")  # back to the frame's first line, clear below
        self.stream.write(text + "\n")
        self.stream.flush()
        width = max(shutil.get_terminal_size().columns, 1)
        self.drawn_lines = sum(max(1, -(-display_width(line) // width)) for line in self.plain(ids).split("\n"))

    def plain(self, ids: list[int]) -> str:
        return render(self.pieces(ids), self.steps, self.cfg.steps, colour=False)

    def legend(self) -> str:
        """A one-line key of the colour ramp."""
        total = self.cfg.steps
        if not self.colour:
            return f"(colour shows the step at which each token was revealed; {MASK_GLYPH} = still masked)"
        marks = sorted({0, total // 4, total // 2, 3 * total // 4, total - 1})
        parts = [f"{step_colour(s, total)}■{RESET} step {s + 1}" for s in marks]
        return "revealed at: " + "  ".join(parts) + f"   {MASK_GLYPH} still masked"
