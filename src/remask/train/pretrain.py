"""Pretraining workflow (LLaDA section 2.3): corpus -> tokenizer -> packed token stream ->
the masked-diffusion objective (or the AR twin's next-token loss) -> checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from remask.checkpoint import load_model
from remask.config import ModelConfig, preset
from remask.data.corpora import read_corpus
from remask.data.packing import PackedBatches, short_length, step_generator
from remask.data.tokenize import TokenSplits, corpus_tokenizer, prepare_tokens
from remask.diffusion import ar_loss, forward_mask, mdm_loss
from remask.errors import RemaskError
from remask.model import Transformer, build_model
from remask.tokenizer import Tokenizer
from remask.train import distributed as D
from remask.train.config import TrainConfig
from remask.train.loop import TrainJob, autocast, train
from remask.train.state import latest_checkpoint

VAL_STREAM = 2  # step_generator stream for validation masks: the same masks at every validation
VAL_DRAWS = 4  # mask draws per validation sequence for the MDM bound


def run_tokenizer(cfg: TrainConfig, docs: list[str]) -> Tokenizer:
    """The model's own (init_from), the run's own (resume), or one trained on the corpus."""
    if cfg.init_from is not None:
        return Tokenizer.from_dir(cfg.init_from)
    found = latest_checkpoint(cfg.out) if cfg.resume else None
    if found is not None:
        return Tokenizer.from_dir(found[1])
    return corpus_tokenizer(cfg.data, docs, kind=cfg.tokenizer, vocab_size=cfg.vocab_size)


def run_model(cfg: TrainConfig, tokenizer: Tokenizer, device: torch.device) -> Transformer:
    """A fresh model from the preset (sized to the tokenizer), or init_from's weights; causal iff AR."""
    causal = cfg.objective == "ar"
    if cfg.init_from is not None:
        loaded = load_model(cfg.init_from)
        model = Transformer(loaded.config.replace(causal=causal))
        model.load_state_dict(loaded.state_dict())
        model_cfg = model.config
    else:
        model_cfg = model_config_for(cfg, tokenizer).replace(causal=causal)
        model = None
    if cfg.seq_len > model_cfg.max_sequence_length:
        raise RemaskError(f"seq_len {cfg.seq_len} exceeds the model's max_sequence_length "
                          f"{model_cfg.max_sequence_length}")
    if model is None:
        model = build_model(model_cfg, seed=cfg.seed)
    return model.to(device)


def validation_rows(tokens: np.ndarray, seq_len: int, count: int) -> torch.Tensor:
    """Up to `count` held-out sequences, evenly spaced over the validation stream: (N, S)."""
    S = min(seq_len, len(tokens))
    if S < 2:
        raise RemaskError("the validation split has fewer than 2 tokens; use a larger corpus or val_fraction")
    n_chunks = len(tokens) // S
    picks = np.linspace(0, n_chunks - 1, num=min(count, n_chunks)).round().astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(tokens[i * S:(i + 1) * S], dtype=np.int64) for i in picks]))


def lm_validation(cfg: TrainConfig, val_rows: torch.Tensor, mask_id: int, device: torch.device,
                  micro: int) -> Callable[[nn.Module], dict[str, float]]:
    """val_loss in nats per token: the MDM's likelihood bound (eq. 3's estimate, fixed masks) or
    the AR twin's exact negative log-likelihood."""

    @torch.no_grad()
    def validate(model: nn.Module) -> dict[str, float]:
        total, weight = 0.0, 0
        for start in range(0, len(val_rows), micro):
            x = val_rows[start:start + micro]
            with autocast(cfg, device):
                if cfg.objective == "ar":
                    total += ar_loss(model(x.to(device)), x.to(device)).item() * len(x)
                    weight += len(x)
                    continue
                gen = step_generator(cfg.seed, start, VAL_STREAM)
                for _ in range(VAL_DRAWS):
                    noisy, masked, p = forward_mask(x, mask_id=mask_id, eps=cfg.mask_eps, generator=gen)
                    total += mdm_loss(model(noisy.to(device)), x.to(device), masked.to(device), p.to(device)).item() * len(x)
                    weight += len(x)
        loss = total / weight
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    return validate


def setup(cfg: TrainConfig) -> tuple[TrainJob, TokenSplits]:
    info = D.init_distributed(cfg.device)
    docs = read_corpus(cfg.data)
    tokenizer = splits = None
    for turn in (0, 1):  # the main process fills the caches first; the others then read them
        if (turn == 0) == info.is_main:
            tokenizer = run_tokenizer(cfg, docs)
            splits = prepare_tokens(cfg.data, docs, tokenizer, val_fraction=cfg.val_fraction,
                                    progress=cfg.progress and info.is_main)
        D.barrier(info)
    model = run_model(cfg, tokenizer, info.device)
    packed = PackedBatches(splits.train, cfg.seq_len, cfg.batch_size, seed=cfg.seed)

    def batch_fn(step: int) -> torch.Tensor:
        length = short_length(step, seed=cfg.seed, seq_len=cfg.seq_len, prob=cfg.short_batch_prob)
        return packed.batch(step)[:, :length]  # 1% of batches are shorter (section 2.3)

    micro = cfg.micro_batch_size or max(1, cfg.batch_size // info.world)
    val_rows = validation_rows(splits.val, cfg.seq_len, cfg.val_batches * micro)
    describe = f"{cfg.objective} {model.config.num_parameters() / 1e6:.1f}M"
    job = TrainJob(cfg, "pretrain", model, tokenizer, info, batch_fn,
                   lm_validation(cfg, val_rows, tokenizer.mask_id, info.device, micro), describe)
    return job, splits


def pretrain(cfg: TrainConfig) -> Path:
    """Pretrain (or resume) and return RUN_DIR/final."""
    job, _ = setup(cfg)
    try:
        return train(job)
    finally:
        D.shutdown(job.info)


def model_config_for(cfg: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The architecture a run would build (used by benchmarks and `remask info`-style reports)."""
    return preset(cfg.preset, **cfg.model_overrides()).with_tokens(tokenizer.special_ids, tokenizer.vocab_size)
