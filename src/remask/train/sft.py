"""Supervised fine-tuning workflow (LLaDA section 2.3): a pretrained model directory + JSONL
dialogues -> chat-template examples -> the SFT objective (prompt never masked, EOS padding
trained as answer, per-answer-length normalisation) or the AR twin's answer-only loss."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from remask.data.packing import step_generator
from remask.data.sft import SFTBatches, SFTExample, build_sft_examples, sft_batch
from remask.errors import RemaskError
from remask.tokenizer import Tokenizer
from remask.train import distributed as D
from remask.train.config import TrainConfig
from remask.train.loop import TrainJob, autocast, train
from remask.train.objectives import batch_loss, make_inputs, to_device
from remask.train.pretrain import VAL_DRAWS, VAL_STREAM, run_model


def split_examples(examples: list[SFTExample], val_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic held-out subset (none when there are fewer than 10 examples)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = int(len(examples) * val_fraction) if len(examples) >= 10 else 0
    n_val = max(n_val, 1) if len(examples) >= 10 else 0
    val = [examples[i] for i in sorted(order[:n_val])]
    return [examples[i] for i in sorted(order[n_val:])], val


def sft_validation(cfg: TrainConfig, val: list[SFTExample], tokenizer: Tokenizer, device: torch.device,
                   micro: int) -> Callable[[nn.Module], dict[str, float]]:
    """val_loss: the SFT objective (eq. 5) with fixed masks, or the AR twin's answer NLL."""

    @torch.no_grad()
    def validate(model: nn.Module) -> dict[str, float]:
        total, weight = 0.0, 0
        for start in range(0, len(val), micro):
            batch = sft_batch(val[start:start + micro], pad_id=tokenizer.pad_id)
            gen = step_generator(cfg.seed, start, VAL_STREAM)
            for _ in range(1 if cfg.objective == "ar" else VAL_DRAWS):
                inputs = make_inputs("sft", cfg.objective, batch, mask_id=tokenizer.mask_id, eps=cfg.mask_eps,
                                     generator=gen)
                with autocast(cfg, device):
                    total += batch_loss(model, "sft", cfg.objective, to_device(inputs, device)).item() * len(batch[0])
                weight += len(batch[0])
        loss = total / weight
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    return validate


def setup(cfg: TrainConfig) -> TrainJob:
    if cfg.init_from is None:
        raise RemaskError("sft needs --model DIR (a pretrained model directory)")
    info = D.init_distributed(cfg.device)
    tokenizer = Tokenizer.from_dir(cfg.init_from)
    examples = build_sft_examples(Path(cfg.data), tokenizer, max_len=cfg.seq_len)
    if not examples:
        raise RemaskError(f"{cfg.data} yields no SFT example that fits seq_len {cfg.seq_len}")
    train_examples, val_examples = split_examples(examples, cfg.val_fraction, cfg.seed)
    model = run_model(cfg, tokenizer, info.device)
    batches = SFTBatches(train_examples, cfg.batch_size, seed=cfg.seed, pad_id=tokenizer.pad_id)
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // info.world)
    val_fn = sft_validation(cfg, val_examples, tokenizer, info.device, micro) if val_examples else None
    describe = f"sft {cfg.objective} {model.config.num_parameters() / 1e6:.1f}M"
    return TrainJob(cfg, "sft", model, tokenizer, info, batches.batch, val_fn, describe)


def sft(cfg: TrainConfig) -> Path:
    """Fine-tune (or resume) and return RUN_DIR/final."""
    job = setup(cfg)
    try:
        return train(job)
    finally:
        D.shutdown(job.info)
