"""Masked-diffusion math as pure functions on tensors (LLaDA, arXiv 2502.09992)."""

from remask.diffusion.guidance import ModelFn, guided_logits
from remask.diffusion.likelihood import (
    LikelihoodEstimate,
    exact_log_likelihood_bound,
    exact_t_bound,
    mc_log_likelihood,
    stratified_mask_counts,
    t_bound,
)
from remask.diffusion.loss import ar_loss, mdm_loss, sft_loss
from remask.diffusion.masking import MaskedBatch, forward_mask, mask_exactly, mask_probability, sample_t, stratified_t

__all__ = [
    "LikelihoodEstimate", "MaskedBatch", "ModelFn", "ar_loss", "exact_log_likelihood_bound", "exact_t_bound",
    "forward_mask", "guided_logits", "mask_exactly", "mask_probability", "mc_log_likelihood", "mdm_loss",
    "sample_t", "sft_loss", "stratified_mask_counts", "stratified_t", "t_bound",
]
