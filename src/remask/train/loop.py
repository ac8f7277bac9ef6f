"""The training loop shared by pretraining and SFT (and by both objectives).

Every step's batch and masks are functions of (seed, step) and are drawn for the whole global
batch, then sliced per process and micro-batch, so a resumed run, a run with gradient
accumulation and a DDP run all see what one uninterrupted process would. Losses, in training
and in validation alike, come from `objectives.OBJECTIVES`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from remask.atomic import atomic_dir, remove_dir, write_json, write_text
from remask.checkpoint import load_model, write_model_files
from remask.checkpoint.model_dir import TRAINING_NOTE
from remask.data.packing import Stream, step_generator
from remask.errors import RemaskError
from remask.model import Transformer
from remask.train import distributed as D
from remask.train.config import OptimConfig, RunConfig
from remask.train.objectives import OBJECTIVES, Batch, ObjectiveName, Task, batch_tokens
from remask.train.optim import build_optimizer, wsd_lr
from remask.train.state import (
    check_same_model,
    clear_leftovers,
    latest_checkpoint,
    read_trainer_state,
    restore_rng,
    write_step_checkpoint,
)


@dataclass
class TrainJob:
    """What a workflow (pretrain, sft) hands the loop."""

    task: Task
    objective: ObjectiveName
    mask_eps: float
    optim: OptimConfig
    run: RunConfig
    config: dict[str, Any]  # the workflow's whole configuration (config.yaml, trainer state)
    model: Transformer  # unwrapped, already on info.device
    tokenizer: Any
    info: D.DistInfo
    batch_fn: Callable[[int], Batch]  # the global batch of a step (CPU tensors)
    val_batches: list[Batch]  # held-out micro-batches (empty: no validation)
    describe: str = ""
    t_sampling: str = "uniform"  # how a batch's diffusion times are drawn (config: t_sampling)


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
                inputs = objective.make_inputs(batch, mask_id=job.tokenizer.mask_id, eps=job.mask_eps,
                                               stratified=job.t_sampling == "stratified",
                                               generator=generator)
                with autocast(job.run.precision, job.info.device):
                    total += objective.loss(model, inputs.to(job.info.device)).item() * len(batch)
                weight += len(batch)
        loss = total / weight
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    return validate


class MetricsLog:
    """RUN_DIR/metrics.jsonl (one object per logged step) and TensorBoard when installed."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        # A resumed run continues the log from its checkpoint; a fresh one starts it empty. A torn
        # last line (a kill during an append) is dropped.
        kept = [json.dumps(r) for r in read_metrics_lines(self.path) if r["step"] <= start_step]
        write_text(self.path, "".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics_lines(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn (unparseable) last line is ignored, a torn line
    anywhere else is an error."""
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a metrics record")
        except ValueError as e:
            if n == len(lines):
                break
            raise RemaskError(f"{path} is corrupt at line {n}: {e}") from None
        records.append(record)
    return records


def split_sizes(optim: OptimConfig, info: D.DistInfo) -> tuple[int, int, int]:
    """(rows per process, micro-batch size, accumulation steps)."""
    if optim.batch_size % info.world:
        raise RemaskError(f"batch_size ({optim.batch_size}) must be divisible by the number of processes ({info.world})")
    per_rank = optim.batch_size // info.world
    micro = optim.micro_batch_size or per_rank
    if per_rank % micro:
        raise RemaskError(f"batch_size per process ({per_rank}) must be divisible by micro_batch_size ({micro})")
    return per_rank, micro, per_rank // micro


@dataclass
class Progress:
    """Where a run stands: restored from its newest checkpoint on --resume."""

    step: int = 0
    tokens: int = 0
    best_step: int | None = None
    best_val: float | None = None
    optimizer_state: dict | None = None


def restore(job: TrainJob) -> Progress:
    """The run's progress -- loading the latest checkpoint on --resume."""
    found = latest_checkpoint(job.run.out)
    if found is None or not job.run.resume:
        return Progress()
    step, checkpoint = found
    check_same_model(checkpoint, job.model.config)
    trainer, optimizer_state = read_trainer_state(checkpoint)
    if trainer.get("objective") != job.objective or trainer.get("task") != job.task:
        raise RemaskError(f"cannot resume from {checkpoint}: it was a {trainer.get('task')}/{trainer.get('objective')} "
                          f"run, not {job.task}/{job.objective}")
    loaded = load_model(checkpoint, device=job.info.device)
    job.model.load_state_dict(loaded.state_dict())
    restore_rng(checkpoint, trainer)
    return Progress(step, int(trainer["tokens"]), trainer.get("best_step"), trainer.get("best_val"), optimizer_state)


def plain_model(job: TrainJob, model: nn.Module) -> Transformer | None:
    """The full model on the CPU in the main process (all processes must call this under FSDP)."""
    state = D.full_state_dict(model, job.info)
    if not job.info.is_main:
        return None
    plain = Transformer(job.model.config)
    plain.load_state_dict(state, assign=True)
    return plain


def save_checkpoint(job: TrainJob, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
    """All processes gather (FSDP needs them); the main one writes."""
    plain = plain_model(job, model)
    opt_state = D.optimizer_state(model, optimizer, job.info)
    if plain is not None:
        trainer = {"step": progress.step, "tokens": progress.tokens, "task": job.task, "objective": job.objective,
                   "seed": job.run.seed, "best_step": progress.best_step, "best_val": progress.best_val,
                   "config": job.config}
        write_step_checkpoint(job.run.out, progress.step, plain, job.tokenizer, optimizer_state=opt_state,
                              trainer=trainer, keep=job.run.keep_checkpoints)
    D.barrier(job.info)


def save_best(job: TrainJob, model: nn.Module, progress: Progress) -> None:
    """RUN_DIR/best/: the model with the lowest validation loss so far."""
    plain = plain_model(job, model)
    if plain is not None:
        with atomic_dir(job.run.out / "best") as staging:
            write_model_files(plain, staging, tokenizer=job.tokenizer)
            write_json(staging / TRAINING_NOTE, {"step": progress.best_step, "val_loss": progress.best_val,
                                                 "kept": "best"})
    D.barrier(job.info)


def write_final(job: TrainJob, progress: Progress) -> Path:
    """RUN_DIR/final/: the last step's model, or with run.final == "best" the best-validation one
    (the note inside says which step). Written from files, so a run killed after its last
    checkpoint and resumed writes the same final/."""
    out = job.run.out
    final = out / "final"
    if not job.info.is_main:
        return final
    use_best = job.run.final == "best" and (out / "best" / TRAINING_NOTE).is_file()
    source = out / "best" if use_best else latest_checkpoint(out)[1]
    if use_best:
        note = json.loads((source / TRAINING_NOTE).read_text())
    else:  # the last step, with its validation bound when that step was validated
        val = next((r["val_loss"] for r in read_metrics_lines(out / "metrics.jsonl")
                    if r.get("step") == progress.step and "val_loss" in r), None)
        note = {"step": progress.step, "val_loss": val, "kept": "last"}
    note |= {"max_steps": job.optim.max_steps, "selection": job.run.final}
    if job.task == "pretrain":  # the sequence length it read (a bidirectional model reads that length best)
        note["seq_len"] = job.config["data"]["seq_len"]
    with atomic_dir(final) as staging:
        write_model_files(load_model(source), staging, tokenizer=job.tokenizer)
        write_json(staging / TRAINING_NOTE, note)
    return final


def progress_bar(job: TrainJob, start: int):
    if not (job.run.progress and job.info.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=job.optim.max_steps, initial=start, desc=job.describe or job.objective, unit="step",
                dynamic_ncols=True, smoothing=0.1)


def open_run_dir(job: TrainJob) -> bool:
    """Create RUN_DIR (True if this call created it), clear what a killed run left, write config.yaml."""
    out = job.run.out
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RemaskError(f"cannot create run directory {out}: {e.strerror or e}") from None
    clear_leftovers(out)
    write_text(out / "config.yaml", yaml.safe_dump(job.config, sort_keys=False, allow_unicode=True))
    return created


def train(job: TrainJob) -> Path:
    """Run (or resume) training to optim.max_steps; returns RUN_DIR/final."""
    optim, run, info = job.optim, job.run, job.info
    per_rank, micro, accum = split_sizes(optim, info)
    created = open_run_dir(job) if info.is_main else False
    D.barrier(info)
    try:
        return _train(job, per_rank, micro, accum)
    except BaseException:
        # A start that failed before any checkpoint leaves nothing behind.
        if created and latest_checkpoint(run.out) is None and not (run.out / "final").exists():
            remove_dir(run.out)
        raise


def _train(job: TrainJob, per_rank: int, micro: int, accum: int) -> Path:
    optim, run, info = job.optim, job.run, job.info
    progress = restore(job)
    model: nn.Module = D.wrap_model(job.model, info, fsdp=run.fsdp)
    optimizer = build_optimizer(model, lr=optim.lr, weight_decay=optim.weight_decay, betas=(optim.beta1, optim.beta2))
    if progress.optimizer_state is not None:
        D.load_optimizer_state(model, optimizer, progress.optimizer_state, info)
    forward_model = torch.compile(model) if run.compile else model
    objective = OBJECTIVES[(job.task, job.objective)]
    val_fn = validation_fn(job)
    log = MetricsLog(run.out, progress.step, info.is_main)
    bar = progress_bar(job, progress.step)
    window_tokens, window_time, window_losses = 0, 0.0, []
    try:
        for step in range(progress.step, optim.max_steps):
            t0 = time.perf_counter()
            lr = wsd_lr(step, max_steps=optim.max_steps, peak=optim.lr, warmup_steps=optim.warmup_steps,
                        decay_fraction=optim.decay_fraction, min_ratio=optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = job.batch_fn(step)
            inputs = objective.make_inputs(batch, mask_id=job.tokenizer.mask_id, eps=job.mask_eps,
                                           stratified=job.t_sampling == "stratified",
                                           generator=step_generator(run.seed, step, Stream.MASKS))
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
            n_tokens = batch_tokens(batch)
            progress.step, progress.tokens = step + 1, progress.tokens + n_tokens
            window_tokens += n_tokens
            window_time += time.perf_counter() - t0
            window_losses.append(loss_value)
            done = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{window_tokens / max(window_time, 1e-9):,.0f}",
                                lr=f"{lr:.2e}", refresh=False)
            validate = val_fn is not None and (done % run.val_every == 0 or done == optim.max_steps)
            if done % run.log_every == 0 or done == optim.max_steps or validate:
                record = {"step": done, "loss": loss_value, "loss_avg": sum(window_losses) / len(window_losses),
                          "lr": lr, "tokens": progress.tokens,
                          "tokens_per_s": window_tokens / max(window_time, 1e-9), "grad_norm": grad_norm}
                if validate:
                    record |= val_fn(forward_model)
                    if bar is not None:
                        bar.write(f"step {done}: val_loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})",
                                  file=sys.stderr)
                    if run.final == "best" and (progress.best_val is None or record["val_loss"] < progress.best_val):
                        progress.best_step, progress.best_val = done, record["val_loss"]
                        save_best(job, model, progress)
                log.write(record)
                window_tokens, window_time, window_losses = 0, 0.0, []
            if done % run.save_every == 0 or done == optim.max_steps:
                save_checkpoint(job, model, optimizer, progress)
    finally:
        if bar is not None:
            bar.close()
        log.close()
    final = write_final(job, progress)
    D.barrier(info)
    return final
