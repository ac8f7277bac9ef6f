"""Supervised fine-tuning workflow (LLaDA section 2.3): a pretrained model directory + JSONL
dialogues -> chat-template examples -> the SFT objective (prompt never masked, EOS padding
trained as answer, per-answer-length normalisation) or the AR twin's answer-only loss."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from remask.checkpoint import load_config
from remask.data.corpora import read_file_bytes
from remask.data.sft import SFTBatches, SFTExample, build_sft_examples, sft_batch
from remask.errors import ConfigError, RemaskError
from remask.tokenizer import Tokenizer
from remask.train import distributed as D
from remask.train.checkpointing import check_resume_data, data_record
from remask.train.config import SFTConfig
from remask.train.loop import TrainJob, split_sizes, train
from remask.train.objectives import DialogueBatch
from remask.train.setup import build_run_model, micro_batch_size, noise, start


def split_examples(examples: list[SFTExample], val_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic held-out subset: at least one example, none when there are fewer than 10 or
    `val_fraction` is 0."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(int(len(examples) * val_fraction), 1) if len(examples) >= 10 and val_fraction > 0 else 0
    val = [examples[i] for i in sorted(order[:n_val])]
    return [examples[i] for i in sorted(order[n_val:])], val


def setup(cfg: SFTConfig) -> TrainJob:
    if cfg.model is None:
        raise ConfigError("is required: the pretrained model directory to fine-tune", field="model", owner=SFTConfig)
    if cfg.data.source is None:
        raise ConfigError("is required: a .jsonl file of dialogues", field="source", owner=type(cfg.data))
    info = start(cfg.run)
    load_config(cfg.model)  # a clear error for a missing or broken model directory
    tokenizer = Tokenizer.from_dir(cfg.model)
    examples = build_sft_examples(cfg.data.source, tokenizer, max_len=cfg.data.seq_len)
    if not examples:
        raise RemaskError(f"{cfg.data.source} yields no SFT example that fits seq_len {cfg.data.seq_len}")
    data = data_record(cfg.data.source, hashlib.sha256(read_file_bytes(Path(cfg.data.source))).hexdigest(), tokenizer)
    check_resume_data(cfg.run, data)  # other dialogues on --resume: refused before anything is written
    train_examples, val_examples = split_examples(examples, cfg.data.val_fraction, cfg.run.seed)
    model = build_run_model(None, cfg.model, cfg.objective, seq_len=cfg.data.seq_len, seed=cfg.run.seed,
                            device=info.device, block_length=cfg.block_length)
    split_sizes(cfg.optim, info)  # bad batch sizes fail before the run directory is made
    batches = SFTBatches(train_examples, cfg.optim.batch_size, seed=cfg.run.seed, pad_id=tokenizer.pad_id,
                         group_by_length=cfg.data.group_by_length)
    micro = micro_batch_size(cfg.optim.micro_batch_size, cfg.optim.batch_size, info)
    val_batches = [DialogueBatch(*sft_batch(val_examples[i:i + micro], pad_id=tokenizer.pad_id))
                   for i in range(0, len(val_examples), micro)]
    describe = f"sft {cfg.objective} {model.config.num_parameters() / 1e6:.1f}M"
    return TrainJob("sft", cfg.objective, noise(cfg, tokenizer, model), cfg.optim, cfg.run, cfg.to_dict(), model,
                    tokenizer, info, lambda step: DialogueBatch(*batches.batch(step)), val_batches, describe, data=data)


def sft(cfg: SFTConfig) -> Path:
    """Fine-tune (or resume) and return RUN_DIR/final."""
    job = setup(cfg)
    try:
        return train(job)
    finally:
        D.shutdown(job.info)
