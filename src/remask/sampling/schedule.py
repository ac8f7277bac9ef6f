"""Where the blocks lie and how many tokens each step reveals (LLaDA, appendix B.2 and B.3)."""

from __future__ import annotations

import torch
from torch import Tensor

from remask.errors import RemaskError


def block_slices(prompt_len: int, gen_length: int, block_length: int) -> list[slice]:
    """Absolute position ranges of the answer blocks, left to right (semi-autoregressive
    remasking, B.3): block i covers prompt_len + i*block_length .. + block_length."""
    if block_length <= 0 or gen_length % block_length != 0:
        raise RemaskError(f"gen_length ({gen_length}) must be divisible by block_length ({block_length})")
    starts = range(prompt_len, prompt_len + gen_length, block_length)
    return [slice(start, start + block_length) for start in starts]


def num_transfer_tokens(mask_index: Tensor, steps: int) -> Tensor:
    """Tokens to reveal per step, (B, steps) int64, from `mask_index` (B, N) bool.

    The linear schedule alpha_t = 1 - t (eq. 8) reveals the same expected number of tokens at
    each of `steps` equal time intervals; a row with m masks gets m // steps per step and the
    remainder m % steps one each over the first steps, so every row sums to its m exactly.
    """
    if steps <= 0:
        raise RemaskError(f"steps must be a positive integer, got {steps}")
    m = mask_index.sum(dim=1, keepdim=True).long()  # (B, 1)
    step = torch.arange(steps, device=mask_index.device)[None, :]  # (1, S)
    return m // steps + (step < m % steps).long()  # (B, S)
