"""Training configuration in sections: model, data, optimiser/schedule, run.

Pretraining and SFT each take only what they use (`PretrainConfig`, `SFTConfig`). A recipe is
sectioned YAML (`load_recipe`); the CLI turns every field into an option named by its path
(`--optim.lr`), and the common ones also have a short name (`--lr`, `--seq-len`, `--out`).
The model section is a preset plus overrides of `ModelConfig` fields, generated from
`ModelConfig` itself and applied with `replace`, so every architecture field is overridable
and none is declared twice.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro
import yaml

from remask.config import ARCHITECTURE_FIELDS, PRESETS, SEED_LIMIT, ConfigBase, ModelConfig, preset, setting
from remask.errors import ConfigError

Objective = Literal["mdm", "ar", "bd"]


def short(name: str) -> Any:
    """An extra, unprefixed option name for a section field (`--lr` beside `--optim.lr`)."""
    return tyro.conf.arg(aliases=(name,))


# --- model ------------------------------------------------------------------------------------


class _ModelSectionBase(ConfigBase):
    """A preset plus ModelConfig overrides; `build` applies them with `replace`."""

    def overrides(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS if getattr(self, name) is not None}

    def to_dict(self) -> dict[str, Any]:
        """Only what is set: a preset, and the overrides actually given."""
        return {k: v for k, v in super().to_dict().items() if v is not None or k == "preset"}

    def check(self) -> None:
        self.need(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        self.need(self.init_from is None or not self.overrides(), "init_from",
                  "takes the architecture from the model directory; drop the overrides "
                  f"({', '.join(self.overrides())})")
        self.build()  # the overridden architecture must itself be valid

    def build(self, special_ids: dict[str, int | None] | None = None, vocab_size: int | None = None) -> ModelConfig:
        """The preset with the overrides; with a tokenizer's ids and size attached when given."""
        cfg = preset(self.preset, **self.overrides())
        return cfg if vocab_size is None else cfg.with_tokens(special_ids or {}, vocab_size)


