"""Sampler settings: one frozen dataclass, validated on construction (LLaDA, appendix B.2/B.3).

Every command that samples (generate, chat, eval, serve) takes all of these fields as options
under the same names, so a new setting is added here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from remask.config import ConfigBase, setting
from remask.sampling.remasking import RemaskingName

EosMode = Literal["allow", "forbid", "delay"]
CacheMode = Literal["none", "prefix", "dual"]
ParallelRule = Literal["schedule", "threshold", "factor", "entropy"]


@dataclass(frozen=True)
class SamplerConfig(ConfigBase):
    """Reverse-process settings. `block_length=None` means one block of `gen_length`
    (pure diffusion); smaller blocks give LLaDA's semi-autoregressive remasking (B.3)."""

    gen_length: int = setting(128, gt=0)
    """Answer positions to fill: the longest answer (it may end sooner, at an end-of-text)."""
    steps: int = setting(128, gt=0)
    """Sampling steps in total, divided evenly among the blocks."""
    block_length: int | None = setting(None, gt=0)
    """Semi-autoregressive block length (None: one block of gen_length). A block diffusion model
    decodes in its own blocks and always with its exact cache: block_length and cache do not apply."""
    temperature: float = setting(0.0, ge=0)
    """Gumbel-max sampling temperature; 0 is greedy."""
    remasking: RemaskingName = "low_confidence"
    """Which predictions each step keeps; the rest are masked again."""
    cfg_scale: float = setting(0.0, ge=0)
    """Classifier-free guidance weight (unconditional branch: prompt fully masked); 0 is off."""
    eos: EosMode = "allow"
    """End-of-text: sampled like any token (allow), never sampled (forbid), or revealed last in a block (delay)."""
    stop_at_eos: bool = True
    """End the answer at the first end-of-text once everything before it is revealed."""
    anchor_eos: bool = False
    """Fix the answer's last position to end-of-text before denoising: the model then writes a text
    that ends within gen_length (what EOS-padded training learned), not one cut off at the limit."""
    cache: CacheMode = "none"
    """KV cache, refreshed at each block boundary: none (exact), prefix (prompt and finished blocks),
    dual (the masked suffix too)."""
    parallel: ParallelRule = "schedule"
    """Tokens revealed per step: the linear schedule, or by confidence threshold, the factor rule or
    an entropy bound (steps then caps the steps; each step reveals at least one)."""
    threshold: float = setting(0.9, gt=0, le=1)
    """parallel threshold: reveal every masked token predicted with at least this probability."""
    factor: float = setting(1.0, gt=0)
    """parallel factor: reveal the n most confident with (n + 1) (1 - p_n) < factor."""
    entropy_bound: float = setting(0.5, ge=0)
    """parallel entropy: reveal the least uncertain tokens while their entropy, less the largest, stays below this."""

    def check(self) -> None:
        self.need(self.gen_length % self.effective_block_length == 0, "gen_length",
                  f"({self.gen_length}) must be divisible by block_length ({self.effective_block_length})")
        self.need(self.steps % self.num_blocks == 0, "steps",
                  f"({self.steps}) must be divisible by the number of blocks ({self.num_blocks})")
        self.need(not (self.anchor_eos and self.eos == "forbid"), "anchor_eos",
                  "cannot be combined with eos forbid (the anchor is an end-of-text)")
        self.need(not self.anchor_eos or self.gen_length >= 2, "anchor_eos",
                  f"needs gen_length >= 2 (got {self.gen_length}): the anchor takes the last position")
        self.need(self.steps <= self.gen_length, "steps", f"({self.steps}) must be <= gen_length ({self.gen_length})")

    @property
    def effective_block_length(self) -> int:
        """block_length with None resolved to gen_length (one block)."""
        return self.gen_length if self.block_length is None else self.block_length

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.effective_block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks
