"""Training checkpoints: RUN_DIR/checkpoints/step-N/ = a model directory + trainer_state/.

Every write is staged and renamed into place (`remask.atomic`), and old checkpoints are renamed
out of sight before they are deleted, so a run killed at any moment (SIGKILL included) leaves
every visible step-N complete; what a kill leaves half-done is hidden (`.tmp-*`, `.trash-*`) and
cleared at the next start. All randomness in training is a function of (seed, step), so the step
*is* the data position; RNG states are saved as well for anything outside that scheme.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from remask.atomic import atomic_dir, clear_staging, remove_dir
from remask.checkpoint import load_config, write_model_files
from remask.errors import RemaskError

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_DIR = "trainer_state"


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    dirs = step_dirs(run_dir)
    return dirs[-1] if dirs else None


def clear_leftovers(run_dir: Path) -> None:
    """Staging and trash directories a killed run left behind are incomplete by definition."""
    clear_staging(run_dir)
    clear_staging(run_dir / "checkpoints")


def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors for rng.pt, JSON-able python/numpy states) of every global generator."""
    tensors: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    plain = {"python": [version, list(internal), gauss_next], "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}
    return tensors, plain


def restore_rng(checkpoint: Path, trainer: dict[str, Any]) -> None:
    tensors = torch.load(checkpoint / STATE_DIR / "rng.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    version, internal, gauss_next = trainer["rng"]["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, pos, has_gauss, gauss = trainer["rng"]["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))


def write_step_checkpoint(run_dir: Path, step: int, model, tokenizer, *, optimizer_state: dict,
                          trainer: dict[str, Any], keep: int) -> Path:
    """Stage model + trainer state, rename to checkpoints/step-N; then prune to the newest `keep`."""
    final = run_dir / "checkpoints" / f"step-{step}"
    with atomic_dir(final) as staging:  # re-saving a step (after a resume) swaps it atomically
        write_model_files(model, staging, tokenizer=tokenizer)
        state_dir = staging / STATE_DIR
        state_dir.mkdir()
        torch.save(optimizer_state, state_dir / "optimizer.pt")
        rng_tensors, rng_plain = rng_state()
        torch.save(rng_tensors, state_dir / "rng.pt")
        (state_dir / "trainer.json").write_text(json.dumps(trainer | {"rng": rng_plain}))
    for _, old in step_dirs(run_dir)[:-keep]:
        try:
            remove_dir(old)
        except OSError as e:
            raise RemaskError(f"cannot remove old checkpoint {old}: {e.strerror or e}") from None
    return final


def read_trainer_state(checkpoint: Path) -> tuple[dict[str, Any], dict]:
    """(trainer.json contents, optimizer state) of a step directory; loads tensors only."""
    state_dir = checkpoint / STATE_DIR
    try:
        trainer = json.loads((state_dir / "trainer.json").read_text())
        optimizer = torch.load(state_dir / "optimizer.pt", map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, RuntimeError) as e:
        raise RemaskError(f"checkpoint {checkpoint} has no readable trainer state ({e.__class__.__name__})") from None
    return trainer, optimizer


def check_same_model(checkpoint: Path, expected) -> None:
    """Refuse to resume a run whose checkpoint holds a different architecture."""
    saved = load_config(checkpoint)
    keys = ("vocab_size", "d_model", "n_layers", "n_heads", "effective_n_kv_heads", "mlp_hidden_size", "causal",
            "weight_tying")
    diffs = [f"{k} {getattr(saved, k)} != {getattr(expected, k)}" for k in keys if getattr(saved, k) != getattr(expected, k)]
    if diffs:
        raise RemaskError(f"cannot resume from {checkpoint}: it holds a different model ({'; '.join(diffs)})")
