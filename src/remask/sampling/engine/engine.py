"""The engine: rows that come and go, each step one plan (scheduler), its passes (runner) and
every row's reveal; and the batch functions over it (`generate_fast`, `fill_masks_fast`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from remask.diffusion.block import answer_offsets
from remask.errors import RemaskError, check_fits
from remask.sampling.config import SamplerConfig
from remask.sampling.engine.reveal import reveal_rows
from remask.sampling.engine.rows import Row, RowResult, SamplingStats
from remask.sampling.engine.runner import PASSES, Runner
from remask.sampling.engine.scheduler import plan
from remask.sampling.generate import StepInfo, anchor_id, append_masks, check_prompt
from remask.sampling.schedule import block_slices


def block_grid(prompt_len: int, block_length: int) -> int:
    """The first rotary position of a block model's row: the answer starts on a block boundary."""
    return int(answer_offsets(torch.tensor(prompt_len), block_length))


class Engine:
    """Denoises many rows at once; rows join with `add` and leave when finished (see the package doc)."""

    def __init__(self, model: Callable, *, mask_id: int, vocab_size: int, eos_ids: Sequence[int] = (),
                 max_length: int | None = None) -> None:
        """`max_length`: the longest sequence a row may reach (default: the model's
        config.max_sequence_length when it has one; None: unchecked)."""
        self.model, self.mask_id, self.vocab_size = model, mask_id, vocab_size
        self.eos_ids = list(eos_ids)
        config = getattr(model, "config", None)
        self.max_length = max_length if max_length is not None else getattr(config, "max_sequence_length", None)
        self.block_length = config.block_length if getattr(config, "attention", "full") == "block" else None
        self.rows: list[Row] = []
        self.stats = SamplingStats()
        self.runner = Runner(model, mask_id=mask_id, stats=self.stats)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def active(self) -> int:
        """Rows still being denoised."""
        return len(self.rows)

    def check_length(self, prompt_tokens: int, new_tokens: int) -> None:
        """RemaskError unless a row of `prompt_tokens` + `new_tokens` fits the model's context."""
        check_fits(prompt_tokens, new_tokens, self.max_length)

    def add(self, prompt: Sequence[int] | Tensor, sampler: SamplerConfig, *, generator: torch.Generator | None = None,
            on_step: Callable[[StepInfo], None] | None = None) -> Row:
        """A new row: its prompt ids (no padding) and its own settings; it starts at the next step.
        RemaskError when prompt + sampler.gen_length exceeds the context."""
        if self.block_length is not None:
            return self._add_blocks(prompt, sampler, generator, on_step)
        if sampler.cfg_scale and sampler.cache != "none":
            raise RemaskError("classifier-free guidance needs two caches; use cfg_scale with cache none")
        prompt = torch.as_tensor(prompt, dtype=torch.long, device=self.device)
        self.check_length(prompt.numel(), sampler.gen_length)
        check_prompt(prompt[None], None, self.mask_id)
        seq = append_masks(prompt[None], None, sampler.gen_length, self.mask_id, anchor_id(sampler, self.eos_ids))[0][0]
        return self._admit(Row(seq, prompt.numel(), sampler, generator, self._stop_ids(), on_step))

    def _add_blocks(self, prompt: Sequence[int] | Tensor, sampler: SamplerConfig, generator: torch.Generator | None,
                    on_step: Callable[[StepInfo], None] | None) -> Row:
        """A block model's row: the answer's blocks of the model's block length on the model's grid
        (the answer starts on a block boundary; the last block cut at sampler.gen_length, a limit),
        decoded left to right with the exact cache (runner's `block` pass; sampler.block_length and
        cache do not apply). Each block takes its share of sampler.steps (steps per gen_length
        positions, at least one per block); the row ends where an end-of-text is revealed with
        everything before it."""
        L = self.block_length
        if sampler.cfg_scale or sampler.anchor_eos:
            raise RemaskError("a block model takes no classifier-free guidance and no end-of-text anchor")
        prompt = torch.as_tensor(prompt, dtype=torch.long, device=self.device)
        grid = block_grid(prompt.numel(), L)
        self.check_length(prompt.numel() + grid, sampler.gen_length)
        check_prompt(prompt[None], None, self.mask_id)
        seq = torch.cat([prompt, prompt.new_full((sampler.gen_length,), self.mask_id)])
        row = Row(seq, prompt.numel(), sampler, generator, self._stop_ids(), on_step, grid=grid)
        row.steps_per_block = min(L, max(1, round(sampler.steps * L / sampler.gen_length)))
        return self._admit(row, [slice(a, min(a + L, seq.numel())) for a in range(prompt.numel(), seq.numel(), L)])

    def add_infill(self, ids: Sequence[int] | Tensor, region: slice, sampler: SamplerConfig, *,
                   generator: torch.Generator | None = None,
                   on_step: Callable[[StepInfo], None] | None = None) -> Row:
        """A row that reveals the masks of `ids` inside `region` and nothing else (`fill_masks`
        with this engine's savings, caches and parallel rules): text on either side and masks
        outside the region are context that never changes. The region is cut into blocks of
        sampler.block_length (one block when None) taking sampler.steps between them;
        sampler.gen_length must be the region's length. The row ends when the region is revealed
        (an end-of-text inside it is a token like any other, as in `fill_masks`)."""
        seq = torch.as_tensor(ids, dtype=torch.long, device=self.device).clone()
        self.check_length(seq.numel(), 0)
        if seq.dim() != 1 or not 0 <= region.start < region.stop <= seq.numel() or region.step not in (None, 1):
            raise RemaskError(f"region {region} is not a non-empty range of the {seq.numel()} positions")
        if sampler.gen_length != region.stop - region.start:
            raise RemaskError(f"sampler.gen_length ({sampler.gen_length}) must be the region's length "
                              f"({region.stop - region.start})")
        if sampler.cfg_scale or sampler.anchor_eos:
            raise RemaskError("infilling takes no classifier-free guidance and no end-of-text anchor")
        row = Row(seq, region.start, sampler.replace(eos="allow", stop_at_eos=False), generator, self._stop_ids(), on_step)
        return self._admit(row)

    def _stop_ids(self) -> Tensor:
        return torch.tensor(self.eos_ids, dtype=torch.long, device=self.device)

    def _admit(self, row: Row, blocks: list[slice] | None = None) -> Row:
        row.reveal_step = torch.full_like(row.seq, -1)
        row.blocks = blocks or block_slices(row.prompt_len, row.sampler.gen_length, row.sampler.effective_block_length)
        row.steps_per_block = row.steps_per_block or row.sampler.steps_per_block
        row.next_block(0, self.mask_id)  # an infill region may start with text
        row.finished = row.block >= len(row.blocks)
        if not row.finished:
            self.rows.append(row)
        return row

    def step(self) -> list[RowResult]:
        """One reverse step of every active row; returns the results of those that finished with it."""
        if not self.rows:
            return []
        logits = self.runner.run(plan(self.rows, list(PASSES)))  # id(row) -> (N, V') its block's logits
        finished = []
        steps = reveal_rows(self.rows, logits, mask_id=self.mask_id, vocab_size=self.vocab_size)
        for row, step in zip(self.rows, steps):
            row.passes += 1
            self.stats.steps = max(self.stats.steps, step + 1)
            if row.finished:
                finished.append(row.result())
        self._keep([r for r in self.rows if not r.finished])
        return finished

    def remove(self, row: Row) -> None:
        """Drop a row (its request was cancelled); it costs nothing from the next step on."""
        self._keep([r for r in self.rows if r is not row])

    def _keep(self, rows: list[Row]) -> None:
        self.rows = rows
        if not rows:  # the batched caches would outlive every row they were built for
            self.runner.release()

    def run(self) -> list[RowResult]:
        """Step until every row has finished; their results, finished ones first in the order
        they finished (a row added already finished has no result here: read `row.result()`)."""
        results = []
        while self.rows:
            results += self.step()
        return results


