"""Pretraining workflow (LLaDA section 2.3): corpus -> tokenizer -> packed token stream ->
the masked-diffusion objective (or the AR twin's next-token loss) -> checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from remask.checkpoint import load_config
from remask.data.corpora import read_corpus
from remask.data.packing import PackedBatches, Packing, short_length, training_rows
from remask.data.tokenize import corpus_tokenizer, docs_fingerprint, prepare_tokens
from remask.errors import RemaskError
from remask.tokenizer import Tokenizer
from remask.train import distributed as D
from remask.train.checkpointing import check_resume_data, data_record, latest_checkpoint
from remask.train.config import PretrainConfig
from remask.train.loop import TrainJob, split_sizes, train
from remask.train.objectives import TextBatch
from remask.train.setup import build_run_model, micro_batch_size, noise, start


def run_tokenizer(cfg: PretrainConfig, docs: list[str]) -> Tokenizer:
    """The model's own (init_from), the run's own (resume), or one trained on the corpus."""
    if cfg.model.init_from is not None:
        load_config(cfg.model.init_from)  # a clear error for a missing or broken model directory
        return Tokenizer.from_dir(cfg.model.init_from)
    found = latest_checkpoint(cfg.run.out) if cfg.run.resume else None
    if found is not None:
        return Tokenizer.from_dir(found[1])
    return corpus_tokenizer(cfg.data.source, docs, kind=cfg.data.tokenizer, vocab_size=cfg.data.vocab_size)


def validation_rows(tokens: np.ndarray, seq_len: int, count: int, packing: Packing = "concat", *,
                    bos_id: int | None = None, eos_id: int | None = None) -> torch.Tensor:
    """Up to `count` held-out sequences, evenly spaced over the validation split, cut as training
    cuts its own: (N, S)."""
    S = min(seq_len, len(tokens))
    if S < 2:
        raise RemaskError("the validation split has fewer than 2 tokens; use a larger corpus or val_fraction")
    rows = training_rows(tokens, S, "concat" if packing == "shift" else packing, bos_id=bos_id, eos_id=eos_id)
    picks = np.linspace(0, len(rows) - 1, num=min(count, len(rows))).round().astype(np.int64)
    return torch.from_numpy(np.asarray(rows[picks], dtype=np.int64))


def setup(cfg: PretrainConfig) -> TrainJob:
    info = start(cfg.run)
    docs = read_corpus(cfg.data.source)
    tokenizer = splits = data = None
    for turn in (0, 1):  # the main process fills the caches first; the others then read them
        if (turn == 0) == info.is_main:
            tokenizer = run_tokenizer(cfg, docs)
            data = data_record(cfg.data.source, docs_fingerprint(docs), tokenizer)
            check_resume_data(cfg.run, data)  # another corpus on --resume: refused before any cache is filled
            splits = prepare_tokens(cfg.data.source, docs, tokenizer, val_fraction=cfg.data.val_fraction,
                                    progress=cfg.run.progress and info.is_main)
        D.barrier(info)
    architecture = None if cfg.model.init_from else cfg.model.build(tokenizer.special_ids, tokenizer.vocab_size)
    model = build_run_model(architecture, cfg.model.init_from, cfg.objective, seq_len=cfg.data.seq_len,
                            seed=cfg.run.seed, device=info.device, block_length=cfg.block_length)
    split_sizes(cfg.optim, info)  # bad batch sizes fail before the run directory is made
    ends = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
    packed = PackedBatches(training_rows(splits.train, cfg.data.seq_len, cfg.data.packing, **ends, seed=cfg.run.seed),
                           cfg.optim.batch_size, seed=cfg.run.seed)

    def batch_fn(step: int) -> TextBatch:
        length = short_length(step, seed=cfg.run.seed, seq_len=cfg.data.seq_len, prob=cfg.data.short_batch_prob)
        return TextBatch(packed.batch(step)[:, :length])  # 1% of batches are shorter (section 2.3)

    micro = micro_batch_size(cfg.optim.micro_batch_size, cfg.optim.batch_size, info)
    rows = validation_rows(splits.val, cfg.data.seq_len, cfg.run.val_batches * micro, cfg.data.packing, **ends)
    val_batches = [TextBatch(rows[i:i + micro]) for i in range(0, len(rows), micro)]
    describe = f"{cfg.objective} {model.config.num_parameters() / 1e6:.1f}M"
    return TrainJob("pretrain", cfg.objective, noise(cfg, tokenizer, model), cfg.optim, cfg.run, cfg.to_dict(), model,
                    tokenizer, info, batch_fn, val_batches, describe, data=data)


def pretrain(cfg: PretrainConfig) -> Path:
    """Pretrain (or resume) and return RUN_DIR/final."""
    job = setup(cfg)
    try:
        return train(job)
    finally:
        D.shutdown(job.info)
