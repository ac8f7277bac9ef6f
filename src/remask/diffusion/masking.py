"""The forward (masking) process of LLaDA (arXiv 2502.09992, section 2.1 and eq. 7).

Each token of a sequence is masked independently with probability t for t ~ U(0, 1); training
uses p = (1 - eps) t + eps so that no sequence goes unmasked (the eps of LLaDA's pretraining code).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class MaskedBatch(NamedTuple):
    noisy: Tensor  # (B, T) ids with masked positions set to mask_id
    masked: Tensor  # (B, T) bool
    p: Tensor  # (B, 1) float32: each sequence's mask probability


def sample_t(batch: int, *, generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> Tensor:
    """(B,) times t ~ U(0, 1), one per sequence."""
    return torch.rand(batch, generator=generator, device=device)


def stratified_t(batch: int, *, generator: torch.Generator | None = None,
                 device: str | torch.device = "cpu") -> Tensor:
    """(B,) times, one in each of the strata [i/B, (i+1)/B) at a shared random offset, in random
    order: each t is still U(0, 1), so the loss stays an unbiased estimate of the bound, but a
    batch covers the whole range of t evenly and the estimate's variance falls (the
    low-discrepancy sampler of MDLM, Sahoo et al. 2024)."""
    u = torch.rand(1, generator=generator, device=device)
    order = torch.randperm(batch, generator=generator, device=device)
    return (order.to(u.dtype) + u) / batch


def draw_t(n: int, *, t_range: tuple[float, float] = (0.0, 1.0), stratified: bool = False,
           generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> Tensor:
    """(n,) times uniform on `t_range` (a clipped range narrows [0, 1]), independent or stratified."""
    u = (stratified_t if stratified else sample_t)(n, generator=generator, device=device)
    lo, hi = t_range
    return u if (lo, hi) == (0.0, 1.0) else lo + (hi - lo) * u


def mask_probability(t: Tensor, eps: float = 1e-3) -> Tensor:
    """p = (1 - eps) t + eps: the masking rate at time t, bounded away from zero."""
    return (1.0 - eps) * t + eps


def forward_mask(ids: Tensor, *, mask_id: int, eps: float = 1e-3, maskable: Tensor | None = None,
                 t: Tensor | None = None, stratified: bool = False, t_range: tuple[float, float] = (0.0, 1.0),
                 generator: torch.Generator | None = None) -> MaskedBatch:
    """Mask each maskable token of `ids` (B, T) independently with its sequence's probability p
    (eq. 7). `maskable` (B, T) restricts masking (SFT: the response only); `t` (B,) fixes the times,
    else they are drawn on `t_range` independently or, with `stratified`, one per stratum.
    Random numbers are drawn on the generator's device and moved to `ids`' device."""
    B, T = ids.shape
    gen_device = generator.device if generator is not None else ids.device
    if t is None:
        t = draw_t(B, t_range=t_range, stratified=stratified, generator=generator, device=gen_device)
    p = mask_probability(t.float(), eps).to(ids.device)[:, None]  # (B, 1)
    u = torch.rand(B, T, generator=generator, device=gen_device).to(ids.device)  # (B, T)
    masked = u < p
    if maskable is not None:
        masked &= maskable.to(ids.device)
    return MaskedBatch(ids.masked_fill(masked, mask_id), masked, p)


def mask_exactly(ids: Tensor, counts: Tensor, *, mask_id: int, maskable: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Mask exactly counts[b] positions of row b, a uniformly random subset of its maskable
    positions (the l-form of the likelihood bound, appendix B.6). Returns (noisy, masked)."""
    B, T = ids.shape
    gen_device = generator.device if generator is not None else ids.device
    keys = torch.rand(B, T, generator=generator, device=gen_device).to(ids.device)  # random order
    if maskable is not None:
        if (maskable.sum(1) < counts.to(maskable.device)).any():
            raise ValueError("a row has fewer maskable positions than its mask count")
        keys = keys.masked_fill(~maskable.to(ids.device), 2.0)  # never among the first counts[b]
    rank = keys.argsort(dim=1).argsort(dim=1)  # (B, T) rank of each position in the random order
    masked = rank < counts.to(ids.device)[:, None]
    return ids.masked_fill(masked, mask_id), masked
