"""The runner: the engine's forward passes, and the cache protocol between them and the rows.

A kind of pass (`PassKind`) says what it does for one row as a `PassSpec`: which positions it
recomputes, which it reuses from the row's cache, where it returns logits and whose new keys and
values the row keeps; and it runs a batch of rows in one forward pass. Kinds are registered by
name in `PASSES` (the scheduler names them; `Engine.step` runs whatever the plan holds):
- `full`: the whole sequence, nothing reused; the row keeps every position's keys/values when
  it caches (this pass starts its block and refreshes the cache);
- `cached`: the current block (`dual`), or the block and the masked suffix after it (`prefix`),
  against the cached keys/values of the rest, which are stale by what the block has revealed
  since the refresh (Fast-dLLM's caches); nothing kept.
- `block_start` (a block model's row at its first pass): the prompt and the first block, nothing
  reused; the prompt's keys/values are kept. A pass of its own, so that a row joining a batch
  does not pad every other row's step to the width of its prompt;
- `block` (a block model's rows after that): the current block and the block just finished (whose
  keys/values are not cached yet) against the exact keys/values of the finished blocks before;
  the finished block's keys/values are kept. Exact: nothing is approximated.

The `Runner` runs a step's plan and holds what lives between steps: the batch of the cached rows'
keys/values, stacked once when that set of rows (or one of their caches) changes and reused as it
is while it does not (restacking every row's cache at every step cost as much as the pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from remask.model import KV
from remask.sampling.engine.rows import Row, SamplingStats

Span = tuple[slice, ...]  # ascending, disjoint ranges of a row's positions


def span_index(span: Span, device: torch.device | None = None) -> Tensor:
    """(N,) the positions of `span`, in order."""
    return torch.cat([torch.arange(s.start, s.stop, device=device) for s in span] or [torch.arange(0, device=device)])


def _within(s: slice, span: Span) -> bool:
    return s.start == s.stop or any(p.start <= s.start and s.stop <= p.stop for p in span)


def _overlap(a: Span, b: Span) -> bool:
    return any(x.start < y.stop and y.start < x.stop for x in a for y in b)


@dataclass(frozen=True)
class PassSpec:
    """One row's share of a forward pass, in positions of the row's sequence."""

    recompute: Span  # run through the model: queries, their keys/values computed afresh
    reuse: Span  # read from the row's cache: attended to, not recomputed
    logits: slice  # where the pass returns logits (the current block)
    keep: Span = ()  # whose new keys/values become the row's cache (empty: none kept)

    def __post_init__(self) -> None:
        if not all(_within(s, self.recompute) for s in (self.logits, *self.keep)):
            raise ValueError(f"{self}: logits and kept keys/values come only from recomputed positions")
        if _overlap(self.recompute, self.reuse):
            raise ValueError(f"{self}: a position is both recomputed and reused")


class PassKind(Protocol):
    """A kind of forward pass: what it does for a row, and how a batch of rows runs it."""

    name: str

    def spec(self, row: Row) -> PassSpec: ...

    def run(self, rows: list[Row], runner: Runner) -> dict[int, Tensor]:
        """One forward pass over `rows`: id(row) -> logits of spec.logits (N, V)."""
        ...


PASSES: dict[str, PassKind] = {}  # in the order a step runs them


def register(kind: PassKind) -> PassKind:
    """Add a kind of pass under its name (the scheduler's rules return these names)."""
    PASSES[kind.name] = kind
    return kind


def model_device(model: Callable) -> torch.device:
    return next(iter(model.parameters())).device if hasattr(model, "parameters") else torch.device("cpu")


class Runner:
    """Runs the passes of a step's plan over the model; keeps the batched caches between steps."""

    def __init__(self, model: Callable, *, mask_id: int, stats: SamplingStats) -> None:
        self.model, self.mask_id, self.stats = model, mask_id, stats
        self.device = model_device(model)
        self.held: dict[str, tuple[list, object]] = {}  # pass kind -> (the parts, what was built from them)

    def run(self, plan: dict[str, list[Row]]) -> dict[int, Tensor]:
        """Every pass of the plan, one forward pass per kind: id(row) -> logits of its block (N, V)."""
        for name in [n for n in self.held if n not in plan]:  # nobody takes that pass now: let it go
            del self.held[name]
        logits: dict[int, Tensor] = {}
        for name, rows in plan.items():
            logits |= PASSES[name].run(rows, self)
        return logits

    def release(self) -> None:
        """Let go of everything held between steps (no row is left to reuse it)."""
        self.held.clear()

    def forward(self, ids: Tensor, attention_mask: Tensor, positions: Tensor, **kw) -> Tensor | tuple[Tensor, KV]:
        """The model on (B, T) ids; counts the pass and its real positions."""
        out = self.model(ids, attention_mask, positions, **kw)
        self.stats.forward_passes += 1
        self.stats.query_tokens += int(attention_mask.sum())
        return out

    def kept(self, name: str, parts: Sequence, build: Callable[[list], object]):
        """`build(parts)`, built again only when `parts` are not the very objects of last time."""
        held = self.held.get(name)
        if held is None or len(held[0]) != len(parts) or any(a is not b for a, b in zip(held[0], parts)):
            held = self.held[name] = (list(parts), build(list(parts)))
        return held[1]


class FullPass:
    """The whole sequence of each row, left-padded; refreshes the cache of rows that cache."""

    name = "full"

    def spec(self, row: Row) -> PassSpec:
        whole = (slice(0, row.seq.numel()),)
        return PassSpec(recompute=whole, reuse=(), logits=row.current, keep=whole if row.sampler.cache != "none" else ())

    def run(self, rows: list[Row], runner: Runner) -> dict[int, Tensor]:
        specs = [self.spec(r) for r in rows]
        guided = [(r, s) for r, s in zip(rows, specs) if r.sampler.cfg_scale]
        seqs = [r.seq for r in rows]
        for r, _ in guided:  # LLaDA eq. 16: the unconditional branch masks the prompt
            uncond = r.seq.clone()
            uncond[:r.prompt_len] = runner.mask_id
            seqs.append(uncond)
        owners = specs + [s for _, s in guided]
        ids, attn, positions, pads = left_padded(seqs, runner.mask_id, runner.device)
        n_block = max(s.logits.stop - s.logits.start for s in owners)
        at = torch.zeros(len(seqs), n_block, dtype=torch.long, device=runner.device)  # (B, N) each row's block
        for i, (s, pad) in enumerate(zip(owners, pads)):
            lo, hi = s.logits.start + pad, s.logits.stop + pad
            at[i] = torch.arange(lo, lo + n_block, device=runner.device).clamp(max=hi - 1)
        want_kv = any(s.keep for s in specs)
        out = runner.forward(ids, attn, positions, return_kv=want_kv, logits_at=at)
        logits, kv = out if want_kv else (out, None)
        result = {}
        for i, (r, s) in enumerate(zip(rows, specs)):
            result[id(r)] = logits[i, :s.logits.stop - s.logits.start]
            if s.keep:  # (1, ...) this row's keys/values, its padding cut off
                (keep,) = s.keep
                r.cache = kv.rows(torch.tensor([i], device=runner.device)).positions(slice(keep.start + pads[i], keep.stop + pads[i]))
                r.fresh, r.past = True, None
        for j, (r, s) in enumerate(guided):
            n = s.logits.stop - s.logits.start
            cond, unc = result[id(r)], logits[len(rows) + j, :n]
            result[id(r)] = unc + (r.sampler.cfg_scale + 1.0) * (cond - unc)
        return result


register(FullPass())


def padded(seqs: list[Tensor], positions: list[Tensor], pad_id: int, *, left: bool) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Rows of ids with their rotary positions as one batch, padded on the left or the right: ids,
    attention mask and positions (B, W), and each row's padding (padding sits at position 0 on the
    left, at the row's last position on the right; the mask hides it as keys)."""
    width, device = max(s.numel() for s in seqs), seqs[0].device
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    pos = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    pads = []
    for i, (s, p) in enumerate(zip(seqs, positions)):
        pad = width - s.numel()
        real = slice(pad, width) if left else slice(0, s.numel())
        ids[i, real], attn[i, real], pos[i, real] = s, 1, p
        if not left:
            pos[i, s.numel():] = p[-1]
        pads.append(pad)
    return ids, attn, pos, pads


def left_padded(seqs: list[Tensor], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Sequences of different lengths as one batch padded on the left: ids, attention mask and
    rotary positions (B, W) (each row from 0 at its first real token), and each row's padding."""
    return padded([s.to(device) for s in seqs], [torch.arange(s.numel(), device=device) for s in seqs], pad_id, left=True)


class CachedPass:
    """Each row's block (with the prefix cache, the block and everything after it) against its
    cached keys/values of the rest; rows padded on the right, the block first in each."""

    name = "cached"

    def spec(self, row: Row) -> PassSpec:
        lo, hi, L = row.current.start, row.current.stop, row.seq.numel()
        if row.sampler.cache == "prefix":
            return PassSpec(recompute=(slice(lo, L),), reuse=(slice(0, lo),), logits=slice(lo, hi))
        return PassSpec(recompute=(slice(lo, hi),), reuse=(slice(0, lo), slice(hi, L)), logits=slice(lo, hi))

    def run(self, rows: list[Row], runner: Runner) -> dict[int, Tensor]:
        specs = [self.spec(r) for r in rows]
        inputs = [span_index(s.recompute, runner.device) for s in specs]
        for r, s in zip(rows, specs):
            if r.past is None:  # once per block: the reused part of the cache the full pass left
                r.past = r.cache.positions(s.reuse[0] if len(s.reuse) == 1 else span_index(s.reuse, runner.device))
        ids, attn, positions, _ = padded([r.seq[pos] for r, pos in zip(rows, inputs)], inputs, runner.mask_id, left=False)
        n_block = max(s.logits.stop - s.logits.start for s in specs)
        past = runner.kept(self.name, [r.past for r in rows], KV.stack)  # (B, ...) right-padded
        logits = runner.forward(ids, attn, positions, past=past, logits_at=slice(0, n_block))
        return {id(r): logits[i, :s.logits.stop - s.logits.start] for i, (r, s) in enumerate(zip(rows, specs))}


register(CachedPass())


def block_spec(row: Row) -> PassSpec:
    """A block model's row: its positions from the first uncached one to the end of its current
    block, against its cached ones; the finished positions before the current block are kept."""
    lo, hi, done = row.current.start, row.current.stop, row.cached_upto
    return PassSpec(recompute=(slice(done, hi),), reuse=(slice(0, done),), logits=slice(lo, hi),
                    keep=(slice(done, lo),) if lo > done else ())


def block_batch(rows: list[Row], specs: list[PassSpec], runner: Runner) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block rows' recomputed spans padded on the right, on each row's rotary grid: ids, attention
    mask, positions (B, W), and where each row's current block lies in them (B, N)."""
    spans = [s.recompute[0] for s in specs]
    ids, attn, positions, _ = padded([r.seq[span] for r, span in zip(rows, spans)],
                                     [r.grid + torch.arange(span.start, span.stop, device=runner.device)
                                      for r, span in zip(rows, spans)], runner.mask_id, left=False)
    n_block = max(s.logits.stop - s.logits.start for s in specs)
    at = torch.zeros(len(rows), n_block, dtype=torch.long, device=runner.device)
    for i, (s, span) in enumerate(zip(specs, spans)):
        lo = s.logits.start - span.start
        at[i] = torch.arange(lo, lo + n_block, device=runner.device).clamp(max=s.logits.stop - span.start - 1)
    return ids, attn, positions, at


def block_logits(logits: Tensor, rows: list[Row], specs: list[PassSpec]) -> dict[int, Tensor]:
    return {id(r): logits[i, :s.logits.stop - s.logits.start] for i, (r, s) in enumerate(zip(rows, specs))}


class BlockStartPass:
    """A block model's rows at their first pass: the prompt (and any text given after it up to the
    current block) with the current block, nothing cached yet; the finished positions' keys/values
    are held on the row (`Row.cache`) until the `block` pass takes the row into its buffer."""

    name = "block_start"

    def spec(self, row: Row) -> PassSpec:
        return block_spec(row)

    def run(self, rows: list[Row], runner: Runner) -> dict[int, Tensor]:
        specs = [self.spec(r) for r in rows]
        ids, attn, positions, at = block_batch(rows, specs, runner)
        logits, kv = runner.forward(ids, attn, positions, return_kv=True, logits_at=at)
        for i, (r, s) in enumerate(zip(rows, specs)):
            if s.keep:  # right padding: the row's own positions start at 0
                (keep,) = s.keep
                r.cache = kv.rows(torch.tensor([i], device=runner.device)).positions(keep)
                r.cached_upto = keep.stop
        return block_logits(logits, rows, specs)


register(BlockStartPass())


class BlockPass:
    """A block model's rows (exact cache): each row's positions from its first uncached one to the
    end of its current block -- the block just finished, not yet cached, and the current block --
    against the exact keys/values of everything before; the finished positions' keys/values join
    the cache. A finished block's keys/values are exact because under the block layout nothing
    after it changes them.

    The rows' caches live in one batched buffer (`Slab`), a row per batch row, each holding its
    finished positions from 0: a pass writes its tokens' keys/values after the longest cache (the
    model's in-place `KV.allocate` protocol), and a finished block is moved to its row's place. So
    no cache is copied or restacked from step to step; the buffer is rebuilt only when rows join
    (bringing the keys/values of their `block_start` pass) or leave."""

    name = "block"

    def spec(self, row: Row) -> PassSpec:
        return block_spec(row)

    def run(self, rows: list[Row], runner: Runner) -> dict[int, Tensor]:
        specs = [self.spec(r) for r in rows]
        ids, attn, positions, at = block_batch(rows, specs, runner)
        slab = runner.kept(self.name, rows, lambda now: Slab.for_rows(now, runner.held.get(self.name), runner.model))
        filled = max(r.cached_upto for r in rows)  # this pass's keys/values go after the longest cache
        slab.reserve(filled + ids.shape[1])
        logits = runner.forward(ids, attn, positions, past=KV(slab.layers, slab.valid, filled), logits_at=at)
        slab.valid[:, filled:] = False  # the pass's own entries are scratch, except what rows keep (below)
        for i, (r, s) in enumerate(zip(rows, specs)):
            if s.keep:  # the finished positions, exact from now on, moved to their place in the row's cache
                (keep,) = s.keep
                slab.move(i, filled, keep.start, keep.stop - keep.start)
                r.cached_upto = keep.stop
        return block_logits(logits, rows, specs)


class Slab:
    """The block rows' caches as one buffer: layers of (B, Hkv, capacity, D) keys/values, row b's
    finished positions at [0, its cached_upto) and marked in `valid` (B, capacity)."""

    def __init__(self, rows: list[Row], layers: list[tuple[Tensor, Tensor]], valid: Tensor) -> None:
        self.rows, self.layers, self.valid = rows, layers, valid

    @staticmethod
    def for_rows(rows: list[Row], held: tuple[list, Slab] | None, model: Callable) -> Slab:
        """A buffer for `rows`: the rows of the previous buffer that are still here, and the rows
        that join with the keys/values their `block_start` pass left on them (taken off the row)."""
        old = held[1] if held is not None else None
        where = {id(r): i for i, r in enumerate(old.rows)} if old is not None else {}
        joining = [i for i, r in enumerate(rows) if id(r) not in where]
        if any(rows[i].cached_upto and rows[i].cache is None for i in joining):
            raise RuntimeError("a block row lost its cache")
        if old is None:
            cfg, p = model.config, next(iter(model.parameters()))
            shape = (len(rows), cfg.effective_n_kv_heads, 0, cfg.head_dim)
            slab = Slab(rows, [(p.new_zeros(shape), p.new_zeros(shape)) for _ in range(cfg.n_layers)],
                        torch.zeros(len(rows), 0, dtype=torch.bool, device=p.device))
        else:
            pick = torch.tensor([where.get(id(r), 0) for r in rows], device=old.valid.device)
            slab = Slab(rows, [(k[pick], v[pick]) for k, v in old.layers], old.valid[pick])
            slab.valid[joining] = False
        slab.reserve(max(r.cached_upto for r in rows))
        for i in joining:
            if rows[i].cache is not None:
                slab.load(i, rows[i].cache)
                rows[i].cache = None
        return slab

    def reserve(self, capacity: int) -> None:
        """Room for `capacity` positions (grown by doubling; the model gives the sizes on first use)."""
        have = self.valid.shape[1]
        if capacity <= have:
            return
        size = max(capacity, 2 * have)
        self.valid = F.pad(self.valid, (0, size - have), value=False)
        self.layers = [(F.pad(k, (0, 0, 0, size - have)), F.pad(v, (0, 0, 0, size - have))) for k, v in self.layers]

    def load(self, row: int, kv: KV) -> None:
        """Row `row`'s cache becomes `kv` (one row's keys/values of its positions from 0)."""
        n = kv.length
        for (k, v), (k1, v1) in zip(self.layers, kv.layers):
            k[row, :, :n], v[row, :, :n] = k1[0], v1[0]
        self.valid[row, :n] = True
        self.valid[row, n:] = False

    def move(self, row: int, start: int, to: int, n: int) -> None:
        """Row `row`'s n entries written at `start` by the last pass become its cache at [to, to + n)."""
        if start != to:
            for k, v in self.layers:
                k[row, :, to:to + n] = k[row, :, start:start + n].clone()
                v[row, :, to:to + n] = v[row, :, start:start + n].clone()
        self.valid[row, to:to + n] = True


register(BlockPass())