def _model_section() -> type:
    hints = typing.get_type_hints(ModelConfig)
    spec: list[tuple[str, Any, Any]] = [
        ("preset", Annotated[str, short("--preset"), tyro.conf.arg(help=f"Model preset: {', '.join(PRESETS)}.")],
         field(default="tiny")),
        ("init_from", Annotated[Path | None, tyro.conf.arg(
            help="Start from this model directory (weights, tokenizer, architecture) instead of a fresh preset model.")],
         field(default=None)),
    ]
    for name in ARCHITECTURE_FIELDS:
        tp = hints[name]
        optional = tp if type(None) in typing.get_args(tp) else tp | None
        spec.append((name, Annotated[optional, tyro.conf.arg(help=f"Override the preset's {name}.")],
                     field(default=None)))
    cls = dataclasses.make_dataclass("ModelSection", spec, bases=(_ModelSectionBase,), frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = "Model: a preset plus overrides of any ModelConfig architecture field (None keeps the preset's)."
    return cls


ModelSection = _model_section()


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusData(ConfigBase):
    """Pretraining data: a corpus, the tokenizer trained on it, and how it is cut into sequences."""

    source: Annotated[str, short("--data")] = "builtin:tang300"
    """Corpus: builtin:tang300|shakespeare|kjv, a .txt/.jsonl file or a directory."""
    tokenizer: Literal["char", "bpe"] = "char"
    """Tokenizer trained on the corpus (a resumed run keeps its own)."""
    vocab_size: int = setting(4096, gt=0)
    """Tokenizer vocabulary size (special tokens included)."""
    seq_len: Annotated[int, short("--seq-len")] = setting(256, gt=0)
    """Tokens per training sequence."""
    val_fraction: float = setting(0.05, gt=0, lt=1)
    """Fraction of documents held out for validation."""
    short_batch_prob: float = setting(0.01, ge=0, le=1)
    """Fraction of batches cut to a random shorter length (LLaDA section 2.3: 1%)."""
    packing: Literal["concat", "shift", "pad"] = "concat"
    """concat: documents joined and cut into seq_len chunks (LLaDA); shift: the same, cut at a fresh
    offset every epoch (for many epochs over a small corpus: texts are learnt apart from the
    chunks they fell in); pad: each document its own sequences, the last filled with end-of-text,
    so the model learns where a text ends."""


@dataclass(frozen=True)
class DialogueData(ConfigBase):
    """SFT data: JSONL dialogues rendered with the model's chat template."""

    source: Annotated[Path | None, short("--data")] = None
    """A .jsonl file of {"messages": [...]} or {"prompt", "response"} lines."""
    seq_len: Annotated[int, short("--seq-len")] = setting(256, gt=0)
    """Longest example (prompt + answer) in tokens; longer answers are cut."""
    val_fraction: float = setting(0.05, ge=0, lt=1)
    """Fraction of examples held out for validation (at least one; none below 10 examples or at 0,
    so that every dialogue is trained on)."""
    group_by_length: bool = False
    """Batch examples of about one length (pools of 16 batches sorted by length), so that a short
    answer does not carry a long one's EOS pads, which take its loss's weight."""


# --- optimiser and schedule -----------------------------------------------------------------------


@dataclass(frozen=True)
class OptimConfig(ConfigBase):
    """AdamW with the warmup-stable-decay schedule (LLaDA section 2.3), batch sizes and length."""

    lr: Annotated[float, short("--lr")] = setting(1e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = setting(0.1, ge=0)
    """AdamW weight decay on the matrices."""
    beta1: float = setting(0.9, ge=0, lt=1)
    beta2: float = setting(0.95, ge=0, lt=1)
    grad_clip: float = setting(1.0, ge=0)
    """Gradient-norm clipping; 0 disables it."""
    batch_size: Annotated[int, short("--batch-size")] = setting(16, gt=0)
    """Sequences per optimizer step, over all processes."""
    micro_batch_size: int | None = setting(None, gt=0)
    """Sequences per forward pass and process (gradient accumulation makes up the rest)."""
    max_steps: Annotated[int, short("--max-steps")] = setting(1000, gt=0)
    """Optimizer steps in all."""
    warmup_steps: int = setting(100, ge=0)
    decay_fraction: float = setting(0.2, ge=0, le=1)
    """Final fraction of steps over which the learning rate decays linearly."""
    min_lr_ratio: float = setting(0.1, ge=0, le=1)
    """The learning rate at the end, as a fraction of the peak."""


# --- run --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig(ConfigBase):
    """Where and how the run executes: directory, seed, hardware, logging and checkpoints."""

    out: Annotated[Path, short("--out")] = Path("runs/pretrain")
    """Run directory: metrics.jsonl, checkpoints/step-N/, final/."""
    seed: Annotated[int, short("--seed")] = setting(0, ge=0, lt=SEED_LIMIT)
    """Seed of every random choice (initialisation, batches, masks)."""
    device: Annotated[Literal["auto", "cpu", "cuda"], short("--device")] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast where the device supports it (CUDA), else fp32."""
    compile: bool = False
    """torch.compile the model."""
    fsdp: bool = False
    """Under torchrun: shard the model with FSDP2 instead of replicating it with DDP."""
    attention_kernel: Literal["sdpa", "flex"] = "sdpa"
    """Block diffusion's two-stream training pass: sdpa (a boolean mask, every device) or flex
    (FlexAttention's block-sparse kernel, compiled; CUDA only: FlexAttention has no backward on CPU)."""
    log_every: int = setting(10, gt=0)
    val_every: int = setting(100, gt=0)
    val_batches: int = setting(8, gt=0)
    """Micro-batches of held-out data per validation."""
    save_every: int = setting(500, gt=0)
    keep_checkpoints: int = setting(2, gt=0)
    final: Literal["last", "best"] = "last"
    """What final/ holds: the last step's model, or the one with the best validation loss."""
    resume: Annotated[bool, short("--resume")] = False
    """Continue the run in `out` from its newest checkpoint."""
    progress: Annotated[bool, short("--progress")] = True
    """Show a progress bar (loss, tokens/s, learning rate, ETA)."""


# --- the two workflows --------------------------------------------------------------------------------


def check_noise(cfg: ConfigBase) -> None:
    """The cross-field rules the two workflows share: a block length and the flex kernel only for
    block diffusion, and a non-empty range of t."""
    cfg.need(cfg.block_length is None or cfg.objective == "bd", "block_length",
             f"({cfg.block_length}) is for --objective bd only (objective is {cfg.objective!r})")
    cfg.need(cfg.t_min < cfg.t_max, "t_min", f"({cfg.t_min:g}) must be below t_max ({cfg.t_max:g})")
    cfg.need(cfg.run.attention_kernel == "sdpa" or cfg.objective == "bd", "objective",
             f"({cfg.objective}) has no two-stream pass: --run.attention-kernel flex is for --objective bd")


@dataclass(frozen=True)
class PretrainConfig(ConfigBase):
    """Pretraining (LLaDA section 2.3) of a masked diffusion LM, or of its autoregressive twin."""

    objective: Objective = "mdm"
    """mdm: the masked-diffusion objective; ar: the autoregressive twin (causal mask, next-token loss);
    bd: block diffusion (BD3-LM: blocks of --block-length, masked diffusion inside, causal across)."""
    block_length: int | None = setting(None, gt=0)
    """bd: positions per block (L'); with --model.init_from a block model, its own by default."""
    mask_eps: float = setting(1e-3, gt=0, lt=1)
    """eps of the mask probability p = (1 - eps) t + eps."""
    t_sampling: Literal["uniform", "stratified"] = "uniform"
    """How a batch's diffusion times t are drawn: uniform (independent, the paper) or stratified
    (one per stratum of [0, 1), each still uniform: an unbiased loss of lower variance)."""
    t_min: float = setting(0.0, ge=0, lt=1)
    """Training draws t from [t_min, t_max] (BD3-LM's clipped schedule: less gradient variance);
    validation always reports the bound, t on [0, 1]."""
    t_max: float = setting(1.0, gt=0, le=1)
    model: ModelSection = field(default_factory=ModelSection)
    data: CorpusData = field(default_factory=CorpusData)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def check(self) -> None:
        check_noise(self)


@dataclass(frozen=True)
class SFTConfig(ConfigBase):
    """Supervised fine-tuning (LLaDA section 2.3) of a model directory on JSONL dialogues."""

    model: Path | None = None
    """The pretrained model directory to fine-tune (its weights and tokenizer)."""
    objective: Objective = "mdm"
    """mdm: the SFT objective (prompt never masked); ar: the AR twin's answer-only next-token loss;
    bd: block diffusion over the answer's blocks (the prompt clean)."""
    block_length: int | None = setting(None, gt=0)
    """bd: positions per block (L'); a block model's own by default."""
    mask_eps: float = setting(1e-3, gt=0, lt=1)
    t_sampling: Literal["uniform", "stratified"] = "uniform"
    """How a batch's diffusion times t are drawn: uniform (independent, the paper) or stratified
    (one per stratum of [0, 1), each still uniform: an unbiased loss of lower variance)."""
    t_min: float = setting(0.0, ge=0, lt=1)
    """Training draws t from [t_min, t_max] (BD3-LM's clipped schedule); validation uses [0, 1]."""
    t_max: float = setting(1.0, gt=0, le=1)
    data: DialogueData = field(default_factory=DialogueData)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, max_steps=500, warmup_steps=50))
    run: RunConfig = field(default_factory=lambda: RunConfig(out=Path("runs/sft")))

    def check(self) -> None:
        check_noise(self)


TrainConfig = PretrainConfig | SFTConfig


def config_replace(config: ConfigBase, **dotted: Any) -> Any:
    """`config` with dotted-path changes: config_replace(cfg, **{"optim.lr": 1e-3, "run.out": p})."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for path, value in dotted.items():
        head, _, rest = path.partition(".")
        (nested.setdefault(head, {}).__setitem__(rest, value) if rest else flat.__setitem__(head, value))
    for head, changes in nested.items():
        flat[head] = config_replace(getattr(config, head), **changes)
    return config.replace(**flat)


def _section_keys(cls: type) -> dict[str, str]:
    """field name -> its dotted path, for every field of every section of `cls`."""
    out = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if isinstance(tp, type) and issubclass(tp, ConfigBase):
            out |= {g.name: f"{f.name}.{g.name}" for g in dataclasses.fields(tp)}
    return out


def from_recipe(cls: type, data: Any, where: str) -> Any:
    """A config from a recipe mapping; a key of the old flat layout gets an error naming its new place."""
    if isinstance(data, dict):
        own = {f.name for f in dataclasses.fields(cls)}
        moved = _section_keys(cls) | ({"init_from": "model"} if cls is SFTConfig else {"init_from": "model.init_from"})
        sections = ", ".join(f.name for f in dataclasses.fields(cls) if f.name in {p.split(".")[0] for p in moved.values()})
        for key, value in data.items():
            if key == "data" and not isinstance(value, dict):
                raise ConfigError(f"{where}: key 'data' is now a section; write the corpus as data.source "
                                  f"(recipes are sectioned: {sections})")
            if key in moved and key not in own:
                raise ConfigError(f"{where}: key '{key}' is now '{moved[key]}' (recipes are sectioned: {sections})")
    return cls.from_dict(data, where=where)


def load_recipe(path: str | Path, cls: type = PretrainConfig) -> Any:
    """A PretrainConfig (or SFTConfig) from a sectioned recipe YAML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist" if not p.exists() else f"recipe {p} is not a file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {p} is not valid UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    return from_recipe(cls, data, f"recipe {p}")
