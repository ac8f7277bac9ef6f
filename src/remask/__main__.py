"""`python -m remask <command>` (also what `torchrun -m remask` runs)."""

import sys

from remask.app.cli import main

sys.exit(main())
