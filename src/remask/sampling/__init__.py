"""LLaDA's reverse-process sampler: settings, schedule, remasking scores and `generate`."""

from remask.sampling.autoregressive import ar_generate
from remask.sampling.config import EosMode, SamplerConfig
from remask.sampling.generate import StepInfo, answers_ended, fill_masks, generate
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
    "ar_generate",
    "fill_masks",
    "block_slices",
    "generate",
    "gumbel_argmax",
    "num_transfer_tokens",
]
