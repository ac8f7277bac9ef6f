"""Model configuration: one dataclass, named presets, validated on construction.

Special-token ids are *not* part of a preset: they come from the tokenizer
(`remask.tokenizer.Tokenizer.special_ids`) and are attached with `with_tokens`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remask.errors import RemaskError


class ConfigError(RemaskError):
    """A configuration value is invalid; the message names the field."""


def from_known_keys(cls: type, data: dict[str, Any], what: str):
    """cls(**data) for a config dataclass, refusing keys it does not have (one-line error)."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {what} key(s): {', '.join(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    """LLaMA-style mask predictor (LLaDA, arXiv 2502.09992, section 2.1).

    `causal=True` gives the autoregressive twin; nothing else differs.
    """

    vocab_size: int = 1024
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> n_heads (plain multi-head attention)
    mlp_hidden_size: int = 352  # SwiGLU inner width
    max_sequence_length: int = 512
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False  # LLaDA keeps an untied output head
    embedding_size: int | None = None  # rows of wte / logits width; None -> vocab_size
    init_std: float = 0.02
    causal: bool = False
    # Filled from the tokenizer, never written by hand in code.
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown config.json keys kept verbatim

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden_size",
                     "max_sequence_length"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(self.d_model % self.n_heads == 0,
             f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        need(self.head_dim % 2 == 0, f"head dimension ({self.head_dim}) must be even for rotary embeddings")
        need(self.kv_heads > 0 and self.n_heads % self.kv_heads == 0,
             f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        need(self.padded_vocab >= self.vocab_size,
             f"embedding_size ({self.embedding_size}) must be >= vocab_size ({self.vocab_size})")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            need(value is None or 0 <= value < self.padded_vocab,
                 f"{name}={value} is outside the vocabulary (size {self.padded_vocab})")

    # --- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def padded_vocab(self) -> int:
        return self.vocab_size if self.embedding_size is None else self.embedding_size

    def num_parameters(self, *, embeddings: bool = True) -> int:
        """Exact parameter count of `remask.model.Transformer` built from this config."""
        d, h = self.d_model, self.mlp_hidden_size
        kv = self.kv_heads * self.head_dim
        block = d * d + 2 * d * kv + d * d + 3 * d * h + 2 * d  # q,k,v,o + swiglu + 2 norms
        emb = self.padded_vocab * d * (1 if self.weight_tying else 2)
        return self.n_layers * block + d + (emb if embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (2 per multiply-add): matmuls plus attention scores.

        Training (forward + backward) costs 3x this. Attention counts the full T x T
        score matrix for both the bidirectional and the causal model, since SDPA's
        CPU kernels do not skip the masked half; a causal kernel on GPU does half.
        """
        matmul = 2 * self.num_parameters(embeddings=False) + 2 * self.padded_vocab * self.d_model
        attention = 2 * 2 * self.n_layers * seq_len * self.d_model  # QK^T and AV
        return float(matmul + attention)

    # --- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_known_keys(cls, data, "model config")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_tokens(self, special_ids: dict[str, int | None], vocab_size: int) -> ModelConfig:
        """Attach a tokenizer: its vocabulary size and its special-token ids by name."""
        return self.replace(
            vocab_size=vocab_size,
            embedding_size=None if self.embedding_size is None else max(self.embedding_size, vocab_size),
            mask_token_id=special_ids.get("mask"),
            eos_token_id=special_ids.get("eos"),
            pad_token_id=special_ids.get("pad", special_ids.get("eos")),
            bos_token_id=special_ids.get("bos"),
        )

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# Named presets. Parameter counts quoted with their default vocabulary; the real vocabulary
# comes from the tokenizer and changes the embedding share only.
PRESETS: dict[str, ModelConfig] = {
    # ~1.1M parameters: unit tests and quick experiments.
    "tiny": ModelConfig(vocab_size=1024, d_model=128, n_layers=4, n_heads=4,
                        mlp_hidden_size=352, max_sequence_length=512),
    # ~4.5M parameters with a 4k-character vocabulary: the CPU demo model.
    "demo": ModelConfig(vocab_size=4096, d_model=192, n_layers=6, n_heads=6,
                        mlp_hidden_size=512, max_sequence_length=512),
    # ~10.6M parameters.
    "small": ModelConfig(vocab_size=4096, d_model=256, n_layers=10, n_heads=8,
                         mlp_hidden_size=768, max_sequence_length=1024),
    # ~100M parameters (the GPU benchmark size).
    "100m": ModelConfig(vocab_size=32000, d_model=640, n_layers=12, n_heads=10,
                        mlp_hidden_size=1728, max_sequence_length=2048, rope_theta=500_000.0),
    # LLaDA-8B (the published base model's shapes).
    "llada-8b": ModelConfig(vocab_size=126464, d_model=4096, n_layers=32, n_heads=32,
                            n_kv_heads=32, mlp_hidden_size=12288, max_sequence_length=4096,
                            rope_theta=500_000.0),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
