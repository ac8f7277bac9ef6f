"""Conditional log-likelihoods log p(continuation | context), the one primitive every evaluation
uses (perplexity, choice tasks, the lm-evaluation-harness model).

- The AR twin (`config.causal`): exact, the sum of next-token log-probabilities; many requests
  share one batched forward pass.
- The diffusion model: the lower bound of LLaDA eq. (6)/(14), computed exactly by enumerating
  every mask subset when that costs no more forward rows than sampling would (2^L - 1 <= mc_num:
  a one-token answer is a single masked position), otherwise estimated by Monte Carlo with its
  standard error (`diffusion.mc_log_likelihood`).
- A block diffusion model: the NELBO, a sum over the continuation's blocks (starting on a block
  boundary) of each block's bound given the clean blocks before it; exact by enumeration when
  that is no dearer than sampling, else by Monte Carlo (`diffusion.block`).

A context longer than the model's window keeps its end.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from remask.config import ConfigBase, setting
from remask.diffusion import exact_log_likelihood_bound, mc_log_likelihood
from remask.diffusion.block import block_log_likelihood, exact_block_bound
from remask.diffusion.likelihood import MAX_EXACT_LENGTH, token_log_probs
from remask.errors import RemaskError
from remask.model import Transformer


@dataclass(frozen=True)
class ScoringConfig(ConfigBase):
    """How log-likelihoods are computed."""

    mc_num: int = setting(128, gt=0)
    """Monte-Carlo samples per diffusion-model estimate (rounded up to a multiple of batch_size)."""
    batch_size: int = setting(32, gt=0)
    """Rows per forward pass (mask draws for the diffusion model, sequences for the AR twin)."""
    cfg_scale: float = setting(0.0, ge=0)
    """Classifier-free guidance weight for the diffusion model's likelihood (LLaDA eq. 16); 0 is off."""
    seed: int = setting(0, ge=0, lt=2**63)
    """Seed of the Monte-Carlo mask draws."""


@dataclass(frozen=True)
class Score:
    log_likelihood: float  # nats; for the diffusion model a lower bound on log p
    stderr: float  # standard error of the estimate (0 when computed exactly)
    num_samples: int  # Monte-Carlo samples behind it (0 when exact)
    tokens: int  # continuation tokens scored

    @property
    def exact(self) -> bool:
        return self.num_samples == 0


