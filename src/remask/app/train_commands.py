"""The training commands of `remask`: pretrain, sft, the demo and loss plots.

Every training config field is an option of `pretrain` / `sft` (`--optim.lr`, or its short name
`--lr`); both also take `--config RECIPE.yaml`, whose values the other options override
(`cli.parse` reads it first). The registry in `commands.py` lists these beside the others.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from remask.app.command import Flat, Positional
from remask.train.config import PretrainConfig, SFTConfig


@dataclass(frozen=True)
class PretrainCommand:
    """Pretrain a masked diffusion LM (or, with --objective ar, its autoregressive twin)."""

    config: Path | None = None
    """A recipe YAML (recipes/*.yaml); options given beside it override its values."""
    train: Annotated[PretrainConfig, Flat] = field(default_factory=PretrainConfig)


@dataclass(frozen=True)
class SFTCommand:
    """Supervised fine-tuning of a model directory on JSONL dialogues (--model DIR --data FILE.jsonl)."""

    config: Path | None = None
    """A recipe YAML (recipes/*.yaml); options given beside it override its values."""
    train: Annotated[SFTConfig, Flat] = field(default_factory=SFTConfig)


def pretrain(command: PretrainCommand) -> None:
    from remask.train.pretrain import pretrain as run

    print(f"saved {run(command.train)}", file=sys.stderr)


def sft(command: SFTCommand) -> None:
    from remask.train.sft import sft as run

    print(f"saved {run(command.train)}", file=sys.stderr)


def demo(retrain: bool = False, out: Path = Path("runs/demo"), samples: int = 3, seed: int = 0) -> None:
    """The main job: pretrain a small diffusion LM on the 300 Tang poems, then watch it write.

    Args:
        retrain: Train again even if a finished demo run exists.
        out: Run directory of the demo model.
        samples: How many poems to generate after training.
        seed: Random seed of the first poem.
    """
    from remask.app.demo import demo as run

    run(out=out, retrain=retrain, samples=samples, seed=seed)


def plot(runs: Annotated[list[Path], Positional], out: Path = Path("loss.png")) -> None:
    """Plot training and validation loss curves of one or more runs into a PNG.

    Args:
        runs: Run directories (each with metrics.jsonl).
        out: Output PNG file.
    """
    from remask.app.plot import plot_runs

    print(plot_runs(runs, out))
