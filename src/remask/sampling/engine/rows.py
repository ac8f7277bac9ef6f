"""A row of the fast engine (one answer being denoised), what it becomes when it finishes, and the
engine's running cost."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from remask.model import KV
from remask.sampling.config import SamplerConfig
from remask.sampling.generate import StepInfo
from remask.sampling.schedule import num_transfer_tokens


@dataclass
class SamplingStats:
    forward_passes: int = 0  # model calls
    query_tokens: int = 0  # positions run through the model, summed over calls and rows
    steps: int = 0  # reverse steps taken (the most by any row)


@dataclass(frozen=True)
class RowResult:
    """A finished row: the handle `Engine.add` returned, the whole sequence (prompt + answer
    positions), and per position the global step that revealed it (-1: given, never revealed)."""

    row: Row
    seq: list[int]
    reveal_step: list[int]
    prompt_len: int
    ended: bool  # finished at an end-of-text

    @property
    def answer(self) -> list[int]:
        return self.seq[self.prompt_len:]

    @property
    def answer_reveal_step(self) -> list[int]:
        return self.reveal_step[self.prompt_len:]


@dataclass(eq=False)
class Row:
    """One answer being denoised. Outside the engine it is a handle: pass it to `Engine.remove`,
    read what it became from the `RowResult` that `step` or `run` returns for it.

    Inside, the passes read and write its cache (see `runner`): `cache` holds the keys/values of
    the whole sequence from the full pass that started the current block (`fresh`), `past` the part
    of it that the block's cached passes reuse (derived once per block, None until then). A block
    model's row (`grid` set) has its exact keys/values in the block pass's batched buffer
    (`runner.Slab`); `cached_upto` says how far they reach (its first pass leaves its prompt's in
    `cache` until the buffer takes them)."""

    seq: Tensor  # (L,) prompt + answer positions
    prompt_len: int
    sampler: SamplerConfig
    generator: torch.Generator | None
    stop: Tensor  # end-of-text ids
    on_step: Callable[[StepInfo], None] | None = None
    reveal_step: Tensor = None  # (L,)
    blocks: list[slice] = field(default_factory=list)
    block: int = 0
    step_in_block: int = 0
    schedule: Tensor | None = None  # (S,) reveals per step of the current block
    cache: KV | None = None  # (1, ...) keys and values of the whole sequence at the block's start
    past: KV | None = None  # the part of `cache` the current block's cached passes attend to
    fresh: bool = False  # the cache was refreshed for the current block
    grid: int | None = None  # a block model's row: its rotary positions start here (None: another model)
    cached_upto: int = 0  # a block model's row: positions [0, cached_upto) have exact keys/values (runner.Slab)
    steps_per_block: int = 0  # the current block's share of the sampler's steps
    finished: bool = False
    ended: bool = False  # finished at an end-of-text
    passes: int = 0

    @property
    def current(self) -> slice:
        return self.blocks[self.block]

    def result(self) -> RowResult:
        return RowResult(self, self.seq.tolist(), self.reveal_step.tolist(), self.prompt_len, self.ended)

    def start_block(self, mask_id: int) -> None:
        self.schedule = num_transfer_tokens((self.seq[self.current] == mask_id)[None], self.steps_per_block)[0]
        self.step_in_block, self.fresh, self.past = 0, False, None

    def next_block(self, first: int, mask_id: int) -> None:
        """Move to the first block from `first` on that holds a mask and start it; past the last
        block when none does (a block with nothing to reveal costs no step)."""
        self.block = first
        while self.block < len(self.blocks) and not (self.seq[self.current] == mask_id).any():
            self.block += 1
        if self.block < len(self.blocks):
            self.start_block(mask_id)
