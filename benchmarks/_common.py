"""Shared plumbing for benchmark scripts: where they ran, and writing `benchmarks/results/NAME.json`.

Every result file is `{"name", "commit", "date", "device", "settings": {...}, "results": {...}}`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """Short hash of HEAD, with "+dirty" when tracked files outside benchmarks/results/ have
    uncommitted changes (the code measured is not that commit's); None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)benchmarks/results"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return None if not commit else commit + ("+dirty" if status.stdout.strip() else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: str = "cpu") -> str:
    """'cpu: <model name>' (with the usable core count), or 'cuda: <GPU name>' for a CUDA device."""
    if str(device).startswith("cuda"):
        import torch  # lazily: CPU-only benchmarks need not pay for it here

        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {_cpu_model()} ({cores} cores)"


def nll_per_char(pipe, requests: list[tuple[list[int], list[int]]]) -> list[float]:
    """-log p(continuation | context) per character of the continuation's text (end-of-text ids
    scored but not counted as characters), for each (context ids, continuation ids) request: the
    AR twin's exact value through the project's Scorer."""
    from remask.eval.scoring import Scorer

    scores = Scorer(pipe.model, mask_id=pipe.tokenizer.mask_id, bos_id=pipe.tokenizer.bos_id).score(requests)
    stops = set(pipe.stop_ids())
    return [-s.log_likelihood / max(1, len(pipe.tokenizer.decode([t for t in cont if t not in stops])))
            for s, (_, cont) in zip(scores, requests)]


def write_result(name: str, settings: dict[str, Any], results: dict[str, Any], out: Path | None = None,
                 device: str = "cpu") -> Path:
    """Write the result JSON atomically (temp file, fsync, rename), print it, return its path."""
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    record = {
        "name": name,
        "commit": git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(device),
        "settings": settings,
        "results": results,
    }
    text = json.dumps(record, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sys.stdout.write(text)
    return path
