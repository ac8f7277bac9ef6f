"""The step-checkpoint helpers' former home: they live in `remask.train.checkpointing` now, and
stay importable from here for scripts (and tests) written against this path."""

import torch  # noqa: F401  (tests reach `torch.save` through this module's name)

from remask.train.checkpointing import (  # noqa: F401
    STATE_DIR,
    clear_leftovers,
    latest_checkpoint,
    read_trainer_state,
    restore_rng,
    step_dirs,
    write_step_checkpoint,
)
