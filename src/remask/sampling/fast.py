"""The fast sampler: the reverse process of `generate` with everything that costs nothing in
quality removed, the approximations that buy speed as explicit settings, and rows that come and
go independently.

Lossless (token-identical to `generate` at temperature 0):
- the output head runs only on each row's current block;
- a row whose answer has ended (an end-of-text with everything before it revealed) leaves, and
  so does a row that has revealed everything: finished rows stop costing work.

Approximate, chosen per row in its `SamplerConfig`:
- `cache`: the keys and values of positions outside the current block, computed by a full pass
  when the block starts (that pass is also the block's first step) and reused for the rest of the
  block: `prefix` keeps the prompt and finished blocks and recomputes the block and the masked
  suffix; `dual` keeps the suffix too and recomputes only the block (Fast-dLLM's caches). The
  cached values are stale by what the block has revealed since the refresh.
- `parallel`: how many masked tokens a step reveals -- the linear `schedule` of the reference, or
  every token whose probability passes `threshold`, or the `factor` rule (the largest n with
  (n + 1)(1 - p_n) < factor, p sorted descending), or the `entropy` rule (the largest n whose
  summed entropy less its largest stays within `entropy_bound`); always at least one, and enough
  to finish the block within its share of `steps`.

`Engine` holds rows that each have their own prompt, sampler settings, random generator and
progress through their blocks; a row added between steps starts with the next step, and each
step is one or two forward passes over every active row (a full pass for rows that start a block
or use no cache, a cached pass for the others). So a server can batch requests as they arrive,
and a request's answer does not depend on what it is batched with. `generate_fast` runs a
left-padded batch through it. A row may also infill (`add_infill`, `fill_masks_fast`): reveal
the masks of one region of a given text, blocks over the region, the rest context.

The model is a `Transformer` (the `positions` / `past` / `return_kv` / `logits_at` interface of
`remask.model`); logits past `vocab_size` (padded embedding rows) are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from remask.errors import RemaskError, check_fits
from remask.model import KV
from remask.sampling.config import SamplerConfig
from remask.sampling.generate import StepInfo, anchor_id, answers_ended, append_masks, ban_tokens, check_prompt, select_top_k
from remask.sampling.remasking import REMASKING, gumbel_argmax
from remask.sampling.schedule import block_slices, num_transfer_tokens


@dataclass
class SamplingStats:
    forward_passes: int = 0  # model calls
    query_tokens: int = 0  # positions run through the model, summed over calls and rows
    steps: int = 0  # reverse steps taken (the most by any row)


def reveal_counts(score: Tensor, entropy: Tensor, masked: Tensor, sampler: SamplerConfig, at_least: Tensor) -> Tensor:
    """(B,) how many masked positions each row reveals under the parallel rule; `score` is the
    probability of each prediction (B, N), `entropy` its entropy, `at_least` the budget's minimum."""
    n_masked = masked.sum(1)
    if sampler.parallel == "threshold":
        n = ((score >= sampler.threshold) & masked).sum(1)
    elif sampler.parallel == "factor":
        c = score.masked_fill(~masked, -1.0).sort(dim=1, descending=True).values  # (B, N)
        rank = torch.arange(1, c.shape[1] + 1, device=c.device, dtype=c.dtype)
        ok = ((rank + 1) * (1 - c) < sampler.factor) & (c >= 0)
        n = ok.int().cumprod(1).sum(1)  # the leading run of n that satisfy it
    elif sampler.parallel == "entropy":
        h = entropy.masked_fill(~masked, float("inf")).sort(dim=1).values  # ascending
        finite = torch.isfinite(h)
        h0 = torch.where(finite, h, 0)
        ok = (h0.cumsum(1) - h0.cummax(1).values <= sampler.entropy_bound) & finite
        n = ok.int().cumprod(1).sum(1)
    else:
        return at_least
    return torch.minimum(torch.maximum(n, torch.maximum(at_least, torch.ones_like(n))), n_masked)


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
    read what it became from the `RowResult` that `step` or `run` returns for it."""

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
    finished: bool = False
    ended: bool = False  # finished at an end-of-text
    passes: int = 0

    @property
    def current(self) -> slice:
        return self.blocks[self.block]

    def result(self) -> RowResult:
        return RowResult(self, self.seq.tolist(), self.reveal_step.tolist(), self.prompt_len, self.ended)

    def start_block(self, mask_id: int) -> None:
        self.schedule = num_transfer_tokens((self.seq[self.current] == mask_id)[None], self.sampler.steps_per_block)[0]
        self.step_in_block, self.fresh, self.past = 0, False, None

    def next_block(self, first: int, mask_id: int) -> None:
        """Move to the first block from `first` on that holds a mask and start it; past the last
        block when none does (a block with nothing to reveal costs no step)."""
        self.block = first
        while self.block < len(self.blocks) and not (self.seq[self.current] == mask_id).any():
            self.block += 1
        if self.block < len(self.blocks):
            self.start_block(mask_id)


class Engine:
    """Denoises many rows at once; rows join with `add` and leave when finished (see the module doc)."""

    def __init__(self, model: Callable, *, mask_id: int, vocab_size: int, eos_ids: Sequence[int] = (),
                 max_length: int | None = None) -> None:
        """`max_length`: the longest sequence a row may reach (default: the model's
        config.max_sequence_length when it has one; None: unchecked)."""
        self.model, self.mask_id, self.vocab_size = model, mask_id, vocab_size
        self.eos_ids = list(eos_ids)
        config = getattr(model, "config", None)
        self.max_length = max_length if max_length is not None else getattr(config, "max_sequence_length", None)
        self.rows: list[Row] = []
        self.stats = SamplingStats()

    @property
    def device(self) -> torch.device:
        return next(iter(self.model.parameters())).device if hasattr(self.model, "parameters") else torch.device("cpu")

    @property
    def active(self) -> int:
        """Rows still being denoised."""
        return len(self.rows)

    def check_length(self, prompt_tokens: int, new_tokens: int) -> None:
        """RemaskError unless a row of `prompt_tokens` + `new_tokens` fits the model's context."""
        check_fits(prompt_tokens, new_tokens, self.max_length)

    def add(self, prompt: Sequence[int] | Tensor, sampler: SamplerConfig, *, generator: torch.Generator | None = None,
            on_step: Callable[[StepInfo], None] | None = None) -> Row:
        """A new row: its prompt ids (no padding) and its own settings; it starts at the next step."""
        if sampler.cfg_scale and sampler.cache != "none":
            raise RemaskError("classifier-free guidance needs two caches; use cfg_scale with cache none")
        prompt = torch.as_tensor(prompt, dtype=torch.long, device=self.device)
        self.check_length(prompt.numel(), sampler.gen_length)
        check_prompt(prompt[None], None, self.mask_id)
        seq = append_masks(prompt[None], None, sampler.gen_length, self.mask_id, anchor_id(sampler, self.eos_ids))[0][0]
        row = Row(seq, prompt.numel(), sampler, generator, torch.tensor(self.eos_ids, dtype=torch.long,
                                                                         device=self.device), on_step)
        return self._admit(row)

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
        row = Row(seq, region.start, sampler.replace(eos="allow", stop_at_eos=False), generator,
                  torch.tensor(self.eos_ids, dtype=torch.long, device=self.device), on_step)
        return self._admit(row)

    def _admit(self, row: Row) -> Row:
        row.reveal_step = torch.full_like(row.seq, -1)
        row.blocks = block_slices(row.prompt_len, row.sampler.gen_length, row.sampler.effective_block_length)
        row.next_block(0, self.mask_id)  # an infill region may start with text
        row.finished = row.block >= len(row.blocks)
        if not row.finished:
            self.rows.append(row)
        return row

    def step(self) -> list[RowResult]:
        """One reverse step of every active row; returns the results of those that finished with it."""
        if not self.rows:
            return []
        full = [r for r in self.rows if r.sampler.cache == "none" or not r.fresh]
        cached = [r for r in self.rows if r.sampler.cache != "none" and r.fresh]
        logits: dict[int, Tensor] = {}
        if full:
            logits |= self._full_pass(full)
        if cached:
            logits |= self._cached_pass(cached)
        finished = []
        for row in self.rows:
            row.passes += 1
            self._reveal(row, logits[id(row)])
            if row.finished:
                finished.append(row.result())
        self.rows = [r for r in self.rows if not r.finished]
        return finished

    def remove(self, row: Row) -> None:
        """Drop a row (its request was cancelled); it costs nothing from the next step on."""
        self.rows = [r for r in self.rows if r is not row]

    def run(self) -> list[RowResult]:
        """Step until every row has finished; their results, finished ones first in the order
        they finished (a row added already finished has no result here: read `row.result()`)."""
        results = []
        while self.rows:
            results += self.step()
        return results

    # --- the passes ---------------------------------------------------------------------------
    def _full_pass(self, rows: list[Row]) -> dict[int, Tensor]:
        """Whole sequences, left-padded; logits of each row's block; keys/values kept for caching rows."""
        guided = [r for r in rows if r.sampler.cfg_scale]
        seqs = [r.seq for r in rows]
        for r in guided:  # LLaDA eq. 16: the unconditional branch masks the prompt
            uncond = r.seq.clone()
            uncond[:r.prompt_len] = self.mask_id
            seqs.append(uncond)
        owners = rows + guided
        width = max(s.numel() for s in seqs)
        n_block = max(r.current.stop - r.current.start for r in owners)
        ids = torch.full((len(seqs), width), self.mask_id, dtype=torch.long, device=self.device)
        attn = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)
        positions = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)
        at = torch.zeros(len(seqs), n_block, dtype=torch.long, device=self.device)
        for i, (r, s) in enumerate(zip(owners, seqs)):
            pad = width - s.numel()
            ids[i, pad:], attn[i, pad:] = s, 1
            positions[i, pad:] = torch.arange(s.numel(), device=self.device)
            lo, hi = r.current.start + pad, r.current.stop + pad
            at[i] = torch.arange(lo, lo + n_block, device=self.device).clamp(max=hi - 1)
        want_kv = any(r.sampler.cache != "none" for r in rows)
        out = self.model(ids, attn, positions, return_kv=want_kv, logits_at=at)
        logits, kv = out if want_kv else (out, None)
        self.stats.forward_passes += 1
        self.stats.query_tokens += int(attn.sum())
        result = {}
        for i, r in enumerate(rows):
            n = r.current.stop - r.current.start
            result[id(r)] = logits[i, :n]
            if r.sampler.cache != "none":
                pad = width - r.seq.numel()
                r.cache, r.fresh = kv.rows(torch.tensor([i], device=self.device)).positions(slice(pad, width)), True
        for j, r in enumerate(guided):
            n = r.current.stop - r.current.start
            cond, unc = result[id(r)], logits[len(rows) + j, :n]
            result[id(r)] = unc + (r.sampler.cfg_scale + 1.0) * (cond - unc)
        return result

    def _cached_pass(self, rows: list[Row]) -> dict[int, Tensor]:
        """Each row's block (and, with the prefix cache, the rest after it) against its cached keys
        and values of the positions outside; rows padded on the right."""
        inputs = []
        for r in rows:
            lo, hi, L = r.current.start, r.current.stop, r.seq.numel()
            if r.sampler.cache == "prefix":
                inputs.append(torch.arange(lo, L, device=self.device))
                if r.past is None:
                    r.past = r.cache.positions(slice(0, lo))
            else:
                inputs.append(torch.arange(lo, hi, device=self.device))
                if r.past is None:
                    outside = torch.cat([torch.arange(0, lo, device=self.device), torch.arange(hi, L, device=self.device)])
                    r.past = r.cache.positions(outside)
        width = max(p.numel() for p in inputs)
        ids = torch.full((len(rows), width), self.mask_id, dtype=torch.long, device=self.device)
        attn = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        positions = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for i, (r, pos) in enumerate(zip(rows, inputs)):
            ids[i, :pos.numel()], attn[i, :pos.numel()], positions[i, :pos.numel()] = r.seq[pos], 1, pos
            positions[i, pos.numel():] = pos[-1]
        n_block = max(r.current.stop - r.current.start for r in rows)
        logits = self.model(ids, attn, positions, past=KV.stack([r.past for r in rows]), logits_at=slice(0, n_block))
        self.stats.forward_passes += 1
        self.stats.query_tokens += int(attn.sum())
        return {id(r): logits[i, :r.current.stop - r.current.start] for i, r in enumerate(rows)}

    # --- one row's step ------------------------------------------------------------------------------
    def _reveal(self, row: Row, logits: Tensor) -> None:
        sampler, block = row.sampler, row.current
        x_block = row.seq[block][None]  # (1, N)
        masked = x_block == self.mask_id
        banned = torch.tensor([self.mask_id], device=self.device)
        if sampler.eos == "forbid":
            banned = torch.cat([banned, row.stop])
        logits = ban_tokens(logits[None, :, :self.vocab_size], banned)  # (1, N, V)
        x0 = gumbel_argmax(logits, sampler.temperature, row.generator)
        score = REMASKING[sampler.remasking](logits, x0, row.generator)
        s = row.step_in_block
        if sampler.parallel == "schedule":
            k = row.schedule[s:s + 1]
        else:
            left = sampler.steps_per_block - s
            at_least = (masked.sum(1) + left - 1) // left
            probs = logits.double().softmax(-1)
            confidence = probs.gather(-1, x0[..., None])[..., 0]
            entropy = -torch.special.xlogy(probs, probs).sum(-1)
            k = reveal_counts(confidence, entropy, masked, sampler, at_least)
        late = torch.isin(x0, row.stop) if sampler.eos == "delay" else torch.zeros_like(masked)
        chosen = select_top_k(score, torch.where(masked, late.long(), 2), k) & masked
        row.seq[block] = torch.where(chosen, x0, x_block)[0]
        step = row.block * sampler.steps_per_block + s
        revealed = torch.zeros_like(row.seq, dtype=torch.bool)
        revealed[block] = chosen[0]
        row.reveal_step = row.reveal_step.masked_fill(revealed, step)
        self.stats.steps = max(self.stats.steps, step + 1)
        row.step_in_block += 1
        ended = sampler.stop_at_eos and row.stop.numel() > 0 and bool(
            answers_ended(row.seq[None], row.prompt_len, row.stop, self.mask_id)[0])
        if not (row.seq[block] == self.mask_id).any() or row.step_in_block == sampler.steps_per_block:
            row.next_block(row.block + 1, self.mask_id)
        row.ended = ended
        row.finished = ended or row.block >= len(row.blocks)
        if row.on_step is not None:
            row.on_step(StepInfo(step, min(row.block, len(row.blocks) - 1), row.seq[None].clone(), revealed[None],
                                 row.reveal_step[None].clone(), row.prompt_len, row.finished))


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
