"""Checkpoint storage: safetensors weights (single file or shards + index), validation against
config.json before any data is read, meta-device loading from memory-mapped files, atomic saving.

A model directory holds `config.json` (LLaDA's keys, see `llada.py`), `model.safetensors` or
shards `model-0000K-of-0000N.safetensors` with `model.safetensors.index.json`, and optionally
the tokenizer files. Saving stages the whole directory and renames it into place
(`remask.atomic`). Loading builds the model on the meta device and assigns memory-mapped tensors,
so peak resident memory stays close to the checkpoint's size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from remask.atomic import atomic_dir
from remask.checkpoint.llada import from_llada_config, from_llada_name, to_llada_config, to_llada_name
from remask.config import ModelConfig
from remask.errors import RemaskError
from remask.model import Transformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise RemaskError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RemaskError(f"{path}: not readable JSON ({e})") from e


def _check_dir(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory)
    if not path.exists():
        raise RemaskError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise RemaskError(f"model directory {path} is not a directory")
    return path


def load_config(directory: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig of a checkpoint directory; RemaskError if config.json is missing or invalid."""
    path = _check_dir(directory) / CONFIG_NAME
    try:
        return from_llada_config(_read_json(path))
    except RemaskError as e:
        raise RemaskError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None


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
    """(remask name, tensor) pairs, converted one at a time and checked to be finite (one NaN or inf
    weight spreads to every logit, and the sampler then answers nothing). On CPU with the stored
    dtype the tensor stays a copy-on-write view of the memory-mapped file, so no second copy is made."""
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                stored = f.get_tensor(name)
                tensor = stored.to(device=device, dtype=dtype)  # type: ignore[misc]
                if not _all_finite(tensor):
                    cast = f" once cast to {dtype}" if stored.dtype != dtype else ""
                    raise RemaskError(f"{file}: tensor {name} holds NaN or infinite values{cast}; the weights are unusable")
                yield from_llada_name(name), tensor


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, checked on the calling thread alone: a parallel reduction here
    would start an OpenMP team in the loading thread, and on a few cores the server's batching
    thread, which runs the model afterwards, was measured 1.5x slower beside it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bool(torch.isfinite(tensor).all())
    finally:
        torch.set_num_threads(threads)


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
    checked against config.json before any data is read, then to hold only finite values; problems
    raise a one-line RemaskError.
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
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")


def write_model_files(model: Transformer, out: str | os.PathLike[str], *, tokenizer: Any = None,
                      max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> None:
    """Write config.json, the weights (sharded above `max_shard_bytes`) and the tokenizer into the
    existing directory `out`. Not atomic by itself: callers write into a staging directory."""
    out = Path(out)
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


def check_save_target(directory: str | os.PathLike[str]) -> Path:
    """RemaskError unless a checkpoint may be written at `directory` (absent, empty, or a checkpoint)."""
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise RemaskError(f"cannot write checkpoint to {directory}: it exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / CONFIG_NAME).exists():
        raise RemaskError(f"refusing to replace {directory}: not empty and not a checkpoint (no {CONFIG_NAME})")
    return directory


def save_model(model: Transformer, directory: str | os.PathLike[str], *, tokenizer: Any = None,
               max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> Path:
    """Write `model` (+ `tokenizer`, anything with `.save(directory)`) to `directory` atomically.

    Shards above `max_shard_bytes`; `dtype` casts the stored tensors. An existing checkpoint at
    `directory` is replaced only once the new one is complete; on failure it is left untouched and
    no temporary directory remains. OS errors (e.g. ENOSPC) become RemaskError.
    """
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes <= 0:
        raise RemaskError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    _target("cpu", dtype)
    directory = check_save_target(directory)
    with atomic_dir(directory) as staging:
        write_model_files(model, staging, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes, dtype=dtype)
    return directory
