"""A model directory as a whole: the weights and the tokenizer beside them, checked against each
other (a tokenizer whose ids the model cannot embed, or whose special tokens are not the ones
config.json names, would make every later step wrong)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from remask.checkpoint.storage import load_model
from remask.config import ModelConfig
from remask.device import resolve_device
from remask.errors import RemaskError
from remask.model import Transformer
from remask.tokenizer import Tokenizer

TRAINING_NOTE = "remask_training.json"  # in final/: which step it holds and why


def read_training_note(directory: str | Path) -> dict:
    """A model directory's training note, {} when it has none or it cannot be read (a model
    trained elsewhere, or an old one)."""
    try:
        note = json.loads((Path(directory) / TRAINING_NOTE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def trained_seq_len(directory: str | Path) -> int | None:
    """The sequence length a pretrained model read (its training note's seq_len), None if unknown."""
    n = read_training_note(directory).get("seq_len")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_tokenizer(cfg: ModelConfig, tokenizer: Tokenizer, where: str | os.PathLike[str]) -> None:
    """RemaskError unless the tokenizer's ids fit the model and its special tokens are config.json's."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise RemaskError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                          f"{cfg.vocab_size}")
    for name, key in (("mask", "mask_token_id"), ("eos", "eos_token_id")):
        expected, actual = getattr(cfg, key), tokenizer.special_ids[name]
        if expected is not None and expected != actual:
            raise RemaskError(f"{where}: config.json says {key}={expected} but the tokenizer's {name} token "
                              f"{tokenizer.special_tokens[name]!r} has id {actual}")


def load_model_dir(directory: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer]:
    """(model in eval mode on `device`, tokenizer) of a model directory, checked against each other."""
    target = resolve_device(device)
    model = load_model(directory, device=target, dtype=dtype)
    tokenizer = Tokenizer.from_dir(directory)
    check_tokenizer(model.config, tokenizer, directory)
    return model, tokenizer
