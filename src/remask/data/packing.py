"""Fixed-length training sequences and their batches, as a pure function of (seed, step).

The token stream (documents already separated by BOS/EOS) becomes sequences of seq_len tokens in
one of three ways: `concat` cuts the stream into fixed chunks (LLaDA's pretraining), `shift` cuts
it the same way at a fresh offset every epoch (so a text is not always read in the same chunk,
after the same context: a model that sees a corpus many times then learns its texts, not its
chunks), `pad` gives
each document its own sequences and fills the last one with end-of-text, so the model learns
where a text ends (as LLaDA's SFT pads answers; MDLM pads its short-sentence corpus the same
way). Each epoch visits every sequence once in an order drawn from (seed, epoch). Because a batch depends only on
(seed, step), a resumed run's data position is its step, and every distributed rank can
compute the global batch and take its own rows.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Literal

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
    CHUNK_OFFSET = 11  # where packing 'shift' cuts the stream in an epoch ("step" is the epoch)


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


Packing = Literal["concat", "shift", "pad"]


def chunk_rows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """(N, seq_len) view of the stream cut into whole chunks (the tail shorter than one is left out)."""
    n = len(tokens) // seq_len
    if n < 1:
        raise RemaskError(f"the corpus has {len(tokens)} training tokens, fewer than one sequence of {seq_len}")
    return tokens[:n * seq_len].reshape(n, seq_len)


def document_rows(tokens: np.ndarray, seq_len: int, *, bos_id: int, eos_id: int) -> np.ndarray:
    """(N, seq_len): each document (from one BOS to the next) cut into sequences, the last one
    filled with `eos_id`."""
    if len(tokens) == 0:
        raise RemaskError("the corpus has no training tokens")
    tokens = np.asarray(tokens)
    starts = np.flatnonzero(tokens == bos_id)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    rows = []
    for a, b in zip(starts, [*starts[1:], len(tokens)]):
        doc = tokens[a:b]
        for c in range(0, len(doc), seq_len):
            row = np.full(seq_len, eos_id, dtype=tokens.dtype)
            piece = doc[c:c + seq_len]
            row[:len(piece)] = piece
            rows.append(row)
    return np.stack(rows)


class ShiftedChunks:
    """The stream read as a ring and cut into len(tokens) // seq_len chunks starting at an offset
    drawn from (seed, epoch): row c of epoch e is tokens[offset_e + c * seq_len ...] (wrapping at
    the end, where the last document's EOS meets the first one's BOS). Rows are read on demand."""

    def __init__(self, tokens: np.ndarray, seq_len: int, *, seed: int) -> None:
        self.count = len(chunk_rows(tokens, seq_len))  # checks the stream holds one sequence
        self.tokens, self.seed, self.shape = tokens, seed, (self.count, seq_len)

    def __len__(self) -> int:
        return self.count

    def offset(self, epoch: int) -> int:
        rng = np.random.default_rng(step_seed(self.seed, epoch, Stream.CHUNK_OFFSET))
        return int(rng.integers(len(self.tokens)))

    def row(self, epoch: int, chunk: int) -> np.ndarray:
        start = self.offset(epoch) + chunk * self.shape[1]
        return np.take(self.tokens, np.arange(start, start + self.shape[1]), mode="wrap")


def training_rows(tokens: np.ndarray, seq_len: int, packing: Packing, *, bos_id: int | None,
                  eos_id: int | None, seed: int = 0) -> np.ndarray | ShiftedChunks:
    if packing == "concat":
        return chunk_rows(tokens, seq_len)
    if packing == "shift":
        return ShiftedChunks(tokens, seq_len, seed=seed)
    if bos_id is None or eos_id is None:
        raise RemaskError("packing 'pad' needs a tokenizer with BOS and EOS tokens")
    return document_rows(tokens, seq_len, bos_id=bos_id, eos_id=eos_id)


class PackedBatches:
    """Batches of `batch_size` training sequences (rows of `rows`, or of an epoch's `ShiftedChunks`),
    epoch by epoch."""

    def __init__(self, rows: np.ndarray | ShiftedChunks, batch_size: int, *, seed: int) -> None:
        self.rows, self.seq_len, self.batch_size, self.seed = rows, rows.shape[1], batch_size, seed
        self._orders: dict[int, np.ndarray] = {}

    @property
    def num_chunks(self) -> int:
        return len(self.rows)

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng(step_seed(self.seed, epoch, Stream.EPOCH_ORDER)).permutation(self.num_chunks)
        return self._orders[epoch]

    def positions(self, step: int) -> list[tuple[int, int]]:
        """(epoch, chunk) of each row of the step's batch."""
        first = step * self.batch_size
        return [(i // self.num_chunks, int(self.order(i // self.num_chunks)[i % self.num_chunks]))
                for i in range(first, first + self.batch_size)]

    def chunk_ids(self, step: int) -> list[int]:
        return [chunk for _, chunk in self.positions(step)]

    def batch(self, step: int) -> torch.Tensor:
        """(batch_size, seq_len) int64: rows step*B .. step*B+B-1 of the epoch orders."""
        rows = self.rows
        read = (lambda e, c: rows.row(e, c)) if isinstance(rows, ShiftedChunks) else (lambda e, c: rows[c])
        return torch.from_numpy(np.stack([np.asarray(read(e, c), dtype=np.int64) for e, c in self.positions(step)]))

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.num_chunks
