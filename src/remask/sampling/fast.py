"""The fast sampler: the reverse process of `generate` with everything that costs nothing in
quality removed, and the approximations that buy speed made explicit settings.

Lossless (token-identical to `generate` at temperature 0):
- the output head runs only on the current block's positions;
- a step that can reveal nothing (every row's schedule says 0) costs no forward pass;
- a row whose answer has ended (an end-of-text with everything before it revealed) leaves the
  batch, and sampling stops when all have: finished rows stop costing work.

Approximate, chosen in `SamplerConfig`:
- `cache`: the keys and values of positions outside the current block, computed by a full pass
  at each block boundary (which also serves as the block's first step) and reused for the rest of
  the block: `prefix` keeps the prompt and finished blocks and recomputes the block and the masked
  suffix; `dual` keeps the suffix too and recomputes only the block (Fast-dLLM's caches). Cached
  values are stale by what the block has revealed since the refresh.
- `parallel`: how many masked tokens a step reveals -- the linear `schedule` of the reference, or
  every token whose confidence passes `threshold`, or the `factor` rule (the largest n with
  (n + 1)(1 - c_n) < factor, c sorted descending), or the `entropy` rule (the largest n whose
  summed entropy minus its largest stays within `entropy_bound`); always at least one, and
  enough to finish the block within its share of `steps`.

The model is any `Transformer`-like callable with the `past` / `return_kv` / `logits_at`
interface of `remask.model`; logits past `vocab_size` (padded rows) are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from remask.errors import RemaskError
from remask.model import KV
from remask.sampling.config import SamplerConfig
from remask.sampling.generate import (
    StepInfo,
    answers_ended,
    append_masks,
    ban_tokens,
    check_prompt,
    select_top_k,
)
from remask.sampling.remasking import REMASKING, gumbel_argmax
from remask.sampling.schedule import block_slices, num_transfer_tokens


@dataclass
class SamplingStats:
    forward_passes: int = 0  # model calls
    query_tokens: int = 0  # positions run through the model, summed over calls and rows
    steps: int = 0  # reverse steps taken (the longest row)


def reveal_counts(score: Tensor, entropy: Tensor, masked: Tensor, sampler: SamplerConfig, at_least: Tensor) -> Tensor:
    """(B,) how many masked positions each row reveals under the parallel rule; `score` is the
    confidence of each prediction (B, N), `entropy` its entropy, `at_least` the schedule's minimum."""
    n_masked = masked.sum(1)
    if sampler.parallel == "threshold":
        n = ((score >= sampler.threshold) & masked).sum(1)
    elif sampler.parallel == "factor":
        c = score.masked_fill(~masked, -1.0).sort(dim=1, descending=True).values  # (B, N)
        rank = torch.arange(1, c.shape[1] + 1, device=c.device, dtype=c.dtype)
        ok = ((rank + 1) * (1 - c) < sampler.factor) & (c >= 0)
        n = torch.where(ok.any(1), ok.int().cumprod(1).sum(1), 0)  # the leading run of n that satisfy it
    elif sampler.parallel == "entropy":
        h = entropy.masked_fill(~masked, float("inf")).sort(dim=1).values  # ascending
        finite = torch.isfinite(h)
        cum = torch.where(finite, h, 0).cumsum(1)
        ok = (cum - torch.where(finite, h, 0).cummax(1).values <= sampler.entropy_bound) & finite
        n = ok.int().cumprod(1).sum(1)
    else:
        return at_least
    return torch.minimum(torch.maximum(n, torch.maximum(at_least, torch.ones_like(n))), n_masked)


class _Rows:
    """The rows still being decoded and what is cached for them."""

    def __init__(self, x: Tensor, attn: Tensor | None) -> None:
        self.index = torch.arange(x.shape[0], device=x.device)  # their rows in the full batch
        self.x, self.attn, self.cache = x, attn, None

    def keep(self, alive: Tensor) -> None:
        self.index, self.x = self.index[alive], self.x[alive]
        self.attn = None if self.attn is None else self.attn[alive]
        self.cache = None if self.cache is None else self.cache.rows(alive)


