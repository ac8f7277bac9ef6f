"""The training configuration shared by pretraining and SFT: one dataclass, validated on
construction, loaded from recipe YAML (unknown keys are errors) and overridden from the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from remask.config import PRESETS, ConfigError, from_known_keys


@dataclass(frozen=True)
class TrainConfig:
    """What to train, on what, and how. Sizes are in sequences and tokens."""

    data: str = "builtin:tang300"
    """Corpus: builtin:tang300|shakespeare|kjv, a .txt/.jsonl file or a directory (SFT: a .jsonl of
    messages or prompt/response)."""
    out: Path = Path("runs/pretrain")
    """Run directory: metrics.jsonl, checkpoints/step-N/, final/."""
    objective: Literal["mdm", "ar"] = "mdm"
    """mdm: the masked-diffusion objective; ar: the autoregressive twin (causal mask, next-token loss)."""
    init_from: Path | None = None
    """Start from this model directory (its weights and tokenizer) instead of a fresh model."""
    # --- model (a preset plus optional overrides) ---
    preset: str = "tiny"
    """Model preset: tiny, demo, small, 100m, llada-8b."""
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    mlp_hidden_size: int | None = None
    # --- tokenizer ---
    tokenizer: Literal["char", "bpe"] = "char"
    """Tokenizer trained on the corpus (ignored with init_from: the model's own is used)."""
    vocab_size: int = 4096
    # --- batches ---
    seq_len: int = 256
    batch_size: int = 16
    """Sequences per optimizer step, over all processes."""
    micro_batch_size: int | None = None
    """Sequences per forward pass and process (gradient accumulation makes up the rest)."""
    max_steps: int = 1000
    val_fraction: float = 0.05
    # --- optimisation ---
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    """Final fraction of steps over which the learning rate decays linearly (WSD schedule)."""
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    mask_eps: float = 1e-3
    """eps of the mask probability p = (1 - eps) t + eps."""
    short_batch_prob: float = 0.01
    """Fraction of pretraining batches cut to a random shorter length (LLaDA: 1%)."""
    # --- hardware ---
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast where the device supports it (CUDA), else fp32."""
    compile: bool = False
    """torch.compile the model."""
    fsdp: bool = False
    """Under torchrun: shard the model with FSDP2 instead of replicating it with DDP."""
    # --- bookkeeping ---
    seed: int = 0
    log_every: int = 10
    val_every: int = 100
    val_batches: int = 8
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    """Show a progress bar (loss, tokens/s, learning rate, ETA)."""

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.preset in PRESETS, f"unknown model preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        for name in ("seq_len", "batch_size", "max_steps", "log_every", "val_every", "val_batches", "save_every",
                     "keep_checkpoints", "vocab_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(self.micro_batch_size is None or self.micro_batch_size > 0, "micro_batch_size must be positive")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        need(0 <= self.decay_fraction <= 1, "decay_fraction must be in [0, 1]")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        need(0 < self.val_fraction < 1, "val_fraction must be in (0, 1)")
        need(0 < self.mask_eps < 1, "mask_eps must be in (0, 1)")
        need(0 <= self.short_batch_prob <= 1, "short_batch_prob must be in [0, 1]")
        need(self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)")

    def model_overrides(self) -> dict[str, int]:
        names = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        values = dict(data)
        for key in ("out", "init_from"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        return from_known_keys(cls, values, "recipe")


def load_recipe(path: str | Path) -> TrainConfig:
    """A TrainConfig from a recipe YAML (a flat mapping of TrainConfig fields)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {p} must be a mapping of option: value")
    try:
        return TrainConfig.from_dict(data)
    except TypeError as e:
        raise ConfigError(f"recipe {p}: {e}") from None
