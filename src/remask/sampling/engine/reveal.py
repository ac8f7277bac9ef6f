"""The reveal: from the logits of a row's current block, which of its masked positions to reveal
at this step and with what, and the row's bookkeeping after it (reveal steps, the move to the
next block, the stop at end-of-text). Rows that share their settings and draw no randomness are
chosen for in one computation (`reveal_rows`): per-row work was a sixth of a batched step.

How many a step reveals is the row's `parallel` rule: the linear `schedule` of the reference, or
every token whose probability passes `threshold`, or the `factor` rule (the largest n with
(n + 1)(1 - p_n) < factor, p sorted descending), or the `entropy` rule (the largest n whose
summed entropy less its largest stays within `entropy_bound`); always at least one, and enough to
finish the block within its share of `steps`. Which ones: the highest remasking scores, an
end-of-text prediction last under `eos="delay"` (and never under `eos="forbid"`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from remask.sampling.config import SamplerConfig
from remask.sampling.engine.rows import Row
from remask.sampling.generate import StepInfo, answers_ended, ban_tokens, select_top_k
from remask.sampling.remasking import REMASKING, gumbel_argmax


def reveal_counts(confidence: Tensor, entropy: Tensor, masked: Tensor, sampler: SamplerConfig, at_least: Tensor) -> Tensor:
    """(B,) how many masked positions each row reveals under sampler.parallel: `confidence` (B, N)
    is the probability of each position's prediction, `entropy` (B, N) the entropy of its
    distribution, `masked` (B, N) the positions still masked, `at_least` (B,) the step budget's
    minimum. Never fewer than one nor more than are masked."""
    n_masked = masked.sum(1)
    if sampler.parallel == "threshold":
        n = ((confidence >= sampler.threshold) & masked).sum(1)
    elif sampler.parallel == "factor":
        c = confidence.masked_fill(~masked, -1.0).sort(dim=1, descending=True).values  # (B, N)
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


def choose(rows: list[Row], logits: Tensor, *, mask_id: int, vocab_size: int) -> tuple[Tensor, Tensor]:
    """The predictions x0 (B, N) for the current blocks of `rows` (one sampler, one block width N,
    one set of stop ids: `batches`) from their logits (B, N, V'), and which masked positions
    (B, N) this step reveals. Rows drawing randomness take one at a time (each from its own
    generator, so a row's draws do not depend on its batch)."""
    sampler, row = rows[0].sampler, rows[0]
    masked = torch.stack([r.seq[r.current] for r in rows]) == mask_id  # (B, N)
    banned = torch.tensor([mask_id], device=logits.device)
    if sampler.eos == "forbid":
        banned = torch.cat([banned, row.stop])
    logits = ban_tokens(logits[..., :vocab_size], banned)  # (B, N, V): padded vocabulary rows dropped
    x0 = gumbel_argmax(logits, sampler.temperature, row.generator)
    score = REMASKING[sampler.remasking](logits, x0, row.generator)
    steps = torch.tensor([r.step_in_block for r in rows], device=logits.device)
    if sampler.parallel == "schedule":
        k = torch.stack([r.schedule[r.step_in_block] for r in rows])
    else:
        left = torch.tensor([r.steps_per_block for r in rows], device=logits.device) - steps
        at_least = (masked.sum(1) + left - 1) // left  # enough to finish the block in its steps
        probs = logits.double().softmax(-1)
        confidence = probs.gather(-1, x0[..., None])[..., 0]
        entropy = -torch.special.xlogy(probs, probs).sum(-1) if sampler.parallel == "entropy" else confidence  # read by entropy only
        k = reveal_counts(confidence, entropy, masked, sampler, at_least)
    late = torch.isin(x0, row.stop) if sampler.eos == "delay" else torch.zeros_like(masked)
    chosen = select_top_k(score, torch.where(masked, late.long(), 2), k) & masked
    return x0, chosen


def batches(rows: list[Row]) -> list[list[Row]]:
    """`rows` in groups whose reveal is one computation: the same sampler settings, block width
    and stop ids, and no randomness drawn (temperature 0 and a deterministic remasking score);
    a row that draws from its generator is a group of its own."""
    groups: dict[tuple, list[Row]] = {}
    for i, r in enumerate(rows):
        random = r.sampler.temperature > 0 or r.sampler.remasking == "random"
        key = (i,) if random else (r.sampler, r.current.stop - r.current.start, tuple(r.stop.tolist()))
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def reveal_rows(rows: list[Row], logits: dict[int, Tensor], *, mask_id: int, vocab_size: int) -> list[int]:
    """One step of every row of `rows` from its block's logits (`logits[id(row)]`, (N, V')),
    computed in `batches` (the same result as row by row: each row's numbers are its own, and
    a row drawing randomness takes it from its own generator). Each row's global step."""
    steps = {}
    for group in batches(rows):
        x0, chosen = choose(group, torch.stack([logits[id(r)] for r in group]), mask_id=mask_id, vocab_size=vocab_size)
        for i, r in enumerate(group):
            steps[id(r)] = advance(r, x0[i:i + 1], chosen[i:i + 1], mask_id)
    return [steps[id(r)] for r in rows]


def advance(row: Row, x0: Tensor, chosen: Tensor, mask_id: int) -> int:
    """The row's bookkeeping after its reveal of `chosen` (1, N) from `x0` (1, N): record the
    step, move to the next block when this one is done, finish at end-of-text or after the last
    block, and tell `row.on_step`. Returns the row's global step."""
    sampler, block = row.sampler, row.current
    row.seq[block] = torch.where(chosen, x0, row.seq[block][None])[0]
    step = row.block * row.steps_per_block + row.step_in_block
    revealed = torch.zeros_like(row.seq, dtype=torch.bool)
    revealed[block] = chosen[0]
    row.reveal_step = row.reveal_step.masked_fill(revealed, step)
    row.step_in_block += 1
    ended = sampler.stop_at_eos and row.stop.numel() > 0 and bool(
        answers_ended(row.seq[None], row.prompt_len, row.stop, mask_id)[0])
    if not (row.seq[block] == mask_id).any() or row.step_in_block == row.steps_per_block:
        row.next_block(row.block + 1, mask_id)
    row.ended = ended
    row.finished = ended or row.block >= len(row.blocks)
    if row.on_step is not None:
        row.on_step(StepInfo(step, min(row.block, len(row.blocks) - 1), row.seq[None].clone(), revealed[None],
                             row.reveal_step[None].clone(), row.prompt_len, row.finished))
    return step
