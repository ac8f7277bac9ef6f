"""`python -m remask <command>` (also what `torchrun -m remask` runs)."""

from remask.app.cli import entry

entry()
