"""Token choice and remasking scores for the reverse process (LLaDA, section 2.4, appendix B.2).

Every score is (B, L) float64 where HIGHER means more confident: the sampler reveals the
highest-scoring masked positions first and leaves the rest masked ("remasks" them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

# logits (B, L, V), predicted tokens x0 (B, L), generator -> score (B, L) float64.
ScoreFn = Callable[[Tensor, Tensor, torch.Generator | None], Tensor]


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) float64 of `shape` on `device`, drawn from `generator` on the generator's own device."""
    source = device if generator is None else generator.device
    return torch.rand(shape, generator=generator, device=source, dtype=torch.float64).to(device)


def gumbel_argmax(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """Sample x0 (B, L) from softmax(logits / temperature); temperature 0 is plain argmax.

    Gumbel-max in float64 (low-precision Gumbel noise degrades MDM samples, arXiv 2409.02908):
    argmax(logits / T + g), g = -log(-log u), which has the same law as LLaDA's
    argmax(exp(logits) / (-log u)^T).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    tiny = torch.finfo(torch.float64).tiny
    u = uniform(tuple(logits.shape), generator, logits.device).clamp(tiny, 1.0 - torch.finfo(torch.float64).eps)
    gumbel = -torch.log(-torch.log(u))  # (B, L, V)
    return (logits.double() / temperature + gumbel).argmax(dim=-1)


def low_confidence(logits: Tensor, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """p(x0) under softmax of the unperturbed logits (Algorithm 5's low-confidence remasking)."""
    probs = logits.double().softmax(dim=-1)  # (B, L, V)
    return probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)


def random_score(logits: Tensor, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """U(0, 1) per position: random remasking (Algorithm 4), independent of the prediction."""
    return uniform(tuple(x0.shape), generator, x0.device)


def margin(logits: Tensor, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Top-1 minus top-2 probability: a decisive prediction is revealed first."""
    top = logits.double().softmax(dim=-1).topk(2, dim=-1).values  # (B, L, 2)
    return top[..., 0] - top[..., 1]


def neg_entropy(logits: Tensor, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Minus the entropy of softmax(logits): a peaked distribution is revealed first."""
    probs = logits.double().softmax(dim=-1)
    return torch.special.xlogy(probs, probs).sum(dim=-1)  # sum p log p, with 0 log 0 = 0


REMASKING: dict[str, ScoreFn] = {
    "low_confidence": low_confidence,
    "random": random_score,
    "margin": margin,
    "entropy": neg_entropy,
}
# The strategy names as a type, built from the table: a strategy added above is a valid setting
# and a CLI choice everywhere without another edit.
RemaskingName = Literal[tuple(REMASKING)]  # type: ignore[valid-type]
