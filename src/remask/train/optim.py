"""AdamW with decay on matrices only, and LLaDA's warmup-stable-decay learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the linear layers' matrices; none on norms and embeddings (LLaDA section
    2.3 uses weight decay 0.1; norms and embeddings are conventionally exempt)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.endswith("wte.weight")
        (no_decay if p.dim() < 2 or is_embedding else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8) -> torch.optim.AdamW:
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=fused or None)


def wsd_lr(step: int, *, max_steps: int, peak: float, warmup_steps: int, decay_fraction: float,
           min_ratio: float) -> float:
    """Warmup-stable-decay (LLaDA section 2.3): linear warmup from 0 to `peak` over
    `warmup_steps`, constant, then over the last `decay_fraction` of training a linear decay
    to `peak * min_ratio` (LLaDA: 4e-4 stable, then down to 1e-5)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, round(decay_fraction * max_steps)) if decay_fraction > 0 else 0
    decay_start = max_steps - decay_steps
    if decay_steps == 0 or step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return peak * (1.0 - (1.0 - min_ratio) * progress)


def scheduled_lr(optim, step: int) -> float:
    """The learning rate of `step` under an OptimConfig's warmup-stable-decay schedule."""
    return wsd_lr(step, max_steps=optim.max_steps, peak=optim.lr, warmup_steps=optim.warmup_steps,
                  decay_fraction=optim.decay_fraction, min_ratio=optim.min_lr_ratio)


def shared_steps(a, b) -> int:
    """How many first steps two OptimConfigs train alike: where they differ in `max_steps` alone, the
    steps before the first whose learning rates part (where the earlier decay starts); 0 where any
    other setting differs. A checkpoint at step s <= this of a run under one is a checkpoint of a run
    under the other, so a run can be lengthened (or shortened) from it."""
    if a.replace(max_steps=b.max_steps) != b:
        return 0
    common = min(a.max_steps, b.max_steps)
    return next((s for s in range(common) if scheduled_lr(a, s) != scheduled_lr(b, s)), common)
