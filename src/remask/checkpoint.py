"""Checkpoints in the LLaDA Hugging Face layout, through one explicit key map.

A model directory holds `config.json` (LLaDA's config keys), `model.safetensors` or shards
`model-0000K-of-0000N.safetensors` with `model.safetensors.index.json`, and optionally the
tokenizer files. A directory written here opens with the official LLaDA code
(`LLaDAModelLM.from_pretrained`), and a downloaded LLaDA-8B directory opens here.

Saving is atomic: everything is written into a sibling `.tmp-*` directory, fsynced, then renamed
into place. Loading builds the model on the meta device and assigns memory-mapped tensors, so
peak resident memory stays close to the checkpoint's size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from remask.config import ModelConfig
from remask.errors import RemaskError
from remask.model import Transformer

__all__ = [
    "KEY_MAP",
    "checkpoint_bytes",
    "from_llada_config",
    "from_llada_name",
    "load_config",
    "load_model",
    "save_model",
    "to_llada_config",
    "to_llada_name",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# remask parameter name pattern -> LLaDA (published checkpoint) name pattern; `{i}` is the block index.
# LLaDA's block has no `attn`/`mlp` submodules; ff_proj is the SiLU gate, up_proj the up projection
# and ff_out the down projection, exactly remask's SwiGLU. Rotary is "rotate half" in both: no permutation.
KEY_MAP: dict[str, str] = {
    "wte.weight": "model.transformer.wte.weight",
    "blocks.{i}.attn_norm.weight": "model.transformer.blocks.{i}.attn_norm.weight",
    "blocks.{i}.attn.q_proj.weight": "model.transformer.blocks.{i}.q_proj.weight",
    "blocks.{i}.attn.k_proj.weight": "model.transformer.blocks.{i}.k_proj.weight",
    "blocks.{i}.attn.v_proj.weight": "model.transformer.blocks.{i}.v_proj.weight",
    "blocks.{i}.attn.attn_out.weight": "model.transformer.blocks.{i}.attn_out.weight",
    "blocks.{i}.ff_norm.weight": "model.transformer.blocks.{i}.ff_norm.weight",
    "blocks.{i}.mlp.ff_proj.weight": "model.transformer.blocks.{i}.ff_proj.weight",
    "blocks.{i}.mlp.up_proj.weight": "model.transformer.blocks.{i}.up_proj.weight",
    "blocks.{i}.mlp.ff_out.weight": "model.transformer.blocks.{i}.ff_out.weight",
    "ln_f.weight": "model.transformer.ln_f.weight",
    "ff_out.weight": "model.transformer.ff_out.weight",  # absent with weight_tying
}


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_TO_LLADA = [(_pattern(ours), theirs) for ours, theirs in KEY_MAP.items()]
_FROM_LLADA = [(_pattern(theirs), ours) for ours, theirs in KEY_MAP.items()]


def _translate(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        m = pattern.fullmatch(name)
        if m:
            return template.replace("{i}", m.group("i")) if "i" in m.groupdict() else template
    return None


def to_llada_name(name: str) -> str:
    """remask parameter name -> LLaDA tensor name (RemaskError if KEY_MAP has no entry)."""
    out = _translate(name, _TO_LLADA)
    if out is None:
        raise RemaskError(f"parameter {name!r} has no LLaDA name in KEY_MAP")
    return out


def from_llada_name(name: str) -> str | None:
    """LLaDA tensor name -> remask parameter name, or None for a name KEY_MAP does not know."""
    return _translate(name, _FROM_LLADA)


# --- config.json ---------------------------------------------------------------------------------

# Architecture switches of LLaDA's config: key -> (LLaDA's default when absent, the one value remask
# represents). Anything else changes the network (biases, ALiBi, LayerNorm, QK-norm, ...).
_ARCHITECTURE: dict[str, tuple[Any, Any]] = {
    "rope": (False, True),
    "alibi": (False, False),
    "include_bias": (False, False),
    "include_qkv_bias": (False, False),
    "layer_norm_type": ("default", "rms"),
    "layer_norm_with_affine": (True, True),
    "activation_type": ("swiglu", "silu"),
    "block_type": ("sequential", "llama"),
    "attention_layer_norm": (False, False),
    "scale_logits": (False, False),
    "input_emb_norm": (False, False),
    "block_group_size": (1, 1),  # >1 renames the tensors (block_groups.*)
}

# Keys LLaDA's config carries that do not change the network remask builds; written with these
# values, ignored on load.
_PASSIVE: dict[str, Any] = {
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModel": "modeling_llada.LLaDAModelLM",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    },
    "embedding_dropout": 0.0,
    "flash_attention": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "mlp_ratio": 4,  # only read by LLaDA when mlp_hidden_size is null; remask always writes that
    "model_type": "llada",
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rope_full_precision": True,  # remask always applies rotary in float32
    "transformers_version": "4.46.3",
    "use_cache": False,
}

_REQUIRED = ("d_model", "n_heads", "n_layers", "vocab_size")
_KNOWN = (set(_ARCHITECTURE) | set(_PASSIVE) | set(_REQUIRED)
          | {"bias_for_layer_norm", "multi_query_attention", "n_kv_heads", "mlp_hidden_size", "max_sequence_length",
             "rope_theta", "rms_norm_eps", "weight_tying", "embedding_size", "init_std", "causal", "mask_token_id",
             "eos_token_id", "pad_token_id", "bos_token_id", "torch_dtype", "_name_or_path"})


def to_llada_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json dict LLaDA's code reads for `cfg` (+ remask's `causal` and `bos_token_id`)."""
    d: dict[str, Any] = {k: v for k, v in cfg.extra.items() if k not in _KNOWN}  # unknown keys, verbatim
    d |= {key: wanted for key, (_, wanted) in _ARCHITECTURE.items()}
    d |= json.loads(json.dumps(_PASSIVE))  # a deep copy, so callers may mutate the result
    d |= {
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,  # null -> n_heads in LLaDA (effective_n_kv_heads)
        "multi_query_attention": None,
        "n_layers": cfg.n_layers,
        "mlp_hidden_size": cfg.mlp_hidden_size,
        "max_sequence_length": cfg.max_sequence_length,
        "vocab_size": cfg.vocab_size,
        "embedding_size": cfg.embedding_size,  # null -> vocab_size in LLaDA
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "bias_for_layer_norm": False,
        "weight_tying": cfg.weight_tying,
        "init_std": cfg.init_std,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "causal": cfg.causal,
    }
    if cfg.bos_token_id is not None:
        d["bos_token_id"] = cfg.bos_token_id
    return d


