"""Configuration: one validation helper and one dict round trip for every config dataclass, and
the model configuration with its named presets.

A config is a frozen dataclass deriving from `ConfigBase`. Its fields are checked against their
type annotations when it is built (bools are bools, ints are ints, floats finite, a `Literal`
one of its values, `X | None` either) and against the bounds given with `setting(...)`; a class
adds cross-field checks in `check()`. Failures raise `ConfigError` naming the field.

Special-token ids are *not* part of a preset: they come from the tokenizer
(`remask.tokenizer.Tokenizer.special_ids`) and are attached with `ModelConfig.with_tokens`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from remask.errors import ConfigError

__all__ = ["PRESETS", "ConfigBase", "ConfigError", "ModelConfig", "preset", "setting"]

SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes seeds below this


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A dataclass field with bounds checked by `ConfigBase` (None: unbounded)."""
    return field(default=default, default_factory=default_factory,
                 metadata={"bounds": (ge, gt, le, lt)})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(options) + (" or null" if type(None) in typing.get_args(tp) else "")
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
                Path: "a path"}.get(tp, f"a {tp.__name__}")
    return str(tp)


_NO = object()


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp` (an int where a float is wanted, a str where a Path is), or _NO."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            out = _coerce(value, option)
            if out is not _NO:
                return out
        return _NO
    if tp is type(None):
        return None if value is None else _NO
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in typing.get_args(tp)) else _NO
    if tp is Any:
        return value
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    if tp is Path:
        return Path(value) if isinstance(value, str | Path) else _NO
    if origin is dict:
        return value if isinstance(value, dict) else _NO
    if origin in (list, tuple):
        return value if isinstance(value, list | tuple) else _NO
    if isinstance(tp, type):
        return value if isinstance(value, tp) else _NO
    return value


def _check_bounds(cls: type, name: str, value: Any, bounds: tuple) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    ge, gt, le, lt = bounds
    for bound, ok, word in ((ge, lambda b: value >= b, ">="), (gt, lambda b: value > b, ">"),
                            (le, lambda b: value <= b, "<="), (lt, lambda b: value < b, "<")):
        if bound is not None and not ok(bound):
            shown = bound if isinstance(bound, int) else f"{bound:g}"
            raise ConfigError(f"must be {word} {shown}, got {value!r}", field=name, owner=cls)


class ConfigBase:
    """Validation on construction, a strict dict round trip and `replace`, for frozen dataclasses."""

    def __post_init__(self) -> None:
        cls = type(self)
        hints = _hints(cls)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = hints[f.name]
            coerced = _coerce(value, tp)
            if coerced is _NO:
                raise ConfigError(f"must be {_describe(tp)}, got {value!r}", field=f.name, owner=cls)
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
            if "bounds" in f.metadata:
                _check_bounds(cls, f.name, coerced, f.metadata["bounds"])
        self.check()

    def check(self) -> None:
        """Cross-field checks; raise ConfigError (via `self.need`)."""

    def need(self, ok: bool, field_name: str, detail: str) -> None:
        if not ok:
            raise ConfigError(detail, field=field_name, owner=type(self))

    def replace(self, **changes: Any):
        """A copy with `changes` applied (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown {type(self).__name__} field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (paths as strings, nested configs as dicts): YAML and JSON safe."""

        def plain(value: Any) -> Any:
            if isinstance(value, ConfigBase):
                return value.to_dict()
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [plain(v) for v in value]
            return value

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Any, *, where: str | None = None):
        """Build from plain data; unknown keys and wrong types are ConfigErrors naming the key."""
        what = where or cls.__name__
        if not isinstance(data, dict):
            raise ConfigError(f"{what} must be a mapping of field: value, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"unknown {what} key(s): {', '.join(map(str, unknown))}")
        values = {}
        hints = _hints(cls)
        for key, value in data.items():
            nested = _config_class(hints[key])
            if nested is not None and isinstance(value, dict):
                value = nested.from_dict(value, where=f"{what}.{key}" if where else key)
            values[key] = value
        missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{what} lacks required key(s): {', '.join(missing)}")
        return cls(**values)


def _config_class(tp: Any) -> type | None:
    """The ConfigBase subclass in an annotation (also inside `X | None`), else None."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    for option in options:
        if isinstance(option, type) and issubclass(option, ConfigBase):
            return option
    return None


# --- the model ---------------------------------------------------------------------------------

AttentionLayout = Literal["full", "causal", "block"]
TOKEN_FIELDS = ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")


@dataclass(frozen=True)
class ModelConfig(ConfigBase):
    """LLaMA-style mask predictor (LLaDA, arXiv 2502.09992, section 2.1).

    The attention layout is the one difference between the three kinds of model: `full`
    (LLaDA's mask predictor), `causal` (the autoregressive twin) and `block` (block diffusion,
    BD3-LM: blocks of `block_length` positions, bidirectional inside a block, causal across).
    """

    vocab_size: int = setting(1024, gt=0)
    """Token ids the tokenizer can produce."""
    d_model: int = setting(128, gt=0)
    """Hidden width."""
    n_layers: int = setting(4, gt=0)
    """Transformer blocks."""
    n_heads: int = setting(4, gt=0)
    """Attention (query) heads."""
    n_kv_heads: int | None = setting(None, gt=0)
    """Key/value heads (grouped-query attention); None: as many as n_heads."""
    mlp_hidden_size: int = setting(352, gt=0)
    """SwiGLU inner width."""
    max_sequence_length: int = setting(512, gt=0)
    """Longest sequence (prompt + answer) the model accepts."""
    rope_theta: float = setting(10_000.0, gt=0)
    """Rotary embedding base."""
    rms_norm_eps: float = setting(1e-5, gt=0)
    """RMSNorm epsilon."""
    weight_tying: bool = False
    """Share the embedding and output matrices (LLaDA keeps them untied)."""
    embedding_size: int | None = setting(None, gt=0)
    """Rows of the embedding / logits width; None: vocab_size."""
    init_std: float = setting(0.02, gt=0)
    """Standard deviation of the initial weights."""
    attention: AttentionLayout = "full"
    """full: every position sees every other (LLaDA); causal: each sees those before it (the AR
    twin); block: each sees its own block and the blocks before it (block diffusion)."""
    block_length: int | None = setting(None, gt=0)
    """Positions per block of the `block` layout (position p is in block p // block_length); only
    with attention block."""
    # Filled from the tokenizer, never written by hand in code.
    mask_token_id: int | None = setting(None, ge=0)
    eos_token_id: int | None = setting(None, ge=0)
    pad_token_id: int | None = setting(None, ge=0)
    bos_token_id: int | None = setting(None, ge=0)
    extra: dict[str, Any] = field(default_factory=dict)
    """Unknown config.json keys, kept verbatim."""

    def check(self) -> None:
        self.need(self.attention != "block" or self.block_length is not None, "block_length",
                  "is required with attention block")
        self.need(self.attention == "block" or self.block_length is None, "block_length",
                  f"({self.block_length}) goes with attention block only (attention is {self.attention!r})")
        self.need(self.d_model % self.n_heads == 0, "d_model",
                  f"({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        self.need(self.head_dim % 2 == 0, "d_model",
                  f"/ n_heads = head dimension {self.head_dim}, which must be even for rotary embeddings")
        self.need(self.n_heads % self.effective_n_kv_heads == 0, "n_kv_heads",
                  f"({self.effective_n_kv_heads}) must divide n_heads ({self.n_heads})")
        self.need(self.padded_vocab >= self.vocab_size, "embedding_size",
                  f"({self.embedding_size}) must be >= vocab_size ({self.vocab_size})")
        for name in TOKEN_FIELDS:
            value = getattr(self, name)
            self.need(value is None or value < self.padded_vocab, name,
                      f"={value} is outside the vocabulary (size {self.padded_vocab})")

    # --- derived sizes -------------------------------------------------------------------
    @property
    def causal(self) -> bool:
        """The autoregressive twin's layout: next-token prediction, exact likelihood, KV decoding."""
        return self.attention == "causal"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def effective_n_kv_heads(self) -> int:
        """n_kv_heads with None resolved to n_heads (LLaDA's `effective_n_kv_heads`)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def padded_vocab(self) -> int:
        return self.vocab_size if self.embedding_size is None else self.embedding_size

    def num_parameters(self, *, embeddings: bool = True) -> int:
        """Exact parameter count of `remask.model.Transformer` built from this config."""
        d, h = self.d_model, self.mlp_hidden_size
        kv = self.effective_n_kv_heads * self.head_dim
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


# Fields a recipe may override on a preset: the architecture, not what the tokenizer or the
# objective (the attention layout) decide.
ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                            if f.name not in (*TOKEN_FIELDS, "vocab_size", "attention", "block_length", "extra"))

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
    """A named preset with optional architecture overrides (applied with `replace`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    bad = sorted(set(overrides) - set(ARCHITECTURE_FIELDS))
    if bad:
        raise ConfigError(f"cannot override {', '.join(bad)} on a preset; overridable: {', '.join(ARCHITECTURE_FIELDS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
