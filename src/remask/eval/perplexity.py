"""Perplexity on held-out text: a diffusion model's bound on the NLL (a block model's NELBO), with
its standard error, or the AR twin's exact NLL, in nats/token and bits/byte, so models with different tokenizers
compare.

A document is scored after the BOS token (pretraining starts every document with it) in windows:
each window scores `stride` new tokens given up to `max_sequence_length - stride` tokens before
them, so every token is scored once and a document longer than the context still counts whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from remask.errors import RemaskError
from remask.eval.scoring import Scorer
from remask.tokenizer import Tokenizer


def rolling_windows(ids: list[int], prefix: list[int], max_len: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs covering `ids` once, in order: continuations of `stride`
    tokens (the last may be shorter), each after up to max_len - stride preceding tokens
    (`prefix` before the first)."""
    if not 0 < stride <= max_len:
        raise RemaskError(f"stride must be in 1..{max_len} (the model's context), got {stride}")
    whole = prefix + ids
    out = []
    for start in range(0, len(ids), stride):
        end = min(start + stride, len(ids))
        lo = len(prefix) + start
        out.append((whole[max(0, lo - (max_len - (end - start))):lo], ids[start:end]))
    return out


@dataclass
class Perplexity:
    nll: float  # total negative log-likelihood in nats (an upper bound for the diffusion model)
    stderr: float  # of nll (0 when every window was exact)
    tokens: int
    bytes: int
    documents: int
    windows: int
    mc_samples: int  # Monte-Carlo samples per estimated window (0: all exact)
    bound: bool  # True for a diffusion model's bound
    block_length: int | None = None  # a block diffusion model's: its bound is the NELBO over its blocks

    def report(self) -> dict:
        return {
            "nats_per_token": self.nll / self.tokens,
            "nats_per_token_stderr": self.stderr / self.tokens,
            "bits_per_byte": self.nll / (math.log(2) * self.bytes),
            "bits_per_byte_stderr": self.stderr / (math.log(2) * self.bytes),
            "perplexity": math.exp(min(self.nll / self.tokens, 50.0)),
            "tokens": self.tokens, "bytes": self.bytes, "documents": self.documents, "windows": self.windows,
            "mc_samples_per_window": self.mc_samples,
            "measure": ("exact NLL (autoregressive)" if not self.bound else "upper bound on the NLL (diffusion)"
                        if self.block_length is None else f"upper bound on the NLL (block diffusion, blocks of {self.block_length})"),
        }


def perplexity(scorer: Scorer, tokenizer: Tokenizer, documents: list[str], *, stride: int | None = None,
               progress: Callable[[int], None] | None = None) -> Perplexity:
    """Score every token of every document; `progress(n)` is told after each batch of n windows."""
    max_len = scorer.max_len
    stride = max_len // 2 if stride is None else stride
    prefix = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    requests, nbytes = [], 0
    for i, doc in enumerate(documents):
        ids = tokenizer.encode(doc, where=f"document {i}")
        if not ids:
            continue
        requests += rolling_windows(ids, prefix, max_len, stride)
        nbytes += len(doc.encode("utf-8"))
    if not requests:
        raise RemaskError("the text holds no token to score")
    scores = []
    step = max(1, scorer.scoring.batch_size if scorer.causal else 1)
    for start in range(0, len(requests), step):
        scores += scorer.score(requests[start:start + step])
        if progress is not None:
            progress(len(requests[start:start + step]))
    return Perplexity(
        nll=-sum(s.log_likelihood for s in scores),
        stderr=math.sqrt(sum(s.stderr**2 for s in scores)),
        tokens=sum(s.tokens for s in scores), bytes=nbytes, documents=len(documents), windows=len(scores),
        mc_samples=max(s.num_samples for s in scores), bound=not scorer.causal, block_length=scorer.block_length)
