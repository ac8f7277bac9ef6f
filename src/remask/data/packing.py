"""Fixed-length packed batches, as a pure function of (seed, step).

The token stream (documents already separated by BOS/EOS) is cut into fixed chunks; each epoch
visits every chunk once in an order drawn from (seed, epoch). Because a batch depends only on
(seed, step), a resumed run's data position is its step, and every distributed rank can
compute the global batch and take its own rows.
"""

from __future__ import annotations

import enum
import hashlib

import numpy as np
import torch

from remask.errors import RemaskError


@enum.unique
class Stream(enum.IntEnum):
    """The independent random streams of training. Each draws from step_seed(seed, step, stream);
    `unique` makes two streams sharing a number an import-time error."""

    MASKS = 1  # training masks (the forward process), drawn for the whole global batch of a step
    VALIDATION = 2  # validation masks: the same at every validation
    EPOCH_ORDER = 3  # the order of pretraining chunks in an epoch ("step" is the epoch)
    SFT_ORDER = 5  # the order of SFT examples in an epoch ("step" is the epoch)
    SHORT_LENGTH = 7  # whether a step's batch is short, and its length (LLaDA's 1%)


def step_seed(seed: int, step: int, stream: Stream) -> int:
    """A 63-bit seed hashed from (seed, step, stream)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{int(stream)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, stream: Stream) -> torch.Generator:
    """A CPU generator for one step's randomness (masks, lengths), identical on every rank."""
    return torch.Generator().manual_seed(step_seed(seed, step, stream))


def short_length(step: int, *, seed: int, seq_len: int, prob: float = 0.01) -> int:
    """LLaDA section 2.3: a fraction `prob` of pretraining batches get a length drawn
    uniformly from 1..seq_len; the rest keep seq_len."""
    rng = np.random.default_rng(step_seed(seed, step, Stream.SHORT_LENGTH))
    if rng.random() >= prob:
        return seq_len
    return int(rng.integers(1, seq_len + 1))


class PackedBatches:
    """Batches of `batch_size` chunks of `seq_len` tokens, epoch by epoch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, *, seed: int) -> None:
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        if self.num_chunks < 1:
            raise RemaskError(f"the corpus has {len(tokens)} training tokens, fewer than one sequence of {seq_len}")
        self._orders: dict[int, np.ndarray] = {}

    @property
    def num_chunks(self) -> int:
        return len(self.tokens) // self.seq_len

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng(step_seed(self.seed, epoch, Stream.EPOCH_ORDER)).permutation(self.num_chunks)
        return self._orders[epoch]

    def chunk_ids(self, step: int) -> list[int]:
        first = step * self.batch_size
        return [int(self.order(i // self.num_chunks)[i % self.num_chunks]) for i in range(first, first + self.batch_size)]

    def batch(self, step: int) -> torch.Tensor:
        """(batch_size, seq_len) int64: rows step*B .. step*B+B-1 of the epoch orders."""
        S = self.seq_len
        rows = [np.asarray(self.tokens[c * S:(c + 1) * S], dtype=np.int64) for c in self.chunk_ids(step)]
        return torch.from_numpy(np.stack(rows))

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.num_chunks
