"""LLaDA's reverse-process sampler: settings, schedule, remasking scores and `generate`."""

from remask.sampling.config import EOS_MODES, SamplerConfig
from remask.sampling.generate import RevealRecorder, StepInfo, generate
from remask.sampling.remasking import REMASKING, ScoreFn, gumbel_argmax
from remask.sampling.schedule import block_slices, num_transfer_tokens

__all__ = [
    "EOS_MODES",
    "REMASKING",
    "RevealRecorder",
    "SamplerConfig",
    "ScoreFn",
    "StepInfo",
    "block_slices",
    "generate",
    "gumbel_argmax",
    "num_transfer_tokens",
]