@torch.no_grad()
def generate_fast(model: Callable, prompt: Tensor, sampler: SamplerConfig, *, mask_id: int, vocab_size: int,
                  attention_mask: Tensor | None = None, eos_ids: Sequence[int] = (),
                  generator: torch.Generator | None = None,
                  on_step: Callable[[StepInfo], None] | None = None) -> tuple[Tensor, SamplingStats]:
    """Fill sampler.gen_length masked positions after `prompt` (B, P): (B, P + gen_length), stats.
    Positions after a row's end-of-text may keep the mask id. See the module doc."""
    check_prompt(prompt, attention_mask, mask_id)
    if sampler.cfg_scale and sampler.cache != "none":
        raise RemaskError("classifier-free guidance needs two caches; use cfg_scale with cache none")
    P, L = prompt.shape[1], prompt.shape[1] + sampler.gen_length
    full, full_attn = append_masks(prompt, attention_mask, sampler.gen_length, mask_id)  # (B, L)
    reveal_step = torch.full_like(full, -1)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=full.device)
    banned = torch.cat([torch.tensor([mask_id], device=full.device), eos]) if sampler.eos == "forbid" else \
        torch.tensor([mask_id], device=full.device)
    rows, stats = _Rows(full.clone(), full_attn), SamplingStats()
    blocks = block_slices(P, sampler.gen_length, sampler.effective_block_length)
    for b, block in enumerate(blocks):
        schedule = num_transfer_tokens(rows.x[:, block] == mask_id, sampler.steps_per_block)  # (B, S) per row
        fresh = False  # the cache has been refreshed for this block
        for s in range(sampler.steps_per_block):
            step = b * sampler.steps_per_block + s  # the reference's numbering
            masked = rows.x[:, block] == mask_id  # (B, N)
            if not masked.any():
                break
            at_least = schedule[:, s] if sampler.parallel == "schedule" else _minimum(masked, sampler, s)
            if sampler.parallel == "schedule" and not at_least.any():
                continue  # nothing to reveal in this step: no forward pass
            logits = _block_logits(model, rows, block, L, refresh=not fresh, sampler=sampler, prompt_len=P,
                                   mask_id=mask_id, stats=stats)
            fresh = True
            logits = ban_tokens(logits[..., :vocab_size], banned)  # (B, N, V)
            x0 = gumbel_argmax(logits, sampler.temperature, generator)  # (B, N)
            score = REMASKING[sampler.remasking](logits, x0, generator)  # (B, N) float64
            if sampler.parallel == "schedule":
                k = at_least
            else:
                probs = logits.double().softmax(-1)
                confidence = probs.gather(-1, x0[..., None])[..., 0]
                entropy = -torch.special.xlogy(probs, probs).sum(-1)
                k = reveal_counts(confidence, entropy, masked, sampler, at_least)
            late = torch.isin(x0, eos) if sampler.eos == "delay" else torch.zeros_like(masked)
            tier = torch.where(masked, late.long(), 2)
            chosen = select_top_k(score, tier, k) & masked
            rows.x[:, block] = torch.where(chosen, x0, rows.x[:, block])
            revealed = torch.zeros_like(rows.x, dtype=torch.bool)
            revealed[:, block] = chosen
            full[rows.index] = rows.x
            reveal_step[rows.index] = reveal_step[rows.index].masked_fill(revealed, step)
            stats.steps = step + 1
            ended = (answers_ended(rows.x, P, eos, mask_id) if sampler.stop_at_eos and eos.numel()
                     else torch.zeros(rows.x.shape[0], dtype=torch.bool, device=full.device))
            done = bool(ended.all()) or (b == len(blocks) - 1 and not (rows.x[:, block] == mask_id).any())
            if on_step is not None:
                all_revealed = torch.zeros_like(full, dtype=torch.bool)
                all_revealed[rows.index] = revealed
                on_step(StepInfo(step, b, full.clone(), all_revealed, reveal_step.clone(), P, done))
            if ended.any():
                rows.keep(~ended)
                schedule = schedule[~ended]
                if rows.x.shape[0] == 0:
                    return full, stats
    return full, stats


def _minimum(masked: Tensor, sampler: SamplerConfig, s: int) -> Tensor:
    """Per row, the fewest reveals that still finish the block within its steps."""
    left = sampler.steps_per_block - s
    return (masked.sum(1) + left - 1) // left


def _block_logits(model: Callable, rows: _Rows, block: slice, L: int, *, refresh: bool, sampler: SamplerConfig,
                  prompt_len: int, mask_id: int, stats: SamplingStats) -> Tensor:
    """(B, N, V) logits of the block's positions, by a full pass or from the cache."""
    lo, hi = block.start, block.stop
    x, attn = rows.x, rows.attn
    B = x.shape[0]
    device = x.device
    cache = sampler.cache
    if sampler.cfg_scale:  # LLaDA eq. 16: the unconditional branch masks the prompt; both in one batch
        uncond = x.clone()
        uncond[:, :prompt_len] = mask_id
        both = model(torch.cat([x, uncond]), None if attn is None else torch.cat([attn, attn]), logits_at=block)
        stats.forward_passes += 1
        stats.query_tokens += 2 * B * L
        cond, unc = both.chunk(2)
        return unc + (sampler.cfg_scale + 1.0) * (cond - unc)
    if cache == "none" or refresh:
        want_kv = cache != "none"
        out = model(x, attn, return_kv=want_kv, logits_at=block)
        stats.forward_passes += 1
        stats.query_tokens += B * L
        if want_kv:
            logits, kv = out
            rows.cache = kv
            return logits
        return out
    kv: KV = rows.cache
    if cache == "prefix":  # recompute the block and everything after it
        positions = torch.arange(lo, L, device=device)
        logits = model(x[:, lo:], None if attn is None else attn[:, lo:], positions,
                       past=kv.positions(slice(0, lo)), logits_at=slice(0, hi - lo))
        stats.query_tokens += B * (L - lo)
    else:  # dual: recompute the block only
        positions = torch.arange(lo, hi, device=device)
        outside = torch.cat([torch.arange(0, lo, device=device), torch.arange(hi, L, device=device)])
        logits = model(x[:, lo:hi], None if attn is None else attn[:, lo:hi], positions, past=kv.positions(outside))
        stats.query_tokens += B * (hi - lo)
    stats.forward_passes += 1
    return logits
