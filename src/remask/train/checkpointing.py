"""Saving and resuming a training run: everything the loop writes to RUN_DIR and reads back.

    RUN_DIR/config.yaml          the run's configuration (rewritten at every start)
    RUN_DIR/metrics.jsonl        one object per logged step (cut back to the checkpoint on resume)
    RUN_DIR/checkpoints/step-N/  a model directory + trainer_state/ (optimizer.pt, rng.pt,
                                 trainer.json: step, tokens, best, config, data, RNG states)
    RUN_DIR/best/                the lowest validation loss so far (run.final == "best")
    RUN_DIR/final/               the model the run hands on, with its training note

Every write is staged and renamed into place (`remask.atomic`), and old checkpoints are renamed
out of sight before they are deleted, so a run killed at any moment (SIGKILL included) leaves
every visible step-N complete; what a kill leaves half-done is hidden (`.tmp-*`, `.trash-*`) and
cleared at the next start. All randomness in training is a function of (seed, step), so the step
*is* the data position; RNG states are saved as well for anything outside that scheme. A resume
is refused, before anything is written, when the checkpoint holds another model, objective or
data than the run asks for. Weights go through `remask.checkpoint` (safetensors).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from torch import nn

from remask.atomic import atomic_dir, clear_staging, remove_dir, write_json, write_text
from remask.checkpoint import load_config, load_model, write_model_files
from remask.checkpoint.model_dir import TRAINING_NOTE
from remask.data.tokenize import tokenizer_sha256
from remask.errors import RemaskError
from remask.model import Transformer
from remask.train import distributed as D
from remask.train.config import RunConfig

if TYPE_CHECKING:  # the loop hands its job in; only its type is needed here
    from remask.train.loop import TrainJob

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_DIR = "trainer_state"


# --- the run directory ------------------------------------------------------------------------------


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """(step, directory) of the newest complete checkpoint, None before the first."""
    dirs = step_dirs(run_dir)
    return dirs[-1] if dirs else None


def clear_leftovers(run_dir: Path) -> None:
    """Staging and trash directories a killed run left behind are incomplete by definition."""
    clear_staging(run_dir)
    clear_staging(run_dir / "checkpoints")


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


# --- metrics.jsonl ----------------------------------------------------------------------------------


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


# --- trainer state: RNG, optimizer, trainer.json -----------------------------------------------------


def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors for rng.pt, JSON-able python/numpy states) of every global generator."""
    tensors: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    plain = {"python": [version, list(internal), gauss_next], "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}
    return tensors, plain


def restore_rng(checkpoint: Path, trainer: dict[str, Any]) -> None:
    """Set every global generator to the state saved with `checkpoint`."""
    tensors = torch.load(checkpoint / STATE_DIR / "rng.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    version, internal, gauss_next = trainer["rng"]["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, pos, has_gauss, gauss = trainer["rng"]["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))


def write_step_checkpoint(run_dir: Path, step: int, model, tokenizer, *, optimizer_state: dict,
                          trainer: dict[str, Any], keep: int) -> Path:
    """Stage model + trainer state, rename to checkpoints/step-N; then prune to the newest `keep`."""
    final = run_dir / "checkpoints" / f"step-{step}"
    with atomic_dir(final) as staging:  # re-saving a step (after a resume) swaps it atomically
        write_model_files(model, staging, tokenizer=tokenizer)
        state_dir = staging / STATE_DIR
        state_dir.mkdir()
        torch.save(optimizer_state, state_dir / "optimizer.pt")
        rng_tensors, rng_plain = rng_state()
        torch.save(rng_tensors, state_dir / "rng.pt")
        (state_dir / "trainer.json").write_text(json.dumps(trainer | {"rng": rng_plain}))
    for _, old in step_dirs(run_dir)[:-keep]:
        try:
            remove_dir(old)
        except OSError as e:
            raise RemaskError(f"cannot remove old checkpoint {old}: {e.strerror or e}") from None
    return final


def _unreadable(checkpoint: Path, e: Exception) -> RemaskError:
    return RemaskError(f"checkpoint {checkpoint} has no readable trainer state ({e.__class__.__name__})")


def read_trainer_json(checkpoint: Path) -> dict[str, Any]:
    """trainer.json of a step directory (step, tokens, task, objective, config, data, RNG)."""
    try:
        return json.loads((checkpoint / STATE_DIR / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise _unreadable(checkpoint, e) from None


def read_trainer_state(checkpoint: Path) -> tuple[dict[str, Any], dict]:
    """(trainer.json contents, optimizer state) of a step directory; loads tensors only."""
    trainer = read_trainer_json(checkpoint)
    try:
        optimizer = torch.load(checkpoint / STATE_DIR / "optimizer.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise _unreadable(checkpoint, e) from None
    return trainer, optimizer


# --- what a resume must match: the model and the data -------------------------------------------------


def check_same_model(checkpoint: Path, expected) -> None:
    """Refuse to resume a run whose checkpoint holds a different architecture."""
    saved = load_config(checkpoint)
    keys = ("vocab_size", "d_model", "n_layers", "n_heads", "effective_n_kv_heads", "mlp_hidden_size", "attention",
            "block_length", "weight_tying")
    diffs = [f"{k} {getattr(saved, k)} != {getattr(expected, k)}" for k in keys if getattr(saved, k) != getattr(expected, k)]
    if diffs:
        raise RemaskError(f"cannot resume from {checkpoint}: it holds a different model ({'; '.join(diffs)})")


def data_record(source: str | Path, sha256: str, tokenizer) -> dict[str, str]:
    """What a run trains on, as its checkpoints record it: the source as given, a sha256 of its
    content (the corpus' documents, the SFT file's bytes) and the tokenizer's."""
    return {"source": str(source), "sha256": sha256, "tokenizer_sha256": tokenizer_sha256(tokenizer)}


def check_resume_data(run: RunConfig, data: dict[str, str]) -> None:
    """On --resume, RemaskError unless the newest checkpoint trained on `data` (checkpoints from
    before runs recorded their data are not checked). Reads only: workflows call it before they
    write anything (caches included)."""
    found = latest_checkpoint(run.out) if run.resume else None
    if found is None:
        return
    saved = read_trainer_json(found[1]).get("data")
    if not isinstance(saved, dict):
        return
    where = f"cannot resume from {found[1]}"
    if saved.get("sha256") != data["sha256"]:
        raise RemaskError(f"{where}: the run trained on {saved.get('source')} (sha256 {str(saved.get('sha256'))[:12]}), "
                          f"not on {data['source']} (sha256 {data['sha256'][:12]}); give it its own --data, or "
                          "another --out for a new run")
    if saved.get("tokenizer_sha256") != data["tokenizer_sha256"]:
        raise RemaskError(f"{where}: the run trained with another tokenizer (sha256 "
                          f"{str(saved.get('tokenizer_sha256'))[:12]}, now {data['tokenizer_sha256'][:12]})")


# --- resume -----------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run stands: restored from its newest checkpoint on --resume."""

    step: int = 0
    tokens: int = 0
    best_step: int | None = None
    best_val: float | None = None
    optimizer_state: dict | None = None


def restore(job: TrainJob) -> Progress:
    """The run's progress -- on --resume, the latest checkpoint's weights (into job.model), RNG
    states, step (the data position), token count and best validation. Writes nothing."""
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


def restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress, info: D.DistInfo) -> None:
    """Load the resumed optimizer state (if any) into the freshly built optimizer of the wrapped model."""
    if progress.optimizer_state is not None:
        D.load_optimizer_state(model, optimizer, progress.optimizer_state, info)


# --- save -------------------------------------------------------------------------------------------


def plain_model(job: TrainJob, model: nn.Module) -> Transformer | None:
    """The full model on the CPU in the main process (all processes must call this under FSDP)."""
    state = D.full_state_dict(model, job.info)
    if not job.info.is_main:
        return None
    plain = Transformer(job.model.config)
    plain.load_state_dict(state, assign=True)
    return plain


def save_checkpoint(job: TrainJob, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
    """checkpoints/step-N/ for progress.step. All processes gather (FSDP needs them); the main one writes."""
    plain = plain_model(job, model)
    opt_state = D.optimizer_state(model, optimizer, job.info)
    if plain is not None:
        trainer = {"step": progress.step, "tokens": progress.tokens, "task": job.task, "objective": job.objective,
                   "seed": job.run.seed, "best_step": progress.best_step, "best_val": progress.best_val,
                   "config": job.config, "data": job.data}
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
