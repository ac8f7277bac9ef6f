"""Which torch device a command runs on, checked before anything is loaded onto it."""

from __future__ import annotations

import torch

from remask.errors import RemaskError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` (CUDA when available, else the CPU), `cpu`, `cuda` or `cuda:N`; anything else, or a
    CUDA device this machine lacks, is a RemaskError."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RemaskError(f"unknown device {name!r}; choose cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise RemaskError(f"device {name!r} cannot run remask; choose cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise RemaskError(f"device {name!r} was asked for but CUDA is not available on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RemaskError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
