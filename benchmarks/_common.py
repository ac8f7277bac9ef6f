"""Shared plumbing for benchmark scripts: where they ran, their argument parser and exit codes,
and writing `benchmarks/results/NAME.json`.

Every result file is `{"name", "commit", "date", "device", "settings": {...}, "results": {...}}`:
the file's commit and date are those of its last write. A script that runs in parts and merges
them into the rows of earlier runs (sampling.json) stamps each row with its own commit and date
(`stamp`), and `merge_rows` keeps them, so a row never claims a commit it was not measured at.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from remask.errors import RemaskError

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


def now() -> str:
    """The current UTC time, as the result files write it (ISO 8601, seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def stamp() -> dict[str, str | None]:
    """{"commit", "date"} of a measurement taken now: what each merged row carries."""
    return {"commit": git_commit(), "date": now()}


def merge_rows(previous: list[dict], new: list[dict], key: str = "task") -> list[dict]:
    """The rows of a merged result: `previous` rows whose `key` no new row has, then `new`. Each
    row keeps the commit and date it carries (a run replaces whole tasks, never restamps others)."""
    replaced = {r.get(key) for r in new}
    return [r for r in previous if r.get(key) not in replaced] + list(new)


def previous_results(name: str, out: Path | None = None) -> dict[str, Any]:
    """The `results` of the existing result file (empty when there is none), for a merging script."""
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8"))["results"] if path.exists() else {}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's rule: a bad argument raises RemaskError (one `error:` line, exit 2
    under `run_main`) instead of printing the usage and exiting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("prog", f"benchmarks/{Path(sys.argv[0]).name}")
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise RemaskError(f"{message} (python {self.prog} --help)")


def positive_int(text: str) -> int:
    """An argparse type for counts: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_training_arguments(parser: argparse.ArgumentParser, *, data: str, preset: str) -> None:
    """The options of a benchmark that trains: corpus, model preset, sequence length, batch size."""
    parser.add_argument("--data", default=data)
    parser.add_argument("--preset", default=preset)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--batch-size", type=positive_int, default=16)


def run_main(main: Callable[[], int | None]) -> None:
    """Run a benchmark's main and exit as `remask` does: 0 (or main's code); bad input (RemaskError,
    a bad argument) one `error: ...` line on stderr and 2; Ctrl-C 130."""
    try:
        code = main()
    except RemaskError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # at once, as `remask` does (no SIGINT re-raised at shutdown)
    sys.exit(code or 0)


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


def metrics_seconds(run: Path, until_step: int | None = None) -> float | None:
    """Seconds of training a run's metrics.jsonl accounts for (each logged interval's tokens over
    its tokens/s), however many sessions it took, up to `until_step` (None: all); None without metrics."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return None
    seconds, last = 0.0, 0
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if until_step is not None and row.get("step", 0) > until_step:
            break
        if "tokens_per_s" in row and row["tokens_per_s"] and row["tokens"] > last:
            seconds += (row["tokens"] - last) / row["tokens_per_s"]
            last = row["tokens"]
    return seconds


def write_result(name: str, settings: dict[str, Any], results: dict[str, Any], out: Path | None = None,
                 device: str = "cpu", stamp: dict[str, str] | None = None) -> Path:
    """Write the result JSON atomically (temp file, fsync, rename), print it, return its path.
    `stamp` (commit, date) keeps a file's own stamp where a writer only replaces rows that carry
    their own; by default the file is stamped with this commit and now."""
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    stamp = stamp or {"commit": git_commit(), "date": now()}
    record = {
        "name": name,
        "commit": stamp["commit"],
        "date": stamp["date"],
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
