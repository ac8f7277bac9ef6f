"""Log-likelihood lower bounds (LLaDA, eq. 6 and appendix B.6 / eq. 14), Monte-Carlo estimated
with a standard error, and their exact values by enumeration (the test oracle).

For an answer r0 of length L after a prompt p0, the low-variance form draws l uniformly from
1..L, masks exactly l answer positions uniformly at random and scores
    (L / l) * sum over masked i of log p(r0_i | p0, r_l),
whose expectation lower-bounds log p(r0 | p0). Each subset S of the answer therefore has weight
1 / (|S| * C(L, |S|)) -- the same weight the t-form gets with eps = 0.
"""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import combinations
from typing import NamedTuple

import torch
from torch import Tensor

from remask.diffusion.guidance import ModelFn, guided_logits
from remask.diffusion.masking import forward_mask, mask_exactly
from remask.errors import RemaskError

MAX_EXACT_LENGTH = 16


class LikelihoodEstimate(NamedTuple):
    log_likelihood: float  # estimate of the lower bound on log p(answer | prompt)
    stderr: float  # standard error of that estimate
    num_samples: int


def stratified_mask_counts(batch: int, length: int, *, generator: torch.Generator | None = None) -> Tensor:
    """(batch,) mask counts in 1..length: a random offset k ~ U{1..L}, then evenly spaced counts
    round(linspace(k, k + (b - 1) L / b)) wrapped into 1..L, so one batch spans the whole range."""
    device = generator.device if generator is not None else "cpu"
    k = int(torch.randint(1, length + 1, (1,), generator=generator, device=device))
    counts = torch.linspace(k, k + (batch - 1) * length / batch, batch, dtype=torch.float64).round().long()
    return (counts - 1) % length + 1


