"""Encode a corpus once into memory-mapped token files with a held-out split, cached by content.

Layout of a cache entry (cache/<key>/): train.bin, val.bin (raw uint16 or uint32 tokens) and
meta.json. The key hashes the documents, the tokenizer and the split settings, so a re-run with
the same inputs maps the existing files instead of encoding again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from remask.atomic import atomic_dir
from remask.data.corpora import cache_dir
from remask.tokenizer import Tokenizer

FORMAT_VERSION = 1


@dataclass
class TokenSplits:
    train: np.ndarray  # 1-D read-only memmap
    val: np.ndarray
    meta: dict
    directory: Path


def docs_fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8")).digest())
    return h.hexdigest()


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest()


def corpus_tokenizer(source: str, docs: list[str], *, kind: str, vocab_size: int, cache: Path | None = None) -> Tokenizer:
    """A tokenizer trained on the corpus (kind char or bpe), cached by the corpus' content."""
    root = cache or cache_dir(check=True) / "tokenizers"
    key = hashlib.sha256(f"{docs_fingerprint(docs)}/{kind}/{vocab_size}".encode()).hexdigest()[:24]
    directory = root / key
    if (directory / "tokenizer.json").exists():
        return Tokenizer.from_dir(directory)
    tokenizer = Tokenizer.train(docs, kind=kind, vocab_size=vocab_size)
    with atomic_dir(directory, replace=False) as staging:  # another process may fill it first
        tokenizer.save(staging)
    return tokenizer


def is_validation(doc: str, val_fraction: float) -> bool:
    """A stable per-document choice: adding documents never moves the others."""
    bucket = int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "little") / 2**64
    return bucket < val_fraction


def encode_stream(docs: list[str], tokenizer: Tokenizer, progress: bool) -> list[list[int]]:
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    head = [bos] if bos is not None else []
    items = docs
    if progress:
        from tqdm import tqdm

        items = tqdm(docs, desc="encoding", unit="doc", leave=False)
    return [head + tokenizer.encode(d) + [eos] for d in items]


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[int], list[int]]:
    val = [i for i, d in enumerate(docs) if is_validation(d, val_fraction)]
    if len(docs) >= 2 and not val:  # at least one held-out document
        val = [min(range(len(docs)), key=lambda i: hashlib.sha256(docs[i].encode()).digest())]
    if len(val) == len(docs) and len(docs) >= 2:
        val = val[:-1]
    held = set(val)
    return [i for i in range(len(docs)) if i not in held], val


def write_array(path: Path, values: list[int], dtype: np.dtype) -> None:
    path.write_bytes(np.asarray(values, dtype=dtype).tobytes())


def open_array(path: Path, dtype: str) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def prepare_tokens(source: str, docs: list[str], tokenizer: Tokenizer, *, val_fraction: float = 0.05,
                   cache: Path | None = None, progress: bool = False) -> TokenSplits:
    """Token files for (docs, tokenizer): each document as [bos] + ids + [eos]; a held-out split by
    documents (a single document: its last val_fraction of tokens). Cached; written atomically."""
    root = cache or cache_dir(check=True) / "tokens"
    tok_sha = tokenizer_sha256(tokenizer)
    key = hashlib.sha256(f"{docs_fingerprint(docs)}/{tok_sha}/{val_fraction}/{FORMAT_VERSION}".encode()).hexdigest()[:24]
    directory = root / key
    if not (directory / "meta.json").exists():
        streams = encode_stream(docs, tokenizer, progress)
        if len(docs) >= 2:
            train_idx, val_idx = split_documents(docs, val_fraction)
            train = [t for i in train_idx for t in streams[i]]
            val = [t for i in val_idx for t in streams[i]]
        else:
            whole = streams[0]
            cut = len(whole) - max(2, int(len(whole) * val_fraction))
            train_idx, val_idx, train, val = [0], [], whole[:cut], whole[cut:]
        dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
        meta = {"source": source, "tokenizer_sha256": tok_sha, "num_docs_train": len(train_idx),
                "num_docs_val": len(val_idx), "train_tokens": len(train), "val_tokens": len(val),
                "dtype": np.dtype(dtype).name, "version": FORMAT_VERSION}
        with atomic_dir(directory, replace=False) as staging:  # another process may fill it first
            write_array(staging / "train.bin", train, dtype)
            write_array(staging / "val.bin", val, dtype)
            (staging / "meta.json").write_text(json.dumps(meta, indent=2))
    meta = json.loads((directory / "meta.json").read_text())
    return TokenSplits(open_array(directory / "train.bin", meta["dtype"]), open_array(directory / "val.bin", meta["dtype"]),
                       meta, directory)
