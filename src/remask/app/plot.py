"""Loss curves of training runs (matplotlib, an optional dependency: `pip install remask[plot]`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from remask.atomic import atomic_file
from remask.errors import RemaskError
from remask.train.checkpointing import read_metrics_lines


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RemaskError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    records = read_metrics_lines(path)
    if not records:
        raise RemaskError(f"{path} holds no logged steps yet")
    return records


def run_label(run_dir: Path) -> str:
    cfg_path = Path(run_dir) / "config.yaml"
    objective = ""
    if cfg_path.is_file():
        try:
            cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            cfg = {}
        objective = {"mdm": "MDM (bound)", "ar": "AR"}.get(cfg.get("objective") if isinstance(cfg, dict) else None, "")
    return f"{Path(run_dir).name} {objective}".strip()


def pyplot():
    """matplotlib.pyplot with the non-interactive backend, or a RemaskError saying how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RemaskError("plotting needs matplotlib: pip install 'remask[plot]'") from None
    return plt


def save_png(fig, out: Path, *, dpi: int = 120) -> Path:
    """Lay out `fig`, write it to `out` as PNG atomically and close it; returns the path."""
    plt = pyplot()
    out = Path(out)
    try:
        if not out.parent.is_dir():
            raise RemaskError(f"output folder {out.parent} does not exist")
        fig.tight_layout()
        with atomic_file(out, "wb") as f:
            fig.savefig(f, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return out


def plot_runs(runs: list[Path], out: Path) -> Path:
    """Training loss and validation loss (nats/token; the MDM's is its likelihood bound) against
    tokens seen, one colour per run. Written atomically; returns the PNG path."""
    if not runs:
        raise RemaskError("give at least one run directory")
    plt = pyplot()
    series = [(run_label(r), read_metrics(r)) for r in runs]
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (label, records) in enumerate(series):
        colour = f"C{i}"
        ax_train.plot([r["tokens"] for r in records], [r.get("loss_avg", r["loss"]) for r in records],
                      color=colour, label=label, linewidth=1.2)
        val = [r for r in records if "val_loss" in r]
        if val:
            ax_val.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", color=colour, label=label)
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss (MDM: NLL bound)")):
        ax.set_xlabel("tokens")
        ax.set_ylabel("nats / token")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_png(fig, out)
