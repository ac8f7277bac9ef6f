"""The training loop shared by pretraining and SFT (and by both objectives).

Every step's batch and masks are functions of (seed, step) and are drawn for the whole global
batch, then sliced per process and micro-batch, so a resumed run, a run with gradient
accumulation and a DDP run all see what one uninterrupted process would. Losses, in training
and in validation alike, come from `objectives.OBJECTIVES`. What the loop writes to RUN_DIR and
reads back on --resume (checkpoints, best/, final/, metrics.jsonl) is `checkpointing`'s.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from remask.atomic import remove_dir
from remask.data.packing import Stream, step_generator
from remask.errors import RemaskError
from remask.model import Transformer
from remask.train import distributed as D
from remask.train.checkpointing import (
    MetricsLog,
    Progress,
    latest_checkpoint,
    open_run_dir,
    restore,
    restore_optimizer,
    save_best,
    save_checkpoint,
    write_final,
)
from remask.train.config import OptimConfig, RunConfig
from remask.train.objectives import OBJECTIVES, Batch, Noise, ObjectiveName, Task, batch_tokens
from remask.train.optim import build_optimizer, scheduled_lr


@dataclass
class TrainJob:
    """What a workflow (pretrain, sft) hands the loop."""

    task: Task
    objective: ObjectiveName
    noise: Noise  # the forward process (mask id, eps, how t is drawn, block length)
    optim: OptimConfig
    run: RunConfig
    config: dict[str, Any]  # the workflow's whole configuration (config.yaml, trainer state)
    model: Transformer  # unwrapped, already on info.device
    tokenizer: Any
    info: D.DistInfo
    batch_fn: Callable[[int], Batch]  # the global batch of a step (CPU tensors)
    val_batches: list[Batch]  # held-out micro-batches (empty: no validation)
    describe: str = ""
    data: dict[str, str] | None = None  # what it trains on (checkpointing.data_record); checked on resume


def autocast(precision: str, device: torch.device):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def validation_fn(job: TrainJob) -> Callable[[nn.Module], dict[str, float]] | None:
    """val_loss in nats per token through the training objective with fixed masks: the MDM's
    likelihood bound (averaged over a few mask draws) or the AR twin's exact NLL."""
    if not job.val_batches:
        return None
    objective = OBJECTIVES[(job.task, job.objective)]
    starts = [sum(len(b) for b in job.val_batches[:i]) for i in range(len(job.val_batches))]

    @torch.no_grad()
    def validate(model: nn.Module) -> dict[str, float]:
        total, weight = 0.0, 0
        for start, batch in zip(starts, job.val_batches):
            generator = step_generator(job.run.seed, start, Stream.VALIDATION)
            for _ in range(objective.validation_draws):
                inputs = objective.make_inputs(batch, job.noise.full_range(), generator)
                with autocast(job.run.precision, job.info.device):
                    total += objective.loss(model, inputs.to(job.info.device)).item() * len(batch)
                weight += len(batch)
        loss = total / weight
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    return validate


def split_sizes(optim: OptimConfig, info: D.DistInfo) -> tuple[int, int, int]:
    """(rows per process, micro-batch size, accumulation steps)."""
    if optim.batch_size % info.world:
        raise RemaskError(f"batch_size ({optim.batch_size}) must be divisible by the number of processes ({info.world})")
    per_rank = optim.batch_size // info.world
    micro = optim.micro_batch_size or per_rank
    if per_rank % micro:
        raise RemaskError(f"batch_size per process ({per_rank}) must be divisible by micro_batch_size ({micro})")
    return per_rank, micro, per_rank // micro


def progress_bar(job: TrainJob, start: int):
    if not (job.run.progress and job.info.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=job.optim.max_steps, initial=start, desc=job.describe or job.objective, unit="step",
                dynamic_ncols=True, smoothing=0.1)


