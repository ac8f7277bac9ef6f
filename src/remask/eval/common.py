"""What the evaluation commands share: opening a model directory as a Scorer, and choosing the
held-out documents of a corpus the way training held them out."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from remask.data.corpora import read_corpus
from remask.data.tokenize import split_documents
from remask.errors import RemaskError
from remask.eval.scoring import Scorer, ScoringConfig
from remask.pipeline import Pipeline
from remask.tokenizer import Tokenizer

Split = Literal["val", "all"]
MIN_HELD_OUT_CHARS = 32  # the least held-out text of a single-document corpus worth a perplexity


def open_scorer(model_dir: str | Path, scoring: ScoringConfig, *, device: str = "cpu") -> tuple[Scorer, Tokenizer]:
    """A model directory, loaded through the pipeline, as a Scorer (and its tokenizer)."""
    pipe = Pipeline.load(model_dir, device=device)
    tokenizer = pipe.tokenizer
    return Scorer(pipe.model, mask_id=tokenizer.mask_id, bos_id=tokenizer.bos_id, scoring=scoring), tokenizer


def held_out_documents(source: str, split: Split, val_fraction: float) -> list[str]:
    """All documents, or (`val`) those pretraining held out with the same `val_fraction` (a single
    document: its last `val_fraction` of characters)."""
    if not 0 < val_fraction < 1:
        raise RemaskError(f"val_fraction must be in (0, 1), got {val_fraction}")
    docs = read_corpus(source)
    if split == "all":
        return docs
    if len(docs) == 1:
        text = docs[0]
        held = text[int(len(text) * (1 - val_fraction)):]
        if len(held) < MIN_HELD_OUT_CHARS:  # a figure from a handful of characters measures nothing
            raise RemaskError(f"{source} is one document; its held-out part at val_fraction {val_fraction} is "
                              f"{len(held)} characters (fewer than {MIN_HELD_OUT_CHARS}): use --split all or a larger "
                              f"--val-fraction")
        return [held]
    _, val = split_documents(docs, val_fraction)
    if not val:
        raise RemaskError(f"{source} has no held-out documents at val_fraction {val_fraction}; use --split all")
    return [docs[i] for i in val]
