"""LLaDA's reverse-process sampler: settings, schedule, remasking scores and `generate`."""

from remask.sampling.config import EosMode, SamplerConfig
from remask.sampling.generate import StepInfo, answers_ended, generate
from remask.sampling.remasking import REMASKING, RemaskingName, ScoreFn, gumbel_argmax
from remask.sampling.schedule import block_slices, num_transfer_tokens

__all__ = [
    "REMASKING",
    "EosMode",
    "RemaskingName",
    "SamplerConfig",
    "ScoreFn",
    "StepInfo",
    "answers_ended",
    "block_slices",
    "generate",
    "gumbel_argmax",
    "num_transfer_tokens",
]