@dataclass
class Window:
    """Losses, tokens and seconds since the last logged step."""

    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    def add(self, tokens: int, seconds: float, loss: float) -> None:
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        self.losses.append(loss)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def train_step(job: TrainJob, model: nn.Module, forward_model: nn.Module, optimizer: torch.optim.Optimizer,
               step: int, sizes: tuple[int, int, int]) -> tuple[float, float, float, int]:
    """One optimizer step on the global batch of `step` (this process's rows, in micro-batches):
    (mean loss over processes, grad norm before clipping, learning rate, tokens in the global batch)."""
    optim, run, info = job.optim, job.run, job.info
    per_rank, micro, accum = sizes
    objective = OBJECTIVES[(job.task, job.objective)]
    lr = scheduled_lr(optim, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = job.batch_fn(step)
    inputs = objective.make_inputs(batch, job.noise, step_generator(run.seed, step, Stream.MASKS))
    mine = inputs.rows(slice(info.rank * per_rank, (info.rank + 1) * per_rank))
    loss_value = 0.0
    for m in range(accum):
        part = mine.rows(slice(m * micro, (m + 1) * micro)).to(info.device)
        no_sync = accum > 1 and m < accum - 1 and hasattr(model, "no_sync")
        with model.no_sync() if no_sync else contextlib.nullcontext(), autocast(run.precision, info.device):
            loss = objective.loss(forward_model, part) / accum
        loss.backward()
        loss_value += loss.item()
    grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip).item()
                 if optim.grad_clip > 0 else float("nan"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_value = D.mean_across(loss_value, info)
    if not math.isfinite(loss_value):
        raise RemaskError(f"the loss became {loss_value} at step {step + 1}; lower the learning rate "
                          f"(optim.lr={optim.lr:g}) or check the data")
    return loss_value, grad_norm, lr, batch_tokens(batch)


def validate_step(job: TrainJob, model: nn.Module, forward_model: nn.Module,
                  val_fn: Callable[[nn.Module], dict[str, float]], progress: Progress, bar: Any,
                  done: int) -> dict[str, float]:
    """The validation record at step `done`; with run.final == "best" a new lowest loss is saved to best/."""
    record = val_fn(forward_model)
    if bar is not None:
        bar.write(f"step {done}: val_loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})", file=sys.stderr)
    if job.run.final == "best" and (progress.best_val is None or record["val_loss"] < progress.best_val):
        progress.best_step, progress.best_val = done, record["val_loss"]
        save_best(job, model, progress)
    return record


def train(job: TrainJob) -> Path:
    """Run (or resume) training to optim.max_steps; returns RUN_DIR/final."""
    run, info = job.run, job.info
    sizes = split_sizes(job.optim, info)
    progress = restore(job)  # before anything is written: a refused resume leaves RUN_DIR as it was
    created = open_run_dir(job) if info.is_main else False
    D.barrier(info)
    try:
        return _train(job, progress, sizes)
    except BaseException:
        # A start that failed before any checkpoint leaves nothing behind.
        if created and latest_checkpoint(run.out) is None and not (run.out / "final").exists():
            remove_dir(run.out)
        raise


def _train(job: TrainJob, progress: Progress, sizes: tuple[int, int, int]) -> Path:
    optim, run, info = job.optim, job.run, job.info
    model: nn.Module = D.wrap_model(job.model, info, fsdp=run.fsdp)
    optimizer = build_optimizer(model, lr=optim.lr, weight_decay=optim.weight_decay, betas=(optim.beta1, optim.beta2))
    restore_optimizer(model, optimizer, progress, info)
    forward_model = torch.compile(model) if run.compile else model
    val_fn = validation_fn(job)
    log = MetricsLog(run.out, progress.step, info.is_main)
    bar = progress_bar(job, progress.step)
    window = Window()
    try:
        for step in range(progress.step, optim.max_steps):
            t0 = time.perf_counter()
            loss, grad_norm, lr, n_tokens = train_step(job, model, forward_model, optimizer, step, sizes)
            progress.step, progress.tokens = step + 1, progress.tokens + n_tokens
            window.add(n_tokens, time.perf_counter() - t0, loss)
            done = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{window.tokens_per_s:,.0f}", lr=f"{lr:.2e}", refresh=False)
            validate = val_fn is not None and (done % run.val_every == 0 or done == optim.max_steps)
            if done % run.log_every == 0 or done == optim.max_steps or validate:
                record = {"step": done, "loss": loss, "loss_avg": sum(window.losses) / len(window.losses), "lr": lr,
                          "tokens": progress.tokens, "tokens_per_s": window.tokens_per_s, "grad_norm": grad_norm}
                if validate:
                    record |= validate_step(job, model, forward_model, val_fn, progress, bar, done)
                log.write(record)
                window = Window()
            if done % run.save_every == 0 or done == optim.max_steps:
                save_checkpoint(job, model, optimizer, progress)
    finally:
        if bar is not None:
            bar.close()
        log.close()
    final = write_final(job, progress)
    D.barrier(info)
    return final
