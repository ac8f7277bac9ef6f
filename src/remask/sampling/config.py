"""Sampler settings: one frozen dataclass, validated on construction (LLaDA, appendix B.2/B.3)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from remask.config import ConfigError, from_known_keys
from remask.sampling.remasking import REMASKING

EOS_MODES = ("allow", "forbid", "delay")


@dataclass(frozen=True)
class SamplerConfig:
    """Reverse-process settings. `block_length=None` means one block of `gen_length`
    (pure diffusion); smaller blocks give LLaDA's semi-autoregressive remasking (B.3).

    `eos`: "allow" samples end-of-text like any token, "forbid" never samples it, "delay"
    reveals it only after every other masked position of the block.
    """

    gen_length: int = 128
    steps: int = 128
    block_length: int | None = None
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    eos: Literal["allow", "forbid", "delay"] = "allow"

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("gen_length", "steps", "block_length"):
            value = getattr(self, name)
            if name == "block_length" and value is None:
                continue
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        need(self.gen_length % self.block_size == 0,
             f"gen_length ({self.gen_length}) must be divisible by block_length ({self.block_size})")
        need(self.steps % self.num_blocks == 0,
             f"steps ({self.steps}) must be divisible by the number of blocks ({self.num_blocks})")
        need(self.steps <= self.gen_length, f"steps ({self.steps}) must be <= gen_length ({self.gen_length})")
        for name in ("temperature", "cfg_scale"):
            value = getattr(self, name)
            # `not value >= 0` also rejects NaN.
            need(isinstance(value, int | float) and not isinstance(value, bool) and value >= 0,
                 f"{name} must be a number >= 0, got {value!r}")
        need(self.remasking in REMASKING,
             f"unknown remasking {self.remasking!r}; choose from {', '.join(REMASKING)}")
        need(self.eos in EOS_MODES, f"unknown eos mode {self.eos!r}; choose from {', '.join(EOS_MODES)}")

    @property
    def block_size(self) -> int:
        """The block length in effect (`gen_length` when `block_length` is None)."""
        return self.gen_length if self.block_length is None else self.block_length

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_size

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplerConfig:
        return from_known_keys(cls, data, "sampler config")

    def replace(self, **changes: Any) -> SamplerConfig:
        return dataclasses.replace(self, **changes)
