"""The training loop shared by pretraining and SFT (and by both objectives).

Every step's batch and masks are functions of (seed, step) and are drawn for the whole global
batch, then sliced per process and micro-batch, so a resumed run, a run with gradient
accumulation and a DDP run all see what one uninterrupted process would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from remask.checkpoint import load_model, save_model
from remask.data.packing import step_generator
from remask.errors import RemaskError
from remask.model import Transformer
from remask.train import distributed as D
from remask.train.config import TrainConfig
from remask.train.objectives import Batch, Task, batch_loss, make_inputs, rows, to_device
from remask.train.optim import build_optimizer, wsd_lr
from remask.train.state import (
    check_same_model,
    latest_checkpoint,
    read_trainer_state,
    remove_stale_staging,
    restore_rng,
    write_step_checkpoint,
)

MASK_STREAM = 1  # step_generator stream for training masks (validation uses its own)


@dataclass
class TrainJob:
    """What a workflow (pretrain, sft) hands the loop."""

    cfg: TrainConfig
    task: Task
    model: Transformer  # unwrapped, already on info.device
    tokenizer: object
    info: D.DistInfo
    batch_fn: Callable[[int], Batch]  # the global batch of a step (CPU tensors)
    val_fn: Callable[[nn.Module], dict[str, float]] | None = None
    describe: str = ""


def batch_tokens(batch: Batch) -> int:
    return int(batch.numel() if isinstance(batch, torch.Tensor) else batch[0].numel())


def autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class MetricsLog:
    """RUN_DIR/metrics.jsonl (one object per logged step) and TensorBoard when installed."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run continues the log from its checkpoint
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def split_sizes(cfg: TrainConfig, info: D.DistInfo) -> tuple[int, int, int]:
    """(rows per process, micro-batch size, accumulation steps)."""
    if cfg.batch_size % info.world:
        raise RemaskError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes ({info.world})")
    per_rank = cfg.batch_size // info.world
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise RemaskError(f"batch_size per process ({per_rank}) must be divisible by micro_batch_size ({micro})")
    return per_rank, micro, per_rank // micro


def prepare_run_dir(job: TrainJob) -> tuple[int, int, dict | None]:
    """(start step, tokens so far, optimizer state) -- loading the latest checkpoint on --resume."""
    cfg, run_dir = job.cfg, job.cfg.out
    found = latest_checkpoint(run_dir)
    if found is None or not cfg.resume:
        if found is not None:
            raise RemaskError(f"{run_dir} already holds a run (step {found[0]}); pass --resume to continue it "
                              "or choose another --out")
        return 0, 0, None
    step, checkpoint = found
    check_same_model(checkpoint, job.model.config)
    trainer, optimizer_state = read_trainer_state(checkpoint)
    if trainer.get("objective") != cfg.objective or trainer.get("task") != job.task:
        raise RemaskError(f"cannot resume from {checkpoint}: it was a {trainer.get('task')}/{trainer.get('objective')} "
                          f"run, not {job.task}/{cfg.objective}")
    loaded = load_model(checkpoint, device=job.info.device)
    job.model.load_state_dict(loaded.state_dict())
    restore_rng(checkpoint, trainer)
    return step, int(trainer["tokens"]), optimizer_state


def save_checkpoint(job: TrainJob, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, tokens: int) -> None:
    """All processes gather (FSDP needs them); the main one writes."""
    info = job.info
    state = D.full_state_dict(model, info)
    opt_state = D.optimizer_state(model, optimizer, info)
    if info.is_main:
        plain = Transformer(job.model.config)
        plain.load_state_dict(state, assign=True)
        trainer = {"step": step, "tokens": tokens, "task": job.task, "objective": job.cfg.objective,
                   "seed": job.cfg.seed, "config": job.cfg.to_dict()}
        write_step_checkpoint(job.cfg.out, step, plain, job.tokenizer, optimizer_state=opt_state,
                              trainer=trainer, keep=job.cfg.keep_checkpoints)
        if step == job.cfg.max_steps:
            save_model(plain, job.cfg.out / "final", tokenizer=job.tokenizer)
    D.barrier(info)


