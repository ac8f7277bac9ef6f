"""Training losses: LLaDA's pretraining (eq. 3) and SFT (eq. 5) objectives and the AR twin's
next-token loss. Logits of any float dtype; cross-entropy computed in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_token_nll(logits: Tensor, targets: Tensor, masked: Tensor) -> Tensor:
    """(B, T) negative log-likelihood of `targets` at masked positions, 0 elsewhere."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, T)
    return nll * masked


def mdm_loss(logits: Tensor, targets: Tensor, masked: Tensor, p: Tensor) -> Tensor:
    """Pretraining loss, eq. (3): sum over masked positions of CE / p, divided by B * T (every
    position, as LLaDA's code does). An unbiased estimate of the per-token NLL upper bound."""
    B, T = targets.shape
    return (masked_token_nll(logits, targets, masked) / p).sum() / (B * T)


def sft_loss(logits: Tensor, targets: Tensor, masked: Tensor, p: Tensor, answer_lengths: Tensor) -> Tensor:
    """SFT loss, eq. (5) as LLaDA trains it: per sample, sum over masked answer positions of CE / p
    divided by that sample's answer length (EOS padding included), then the mean over the batch."""
    per_sample = (masked_token_nll(logits, targets, masked) / p).sum(1)  # (B,)
    return (per_sample / answer_lengths.to(per_sample.dtype)).mean()


def ar_loss(logits: Tensor, ids: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy of the AR twin: logits[:, :-1] predict ids[:, 1:]. `loss_mask`
    (B, T) marks the target positions that count (e.g. SFT answers); the mean is over those."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
    weight = torch.ones_like(nll) if loss_mask is None else loss_mask[:, 1:].to(nll.dtype)
    # A one-token batch (LLaDA's random-length batches can be that short) has no target: loss 0.
    return (nll * weight).sum() / weight.sum().clamp_min(1.0)
