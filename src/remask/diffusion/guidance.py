"""Unsupervised classifier-free guidance (LLaDA, appendix B.3, eq. 16) and the model-call type.

The unconditional branch is the same sequence with every prompt position replaced by the
mask token; the guided logits are  uncond + (1 + w) * (cond - uncond).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# A model call: ids (B, T), attention_mask (B, T) or None -> logits (B, T, V).
ModelFn = Callable[[Tensor, Tensor | None], Tensor]


def guided_logits(model_fn: ModelFn, x: Tensor, prompt_mask: Tensor, cfg_scale: float, mask_id: int,
                  attention_mask: Tensor | None = None) -> Tensor:
    """Logits for `x` (B, L), guided with weight `cfg_scale` (0 = no guidance, one model call).

    `prompt_mask` (B, L) or (L,) is True on prompt positions: they are masked in the
    unconditional branch. Both branches run as one batch of 2B rows.
    """
    if cfg_scale == 0:
        return model_fn(x, attention_mask)
    uncond_x = x.masked_fill(prompt_mask.expand_as(x), mask_id)
    both = torch.cat([x, uncond_x])  # (2B, L)
    mask2 = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    cond, uncond = model_fn(both, mask2).chunk(2)
    return uncond + (cfg_scale + 1.0) * (cond - uncond)
