"""The scheduler: which rows take which kind of pass at a step.

A row's cache setting names its rule; the rule names the pass the row takes now, from the row's
state alone (so a row's pass, and its answer, do not depend on what it is batched with):
- `none`: a full pass at every step;
- `prefix`, `dual`: a full pass when the block starts (it refreshes the cache), cached passes
  for the rest of the block.
A block model's row takes the `block_start` pass at its first step (its prompt, nothing cached
yet), then the `block` pass (its cache is exact, so it is always on).
`plan` groups the rows by pass kind; `Engine.step` runs the plan and never names a kind.
"""

from __future__ import annotations

from collections.abc import Callable

from remask.sampling.engine.rows import Row

Plan = dict[str, list[Row]]  # pass kind -> its rows, in the engine's row order


def full_always(row: Row) -> str:
    return "full"


def refresh_then_reuse(row: Row) -> str:
    """A full pass to (re)fill the cache at the block's start, then cached passes until the next block."""
    return "cached" if row.fresh else "full"


RULES: dict[str, Callable[[Row], str]] = {"none": full_always, "prefix": refresh_then_reuse, "dual": refresh_then_reuse}


def pass_kind(row: Row) -> str:
    """The kind of pass `row` takes at this step: a block model's row takes the exact block pass
    (its first, before anything is cached, a pass of its own); other rows follow their cache setting."""
    if row.grid is not None:
        return "block" if row.cached_upto else "block_start"
    return RULES[row.sampler.cache](row)


def plan(rows: list[Row], order: list[str]) -> Plan:
    """`rows` grouped by the pass each takes now; kinds in `order` (the registry's), absent kinds left out."""
    groups: Plan = {name: [] for name in order}
    for row in rows:
        groups[pass_kind(row)].append(row)
    return {name: group for name, group in groups.items() if group}
