"""Scoring answers against the gold halves: the paper's criterion (the answer contains the gold
half-line) and exact match."""

from __future__ import annotations

from collections.abc import Sequence


def score_answers(answers: Sequence[str | None], golds: Sequence[str]) -> dict:
    """Contains (the paper's criterion) and exact match, as fractions; both None where an answer is
    None (the question cannot be put to this model: `probe_answers`)."""
    n = len(golds)
    if None in answers:
        return {"accuracy": None, "exact": None, "n": n}
    contains = sum(g in a for a, g in zip(answers, golds))
    exact = sum(a.strip().rstrip("。，？！.") == g for a, g in zip(answers, golds))
    return {"accuracy": contains / n if n else 0.0, "exact": exact / n if n else 0.0, "n": n}


def record_direction(row: dict, direction: str, answers: Sequence[str | None], golds: Sequence[str]) -> dict:
    """`row` with one direction's scores added as report fields: `direction` (contains),
    `direction_exact` and `n`."""
    scored = score_answers(answers, golds)
    row[direction], row[f"{direction}_exact"], row["n"] = scored["accuracy"], scored["exact"], scored["n"]
    return row
