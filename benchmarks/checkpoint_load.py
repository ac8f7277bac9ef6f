"""Peak resident memory of `remask.checkpoint.load_model` against the checkpoint's size.

    python benchmarks/checkpoint_load.py [--size-gb 1.0] [--shard-gb 0.25] [--dtype bfloat16]
                                         [--out benchmarks/results/checkpoint_load.json]

Writes a random ~size-gb checkpoint (single file, then sharded) under /tmp, streaming one tensor at a
time so the generator never holds the model, and loads each in a fresh subprocess. The child
measures, above its RSS after imports: the peak while `load_model` runs (weights are memory-mapped,
so this is small) and the peak once every parameter has been read (the model fully resident: the
number that matters). `ratio` = that peak / checkpoint bytes; the loader's budget is 1.3.
The temporary checkpoints are deleted afterwards.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from _common import RESULTS_DIR, ArgumentParser, run_main, write_result

from remask.checkpoint import INDEX_NAME, checkpoint_bytes, load_model, to_llada_config, to_llada_name
from remask.config import ModelConfig
from remask.model import Transformer

MAX_RATIO = 1.3
SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def bench_config(size_gb: float, dtype: torch.dtype) -> ModelConfig:
    """A LLaMA-shaped config (d_model 2048, 32k vocabulary) whose depth gives ~size_gb of weights."""
    base = ModelConfig(vocab_size=32_000, d_model=2048, n_layers=1, n_heads=16, mlp_hidden_size=5632,
                       max_sequence_length=2048)
    per_block = base.replace(n_layers=2).num_parameters() - base.num_parameters()
    rest = base.num_parameters() - per_block  # embeddings, output head, final norm
    target = size_gb * 2**30 / dtype.itemsize
    return base.replace(n_layers=max(1, round((target - rest) / per_block)))


def tensor_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(LLaDA name, shape) of every stored tensor, from a meta-device model (nothing allocated)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return [(to_llada_name(k), tuple(v.shape)) for k, v in model.state_dict().items()]


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                      generator: torch.Generator) -> None:
    """Stream random tensors into one safetensors file: 8-byte header length, JSON header, raw data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, shape in specs:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
            f.write(t.to(dtype).contiguous().view(torch.uint8).numpy())  # one tensor in memory at a time


def write_checkpoint(directory: Path, cfg: ModelConfig, dtype: torch.dtype, shard_bytes: int | None) -> int:
    """A random checkpoint in the LLaDA layout; returns the number of weight files."""
    directory.mkdir(parents=True)
    specs, generator = tensor_specs(cfg), torch.Generator().manual_seed(0)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in specs:
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        if shard_bytes is not None and shards[-1] and used + nbytes > shard_bytes:
            shards, used = [*shards, []], 0
        shards[-1].append((name, shape))
        used += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    for file, part in zip(files, shards):
        write_safetensors(directory / file, part, dtype, generator)
    if n > 1:
        weight_map = {name: file for file, part in zip(files, shards) for name, _ in part}
        total = sum(dtype.itemsize * int(torch.Size(s).numel()) for _, s in specs)
        (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = to_llada_config(cfg) | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return n


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def hwm_bytes() -> int | None:
    """VmHWM (peak RSS of this address space) from /proc, or None where there is no /proc."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def reset_hwm() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so import-time peaks do not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def measure(directory: Path) -> dict:
    """Runs in a fresh child process: memory and time of load_model, then of reading every weight."""
    proc = psutil.Process()
    gc.collect()
    baseline = proc.memory_info().rss
    inherited = max_rss_bytes()  # ru_maxrss carries the parent's peak across fork + exec on Linux
    reset_hwm()
    peak, done = [baseline], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    model = load_model(directory)
    load_s = time.perf_counter() - t0
    after_load = max(proc.memory_info().rss, hwm_bytes() or 0)
    with torch.no_grad():  # read every byte of every weight so all of it is resident (no temporaries)
        checksum = sum(int(p.view(torch.uint8).max()) for p in model.parameters())
    read_s = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    assert not any(p.is_meta for p in model.parameters()) and checksum > 0  # loaded, not all zeros
    ru = max_rss_bytes()
    return {
        "baseline_rss_bytes": baseline,
        "load_peak_rss_bytes": after_load - baseline,  # weights mapped, not yet read
        "ru_maxrss_peak_bytes": ru - baseline if ru > inherited else None,  # None: below the inherited peak
        "vmhwm_peak_bytes": None if hwm_bytes() is None else hwm_bytes() - baseline,
        "psutil_peak_bytes": peak[0] - baseline,
        "load_seconds": round(load_s, 4),
        "load_and_read_seconds": round(read_s, 4),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def child(*args: str) -> dict:
    """Run this script with internal arguments in a fresh interpreter; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_variant(directory: Path, size_gb: float, dtype: str, shard_bytes: int) -> dict:
    # Generated in its own process too, so this driver stays small: the measuring child inherits
    # the driver's ru_maxrss, which must stay below the child's baseline to mean anything.
    files = child("--generate", str(directory), "--size-gb", str(size_gb), "--dtype", dtype,
                  "--shard-bytes", str(shard_bytes))["files"]
    stats = child("--measure", str(directory))
    size = checkpoint_bytes(directory)
    peak = max(v for k, v in stats.items() if k.endswith("_peak_bytes") and v is not None)
    return {"peak_rss_bytes": peak, "checkpoint_bytes": size, "ratio": round(peak / size, 4),
            "load_ratio": round(stats["load_peak_rss_bytes"] / size, 4), "files": files} | stats


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size to generate (default 1.0)")
    parser.add_argument("--shard-gb", type=float, default=0.25, help="shard size of the sharded variant")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "checkpoint_load.json",
                        help="result file (default benchmarks/results/checkpoint_load.json)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: child processes
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shard-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cfg = bench_config(args.size_gb, dtype)
    if args.measure is not None:
        print(json.dumps(measure(args.measure)))
        return 0
    if args.generate is not None:
        print(json.dumps({"files": write_checkpoint(args.generate, cfg, dtype, args.shard_bytes or None)}))
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="remask-ckpt-bench-", dir="/tmp") as tmp:
        for variant, shard in (("single", 0), ("sharded", int(args.shard_gb * 2**30))):
            directory = Path(tmp) / variant
            results[variant] = run_variant(directory, args.size_gb, args.dtype, shard)
            shutil.rmtree(directory)  # free the disk before the next variant
    summary = {k: results["single"][k] for k in ("peak_rss_bytes", "checkpoint_bytes", "ratio", "load_seconds")}
    settings = {"size_gb": args.size_gb, "shard_gb": args.shard_gb, "dtype": args.dtype,
                "config": {k: getattr(cfg, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads",
                                                         "mlp_hidden_size")},
                "parameters": cfg.num_parameters(), "page_cache": "warm (files just written)",
                "max_ratio": MAX_RATIO}
    write_result("checkpoint_load", settings, summary | results, args.out)
    worst = max(r["ratio"] for r in results.values())
    if worst > MAX_RATIO:
        print(f"error: peak RSS is {worst:.2f}x the checkpoint size (budget {MAX_RATIO}x)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
