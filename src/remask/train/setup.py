"""What the training workflows share: checking the run directory before anything is written,
starting the processes, building the model, and cutting held-out data into batches.

Pretraining and SFT import from here and from `loop`; they never import each other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from remask.atomic import check_writable_dir
from remask.checkpoint import load_model
from remask.config import ModelConfig
from remask.errors import ConfigError, RemaskError
from remask.model import Transformer, build_model
from remask.train import distributed as D
from remask.train.checkpointing import latest_checkpoint
from remask.train.config import Objective, RunConfig
from remask.train.objectives import Noise


def check_run_dir(run: RunConfig) -> None:
    """Everything about RUN_DIR that would otherwise fail later: not a file, writable (or
    creatable), its parts not files, and an existing run only with --resume. Writes nothing."""
    out = run.out
    if out.exists() and not out.is_dir():
        raise RemaskError(f"run directory {out} exists and is not a directory")
    for part in ("checkpoints", "final", "best"):
        if (out / part).exists() and not (out / part).is_dir():
            raise RemaskError(f"{out / part} exists and is not a directory; the run needs it for its checkpoints")
    if (out / "metrics.jsonl").is_dir():
        raise RemaskError(f"{out / 'metrics.jsonl'} is a directory; the run writes its metrics there")
    check_writable_dir(out, "run directory")
    if (out / "checkpoints").is_dir():
        check_writable_dir(out / "checkpoints", "checkpoint directory")
    found = latest_checkpoint(out)
    if run.resume:
        return
    if found is not None:
        raise RemaskError(f"{out} already holds a run (step {found[0]}); pass --resume to continue it "
                          "or choose another --out")
    if (out / "final").is_dir():
        raise RemaskError(f"{out} already holds a finished run (final/); choose another --out")


def start(run: RunConfig) -> D.DistInfo:
    """Check the run directory, then join torchrun's process group (if any) on the chosen device."""
    check_run_dir(run)
    return D.init_distributed(run.device)


LAYOUTS = {"mdm": "full", "ar": "causal", "bd": "block"}  # objective -> the attention layout it trains


def run_layout(objective: Objective, block_length: int | None, start: ModelConfig) -> dict:
    """The attention settings the objective trains, for a model that starts as `start`: block
    diffusion takes the run's block length, else the starting block model's own."""
    if objective != "bd":
        return {"attention": LAYOUTS[objective], "block_length": None}
    length = block_length if block_length is not None else start.block_length
    if length is None:
        raise ConfigError("is required with --objective bd (the starting model is not a block model)",
                          field="block_length")
    return {"attention": "block", "block_length": length}


def build_run_model(architecture: ModelConfig | None, init_from: Path | None, objective: Objective, *,
                    seq_len: int, seed: int, device: torch.device, block_length: int | None = None) -> Transformer:
    """A fresh model of `architecture`, or init_from's weights (a conversion when init_from has
    another layout), with the attention layout of the objective."""
    loaded = load_model(init_from) if init_from is not None else None
    start_cfg = loaded.config if loaded is not None else architecture
    cfg = start_cfg.replace(**run_layout(objective, block_length, start_cfg))
    reach = seq_len + (cfg.block_length - 1 if cfg.attention == "block" else 0)  # SFT shifts rows onto the grid
    if reach > cfg.max_sequence_length:
        raise RemaskError(f"seq_len {seq_len} exceeds the model's max_sequence_length {cfg.max_sequence_length}"
                          + (f" less block_length - 1 ({cfg.block_length - 1})" if reach != seq_len else ""))
    if loaded is None:
        return build_model(cfg, seed=seed).to(device)
    model = Transformer(cfg)
    model.load_state_dict(loaded.state_dict())
    return model.to(device)


def noise(cfg, tokenizer, model: Transformer) -> Noise:
    """The run's forward process: its settings, the tokenizer's mask id, the model's block length,
    the two-stream pass's attention kernel (flex: refused off CUDA, before anything is written)."""
    kernel = cfg.run.attention_kernel
    if kernel == "flex" and next(model.parameters()).device.type != "cuda":
        raise ConfigError("flex needs a CUDA device (FlexAttention has no backward pass on the CPU); "
                          "use sdpa", field="--run.attention-kernel")
    return Noise(tokenizer.mask_id, cfg.mask_eps, cfg.t_sampling == "stratified", (cfg.t_min, cfg.t_max),
                 model.config.block_length, kernel)


def micro_batch_size(micro: int | None, batch_size: int, info: D.DistInfo) -> int:
    """Rows per forward pass (validation uses the training micro-batch size)."""
    return micro or max(1, batch_size // info.world)