def progress_bar(job: TrainJob, start: int):
    if not (job.cfg.progress and job.info.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=job.cfg.max_steps, initial=start, desc=job.describe or job.cfg.objective, unit="step",
                dynamic_ncols=True, smoothing=0.1)


def train(job: TrainJob) -> Path:
    """Run (or resume) training to cfg.max_steps; returns RUN_DIR/final."""
    cfg, info = job.cfg, job.info
    if info.is_main:
        cfg.out.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(cfg.out)
    D.barrier(info)
    start, tokens, optimizer_state = prepare_run_dir(job)
    if info.is_main:
        tmp = cfg.out / ".config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        os.replace(tmp, cfg.out / "config.yaml")
    per_rank, micro, accum = split_sizes(cfg, info)
    model: nn.Module = D.wrap_model(job.model, info, fsdp=cfg.fsdp)
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    if optimizer_state is not None:
        D.load_optimizer_state(model, optimizer, optimizer_state, info)
    forward_model = torch.compile(model) if cfg.compile else model
    mask_id = job.tokenizer.mask_id
    log = MetricsLog(cfg.out, start, info.is_main)
    bar = progress_bar(job, start)
    window_tokens, window_time, window_losses = 0, 0.0, []
    try:
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            lr = wsd_lr(step, max_steps=cfg.max_steps, peak=cfg.lr, warmup_steps=cfg.warmup_steps,
                        decay_fraction=cfg.decay_fraction, min_ratio=cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = job.batch_fn(step)
            inputs = make_inputs(job.task, cfg.objective, batch, mask_id=mask_id, eps=cfg.mask_eps,
                                 generator=step_generator(cfg.seed, step, MASK_STREAM))
            mine = rows(inputs, slice(info.rank * per_rank, (info.rank + 1) * per_rank))
            loss_value = 0.0
            for m in range(accum):
                part = to_device(rows(mine, slice(m * micro, (m + 1) * micro)), info.device)
                no_sync = accum > 1 and m < accum - 1 and hasattr(model, "no_sync")
                with model.no_sync() if no_sync else contextlib.nullcontext(), autocast(cfg, info.device):
                    loss = batch_loss(forward_model, job.task, cfg.objective, part) / accum
                loss.backward()
                loss_value += loss.item()
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
                         if cfg.grad_clip > 0 else float("nan"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = D.mean_across(loss_value, info)
            if not math.isfinite(loss_value):
                raise RuntimeError(f"loss became {loss_value} at step {step + 1}")
            n_tokens = batch_tokens(batch)
            tokens += n_tokens
            window_tokens += n_tokens
            window_time += time.perf_counter() - t0
            window_losses.append(loss_value)
            done = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{window_tokens / max(window_time, 1e-9):,.0f}",
                                lr=f"{lr:.2e}", refresh=False)
            validate = job.val_fn is not None and (done % cfg.val_every == 0 or done == cfg.max_steps)
            if done % cfg.log_every == 0 or done == cfg.max_steps or validate:
                record = {"step": done, "loss": loss_value, "loss_avg": sum(window_losses) / len(window_losses),
                          "lr": lr, "tokens": tokens, "tokens_per_s": window_tokens / max(window_time, 1e-9),
                          "grad_norm": grad_norm}
                if validate:
                    record |= job.val_fn(forward_model)
                    if bar is not None and "val_loss" in record:
                        bar.write(f"step {done}: val_loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})",
                                  file=sys.stderr)
                log.write(record)
                window_tokens, window_time, window_losses = 0, 0.0, []
            if done % cfg.save_every == 0 or done == cfg.max_steps:
                save_checkpoint(job, model, optimizer, done, tokens)
    finally:
        if bar is not None:
            bar.close()
        log.close()
    return cfg.out / "final"