def _check_architecture(d: dict[str, Any]) -> None:
    for key, (default, wanted) in _ARCHITECTURE.items():
        value = d.get(key, default)
        if value != wanted or type(value) is not type(wanted):
            raise RemaskError(f"unsupported LLaDA config: {key}={value!r} (remask only builds {key}={wanted!r})")
    # LLaDA: bias_for_layer_norm None inherits include_bias (already checked false above).
    if d.get("bias_for_layer_norm") not in (None, False):
        raise RemaskError(f"unsupported LLaDA config: bias_for_layer_norm={d['bias_for_layer_norm']!r}")


def _kv_heads(d: dict[str, Any]) -> int | None:
    """n_kv_heads as LLaDA's `effective_n_kv_heads` resolves it with multi_query_attention."""
    kv, mqa = d.get("n_kv_heads"), d.get("multi_query_attention")
    if mqa is None:
        return kv
    implied = 1 if mqa else d["n_heads"]
    if kv is not None and kv != implied:
        raise RemaskError(f"LLaDA config: n_kv_heads={kv} contradicts multi_query_attention={mqa}")
    return implied if mqa else kv


def from_llada_config(d: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a LLaDA config.json dict; RemaskError names a key remask cannot represent.

    Absent architecture keys take LLaDA's defaults; absent token ids and embedding_size are None;
    `causal` defaults to False. Keys LLaDA does not define are kept in `extra`.
    """
    if not isinstance(d, dict):
        raise RemaskError(f"LLaDA config must be a JSON object, got {type(d).__name__}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise RemaskError(f"LLaDA config lacks required key(s): {', '.join(missing)}")
    _check_architecture(d)
    hidden = d.get("mlp_hidden_size")
    try:
        return ModelConfig(
            vocab_size=d["vocab_size"],
            d_model=d["d_model"],
            n_layers=d["n_layers"],
            n_heads=d["n_heads"],
            n_kv_heads=_kv_heads(d),
            mlp_hidden_size=d.get("mlp_ratio", 4) * d["d_model"] if hidden is None else hidden,
            max_sequence_length=d.get("max_sequence_length", 1024),
            rope_theta=d.get("rope_theta", 10_000.0),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            weight_tying=d.get("weight_tying", True),
            embedding_size=d.get("embedding_size"),
            init_std=d.get("init_std", 0.02),
            causal=d.get("causal", False),
            mask_token_id=d.get("mask_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            bos_token_id=d.get("bos_token_id"),
            extra={k: v for k, v in d.items() if k not in _KNOWN},
        )
    except RemaskError:
        raise
    except (TypeError, ValueError) as e:
        raise RemaskError(f"invalid LLaDA config: {e}") from e


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise RemaskError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RemaskError(f"{path}: not readable JSON ({e})") from e


def _check_dir(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise RemaskError(f"checkpoint directory {path} does not exist")
    return path


def load_config(directory: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig of a checkpoint directory; RemaskError if config.json is missing or invalid."""
    path = _check_dir(directory) / CONFIG_NAME
    try:
        return from_llada_config(_read_json(path))
    except RemaskError as e:
        raise RemaskError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from e


# --- weights on disk -----------------------------------------------------------------------------

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _weight_files(directory: Path) -> dict[Path, set[str] | None]:
    """Weight files -> tensor names the index assigns to each (None for a single unindexed file)."""
    if (directory / WEIGHTS_NAME).is_file():  # Hugging Face's order: the single file wins
        return {directory / WEIGHTS_NAME: None}
    index_path = directory / INDEX_NAME
    if not index_path.is_file():
        raise RemaskError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise RemaskError(f"{index_path}: no valid 'weight_map'")
    files: dict[Path, set[str] | None] = {}
    for name, file in weight_map.items():
        shard = directory / file
        if Path(file).name != file or not shard.is_file():
            raise RemaskError(f"{index_path}: shard {file!r} (holding {name}) not found")
        files.setdefault(shard, set()).add(name)  # type: ignore[union-attr]
    return files


def _read_header(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensor name -> (shape, dtype) from a safetensors header, without reading the data."""
    try:
        with safe_open(file, framework="pt") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise RemaskError(f"{file}: not a valid safetensors file ({e})") from e
    for name, (_, dt) in header.items():
        if dt not in _DTYPES:
            raise RemaskError(f"{file}: tensor {name} has dtype {dt}, expected a floating-point type")
    return {name: (shape, _DTYPES[dt]) for name, (shape, dt) in header.items()}


def _validate(files: dict[Path, set[str] | None], expected: dict[str, tuple[int, ...]]) -> list[torch.dtype]:
    """Check every file's tensors against the index and the shapes config.json implies; return dtypes."""
    seen: dict[str, Path] = {}
    dtypes = []
    for file, indexed in files.items():
        header = _read_header(file)
        for name, (shape, dt) in header.items():
            if name in seen:
                raise RemaskError(f"{file}: tensor {name} also stored in {seen[name].name}")
            if name not in expected:
                raise RemaskError(f"{file}: unexpected tensor {name}")
            if shape != expected[name]:
                raise RemaskError(f"{file}: tensor {name} has shape {list(shape)}, config.json implies "
                                  f"{list(expected[name])}")
            seen[name] = file
            dtypes.append(dt)
        absent = sorted((indexed or set()) - set(header))
        if absent:
            raise RemaskError(f"{file}: tensor {absent[0]} listed in {INDEX_NAME} is not in the file")
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise RemaskError(f"{next(iter(files)).parent}: missing tensor {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return dtypes


def checkpoint_bytes(directory: str | os.PathLike[str]) -> int:
    """Total size in bytes of a checkpoint's safetensors weight files."""
    return sum(file.stat().st_size for file in _weight_files(_check_dir(directory)))


# --- load ----------------------------------------------------------------------------------------


def _target(device: str | torch.device, dtype: torch.dtype | None) -> torch.device:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise RemaskError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RemaskError(f"invalid device {device!r}") from e


def _stream(files: dict[Path, set[str] | None], device: torch.device,
            dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(remask name, tensor) pairs, converted one at a time. On CPU with the stored dtype the tensor stays
    a copy-on-write view of the memory-mapped file, so no second copy is ever made."""
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield from_llada_name(name), f.get_tensor(name).to(device=device, dtype=dtype)  # type: ignore[misc]


class _SkipInit(TorchFunctionMode):
    """Within it, `torch.nn.init.*` returns its tensor untouched. On meta tensors initialising is
    pointless, and torch's meta `normal_` would import its Python decompositions (~1 s, ~80 MB)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


def load_model(directory: str | os.PathLike[str], *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """Open a checkpoint directory as a Transformer in eval mode, on `device`.

    `dtype` None keeps the stored dtype (the common promoted type if tensors differ). Every tensor is
    checked against config.json before any data is read; problems raise a one-line RemaskError.
    The model is built on the meta device (no initialisation) and the tensors are assigned.
    On CPU in the stored dtype the parameters are copy-on-write views of the memory-mapped files
    (resident memory ~1x the checkpoint): replace the files by renaming (as `save_model` does),
    never truncate them in place while such a model is alive.
    """
    path = _check_dir(directory)
    cfg = load_config(path)
    target = _target(device, dtype)
    files = _weight_files(path)
    with torch.device("meta"), _SkipInit():
        model = Transformer(cfg)  # shapes only: nothing allocated, nothing initialised
    expected = {to_llada_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    stored = _validate(files, expected)
    common = dtype or _promote(stored)
    state = dict(_stream(files, target, common))
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # a buffer outside the state dict (non-persistent) would need materialising here
        raise RuntimeError(f"load_model left tensors on the meta device: {', '.join(left)}")
    return model.eval()


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for dt in dtypes[1:]:
        out = torch.promote_types(out, dt)
    return out


# --- save ----------------------------------------------------------------------------------------


def _shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, in parameter order: a shard grows until the next tensor would push it past the limit
    (a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _shard_name(k: int, n: int) -> str:
    return WEIGHTS_NAME if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_checkpoint(model: Transformer, out: Path, tokenizer: Any, max_shard_bytes: int,
                      dtype: torch.dtype | None) -> None:
    state = {to_llada_name(k): v for k, v in model.state_dict().items()}
    sizes = {k: v.numel() * (dtype or v.dtype).itemsize for k, v in state.items()}
    shards = _shard_plan(sizes, max_shard_bytes)
    weight_map = {}
    for k, names in enumerate(shards):
        file = _shard_name(k, len(shards))
        # One shard's tensors on the CPU at a time; contiguous because safetensors stores raw bytes.
        tensors = {n: state[n].detach().to(device="cpu", dtype=dtype or state[n].dtype).contiguous() for n in names}
        save_file(tensors, out / file, metadata={"format": "pt"})  # "format" is required by from_pretrained
        weight_map |= dict.fromkeys(names, file)
    if len(shards) > 1:
        _write_json(out / INDEX_NAME, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    config = to_llada_config(model.config)
    stored = {dtype or v.dtype for v in state.values()}
    if len(stored) == 1:
        config["torch_dtype"] = str(stored.pop()).removeprefix("torch.")
    _write_json(out / CONFIG_NAME, config)
    if tokenizer is not None:
        tokenizer.save(out)


def _fsync_tree(root: Path) -> None:
    """Flush every file, then every directory entry, under `root` (and root's parent entry)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(new: Path, directory: Path) -> None:
    """Rename `new` to `directory`; an existing one is renamed aside first, restored on failure,
    and deleted only once the new one is in place."""
    if not directory.exists():
        os.rename(new, directory)
    else:
        old = directory.parent / f".tmp-old-{directory.name}-{uuid.uuid4().hex[:8]}"
        os.rename(directory, old)
        try:
            os.rename(new, directory)
        except BaseException:
            os.rename(old, directory)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(directory.parent)


def _check_target(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise RemaskError(f"cannot write checkpoint to {directory}: it exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / CONFIG_NAME).exists():
        raise RemaskError(f"refusing to replace {directory}: not empty and not a checkpoint (no {CONFIG_NAME})")


def save_model(model: Transformer, directory: str | os.PathLike[str], *, tokenizer: Any = None,
               max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> Path:
    """Write `model` (+ `tokenizer`, anything with `.save(directory)`) to `directory` atomically.

    Shards above `max_shard_bytes`; `dtype` casts the stored tensors. An existing checkpoint at
    `directory` is replaced only once the new one is complete; on failure it is left untouched and
    no temporary directory remains. OS errors (e.g. ENOSPC) become RemaskError.
    """
    directory = Path(directory).absolute()
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise RemaskError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    _target("cpu", dtype)
    _check_target(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".tmp-{directory.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()  # not mkdtemp: its 0700 mode would end up on the checkpoint
    except OSError as e:
        raise RemaskError(f"cannot write checkpoint to {directory}: {e.strerror or e}") from e
    try:
        _write_checkpoint(model, tmp, tokenizer, max_shard_bytes, dtype)
        _fsync_tree(tmp)
        _swap_in(tmp, directory)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise RemaskError(f"cannot write checkpoint to {directory}: {e.strerror or e}") from e
        raise
    return directory