class Scorer:
    """log p(continuation | context) for one model; see the module doc."""

    def __init__(self, model: Transformer, *, mask_id: int | None, bos_id: int | None,
                 scoring: ScoringConfig = ScoringConfig()) -> None:
        self.model, self.scoring = model, scoring
        self.causal = model.config.causal
        if not self.causal and mask_id is None:
            raise RemaskError("a diffusion model needs a mask token to be scored; its tokenizer has none")
        block = model.config.attention == "block"
        if block and scoring.cfg_scale:
            raise RemaskError("a block model's likelihood takes no classifier-free guidance (cfg_scale 0)")
        self.mask_id, self.bos_id = mask_id, bos_id
        self.block_length = model.config.block_length if block else None
        # A block model's rows are shifted onto its block grid: up to block_length - 1 positions.
        self.max_len = model.config.max_sequence_length - (self.block_length - 1 if block else 0)
        self.device = next(model.parameters()).device

    def model_fn(self, ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.model(ids, attention_mask)[..., : self.model.config.vocab_size]

    def fit(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[list[int], list[int]]:
        """Context and continuation as lists, the context cut from the left to fit the window; the
        AR twin needs at least one context token to predict the first one (BOS is used)."""
        context, continuation = list(context), list(continuation)
        if not continuation:
            raise RemaskError("the continuation to score is empty")
        if len(continuation) > self.max_len - (1 if self.causal else 0):
            raise RemaskError(f"a continuation of {len(continuation)} tokens does not fit the model's context "
                              f"of {self.max_len}")
        if self.causal and not context:
            if self.bos_id is None:
                raise RemaskError("the AR twin needs a context token before the first scored one (no BOS token)")
            context = [self.bos_id]
        room = self.max_len - len(continuation)
        return context[len(context) - room:] if len(context) > room else context, continuation

    @torch.no_grad()
    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Score]:
        """One Score per (context ids, continuation ids) request, in order."""
        fitted = [self.fit(c, x) for c, x in requests]
        if self.causal:
            return self._score_causal(fitted)
        return [(self._score_diffusion if self.block_length is None else self._score_block)(c, x) for c, x in fitted]

    def _score_causal(self, requests: list[tuple[list[int], list[int]]]) -> list[Score]:
        out: list[Score | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))  # similar lengths together
        for start in range(0, len(order), self.scoring.batch_size):
            chunk = order[start:start + self.scoring.batch_size]
            seqs = [requests[i][0] + requests[i][1] for i in chunk]
            width = max(map(len, seqs))
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            for row, seq in enumerate(seqs):  # right padding: a causal model never looks ahead
                ids[row, :len(seq)] = torch.tensor(seq)
            ids = ids.to(self.device)
            logp = token_log_probs(self.model_fn(ids, None)[:, :-1], ids[:, 1:]).double()  # (B, W-1)
            for row, i in enumerate(chunk):
                context, continuation = requests[i]
                lo = len(context) - 1  # logits at position j predict token j + 1
                value = logp[row, lo:lo + len(continuation)].sum().item()
                out[i] = Score(value, 0.0, 0, len(continuation))
        return out  # type: ignore[return-value]

    def _score_diffusion(self, context: list[int], continuation: list[int]) -> Score:
        prompt = torch.tensor(context, dtype=torch.long, device=self.device)
        answer = torch.tensor(continuation, dtype=torch.long, device=self.device)
        L, s = len(continuation), self.scoring
        if L <= MAX_EXACT_LENGTH and 2**L - 1 <= s.mc_num:
            value = exact_log_likelihood_bound(self.model_fn, prompt, answer, mask_id=self.mask_id,
                                               cfg_scale=s.cfg_scale)
            return Score(value, 0.0, 0, L)
        est = mc_log_likelihood(self.model_fn, prompt, answer, mask_id=self.mask_id, mc_num=self.mc_num,
                                batch_size=s.batch_size, cfg_scale=s.cfg_scale,
                                generator=self.request_generator(context, continuation))
        return Score(est.log_likelihood, est.stderr, est.num_samples, L)

    @property
    def mc_num(self) -> int:
        return math.ceil(self.scoring.mc_num / self.scoring.batch_size) * self.scoring.batch_size

    def request_generator(self, context: list[int], continuation: list[int]) -> torch.Generator:
        """Masks drawn from (seed, request): a score never depends on the order or batching of requests."""
        key = hashlib.blake2b(repr((self.scoring.seed, context, continuation)).encode(), digest_size=8).digest()
        return torch.Generator(device=self.device).manual_seed(int.from_bytes(key, "little") >> 1)

    def _score_block(self, context: list[int], continuation: list[int]) -> Score:
        prompt = torch.tensor(context, dtype=torch.long, device=self.device)
        answer = torch.tensor(continuation, dtype=torch.long, device=self.device)
        L, B, V = len(continuation), self.block_length, self.model.config.vocab_size
        sizes = [min(B, L - a) for a in range(0, L, B)]
        if max(sizes) <= MAX_EXACT_LENGTH and sum(2**n - 1 for n in sizes) <= self.scoring.mc_num:
            value = exact_block_bound(self.model, prompt, answer, B, mask_id=self.mask_id, vocab_size=V)
            return Score(value, 0.0, 0, L)
        est = block_log_likelihood(self.model, prompt, answer, B, mask_id=self.mask_id, mc_num=self.mc_num,
                                   batch_size=self.scoring.batch_size, vocab_size=V,
                                   generator=self.request_generator(context, continuation))
        return Score(est.log_likelihood, est.stderr, est.num_samples, L)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (good at 0, 1 and small n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