def token_log_probs(logits: Tensor, ids: Tensor) -> Tensor:
    """(B, T) log p(ids) under logits (B, T, V), in float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None]).squeeze(-1)


def estimate(terms: list[Tensor]) -> LikelihoodEstimate:
    values = torch.cat(terms).double()
    n = values.numel()
    stderr = values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("inf")
    return LikelihoodEstimate(values.mean().item(), stderr, n)


def check_mc(mc_num: int, batch_size: int) -> None:
    if batch_size <= 0 or mc_num <= 0 or mc_num % batch_size:
        raise RemaskError(f"mc_num ({mc_num}) must be a positive multiple of batch_size ({batch_size})")


@torch.no_grad()
def mc_log_likelihood(model_fn: ModelFn, prompt: Tensor, answer: Tensor, *, mask_id: int, mc_num: int = 128,
                      batch_size: int = 16, cfg_scale: float = 0.0,
                      generator: torch.Generator | None = None) -> LikelihoodEstimate:
    """Monte-Carlo lower bound on log p(answer | prompt) (eq. 14). prompt (P,), answer (A,).

    The standard error is the sample standard deviation of the per-row terms over sqrt(n);
    the stratified mask counts make the rows negatively correlated, so it is conservative.
    """
    check_mc(mc_num, batch_size)
    P, L = prompt.numel(), answer.numel()
    if L == 0:
        raise RemaskError("the answer is empty")
    seq = torch.cat([prompt, answer]).to(answer.device)[None, :].expand(batch_size, -1)  # (b, P + L)
    answer_mask = (torch.arange(P + L, device=seq.device) >= P)[None, :].expand(batch_size, -1)
    terms = []
    for _ in range(mc_num // batch_size):
        counts = stratified_mask_counts(batch_size, L, generator=generator).to(seq.device)
        noisy, masked = mask_exactly(seq, counts, mask_id=mask_id, maskable=answer_mask, generator=generator)
        logits = guided_logits(model_fn, noisy, ~answer_mask, cfg_scale, mask_id)  # prompt masked if uncond
        logp = (token_log_probs(logits, seq) * masked).sum(1)  # (b,)
        terms.append(logp * L / counts.to(logp.dtype))
    return estimate(terms)


@torch.no_grad()
def t_bound(model_fn: ModelFn, ids: Tensor, *, mask_id: int, mc_num: int = 128, batch_size: int = 16,
            eps: float = 1e-3, generator: torch.Generator | None = None) -> LikelihoodEstimate:
    """Monte-Carlo lower bound on log p(ids) of unconditional text (eq. 6): t ~ U(0, 1),
    p = (1 - eps) t + eps, term = (1 / p) * sum over masked i of log p(x_i | x_t). ids (T,)."""
    check_mc(mc_num, batch_size)
    seq = ids[None, :].expand(batch_size, -1)
    terms = []
    for _ in range(mc_num // batch_size):
        noisy, masked, p = forward_mask(seq, mask_id=mask_id, eps=eps, generator=generator)
        logp = (token_log_probs(model_fn(noisy, None), seq) * masked).sum(1)
        terms.append(logp / p[:, 0])
    return estimate(terms)


def _subsets(L: int) -> list[tuple[int, ...]]:
    if L > MAX_EXACT_LENGTH:
        raise RemaskError(f"exact enumeration is limited to {MAX_EXACT_LENGTH} positions, got {L}")
    return [s for size in range(1, L + 1) for s in combinations(range(L), size)]


def _enumerate(model_fn: ModelFn, seq: Tensor, offset: int, weight_of_size, mask_id: int, cfg_scale: float,
               chunk: int = 256) -> float:
    """sum over non-empty subsets S of positions offset.. of weight(|S|) * sum_{i in S} log p(x_i | x_S masked)."""
    L = seq.numel() - offset
    prompt_mask = torch.arange(seq.numel(), device=seq.device) < offset
    subsets = _subsets(L)
    total = 0.0
    for start in range(0, len(subsets), chunk):
        group = subsets[start:start + chunk]
        masked = torch.zeros(len(group), seq.numel(), dtype=torch.bool, device=seq.device)
        for row, s in enumerate(group):
            masked[row, [offset + i for i in s]] = True
        batch = seq[None, :].expand(len(group), -1)
        logits = guided_logits(model_fn, batch.masked_fill(masked, mask_id), prompt_mask, cfg_scale, mask_id)
        logp = (token_log_probs(logits, batch).double() * masked).sum(1)
        weights = torch.tensor([weight_of_size(len(s)) for s in group], dtype=torch.float64, device=seq.device)
        total += (weights * logp).sum().item()
    return total


@torch.no_grad()
def exact_log_likelihood_bound(model_fn: ModelFn, prompt: Tensor, answer: Tensor, *, mask_id: int,
                               cfg_scale: float = 0.0) -> float:
    """The exact expectation of mc_log_likelihood's term: every non-empty subset S of the L answer
    positions with weight 1 / (|S| C(L, |S|)). Refuses L > 16."""
    L = answer.numel()
    seq = torch.cat([prompt, answer]).to(answer.device)
    return _enumerate(model_fn, seq, prompt.numel(), lambda l: 1.0 / (l * math.comb(L, l)), mask_id, cfg_scale)


def t_form_weight(l: int, T: int, eps: float) -> float:
    """E_t[p^(l-1) (1-p)^(T-l)] for t ~ U(0,1), p = (1-eps) t + eps, i.e.
    (1/(1-eps)) * integral_eps^1 p^(l-1) (1-p)^(T-l) dp, expanded exactly in rationals."""
    e = Fraction(eps)
    m = T - l
    integral = sum(Fraction(math.comb(m, j) * (-1) ** j) * (1 - e ** (l + j)) / (l + j) for j in range(m + 1))
    return float(integral / (1 - e))


@torch.no_grad()
def exact_t_bound(model_fn: ModelFn, ids: Tensor, *, mask_id: int, eps: float = 1e-3) -> float:
    """The exact expectation of t_bound's term by enumerating every mask subset of ids (T,)."""
    T = ids.numel()
    return _enumerate(model_fn, ids, 0, lambda l: t_form_weight(l, T, eps), mask_id, 0.0)