@torch.no_grad()
def fill_masks_fast(model: Callable, x: Tensor, region: slice, sampler: SamplerConfig, *, mask_id: int,
                    vocab_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, SamplingStats]:
    """`fill_masks` on the fast engine: reveal the masks of each row of `x` (B, L) inside `region`
    (sampler.gen_length long), the rest context (`Engine.add_infill`); rows share `generator`.
    With no cache and the schedule at temperature 0 it gives `fill_masks`'s tokens."""
    engine = Engine(model, mask_id=mask_id, vocab_size=vocab_size)
    rows = [engine.add_infill(x[b], region, sampler, generator=generator) for b in range(x.shape[0])]
    engine.run()
    return torch.stack([row.seq for row in rows]), engine.stats


@torch.no_grad()
def generate_fast(model: Callable, prompt: Tensor, sampler: SamplerConfig, *, mask_id: int, vocab_size: int,
                  attention_mask: Tensor | None = None, eos_ids: Sequence[int] = (),
                  generator: torch.Generator | None = None,
                  on_step: Callable[[StepInfo], None] | None = None) -> tuple[Tensor, SamplingStats]:
    """Fill sampler.gen_length masked positions after each row of `prompt` (B, P), left-padded
    where `attention_mask` is 0: (B, P + gen_length) and the cost. Positions after a row's
    end-of-text may keep the mask id. Rows share `generator` (one row: as the reference does);
    `on_step` sees each row's steps (a (1, L) StepInfo; with one row, the batch's)."""
    check_prompt(prompt, attention_mask, mask_id)
    engine = Engine(model, mask_id=mask_id, vocab_size=vocab_size, eos_ids=eos_ids)
    rows = []
    for b in range(prompt.shape[0]):
        keep = slice(None) if attention_mask is None else attention_mask[b].bool()
        rows.append(engine.add(prompt[b][keep], sampler, generator=generator, on_step=on_step))
    engine.run()
    P = prompt.shape[1]
    out = torch.cat([prompt, prompt.new_full((prompt.shape[0], sampler.gen_length), mask_id)], dim=1)
    for b, row in enumerate(rows):
        out[b, P:] = row.seq[row.prompt_len:]
    return out, engine.stats
