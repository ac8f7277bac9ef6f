"""What every generated table is made of: the result files, the line naming them, the markdown."""

from __future__ import annotations

import json
from functools import cache

from _common import RESULTS_DIR

DASH = "–"


@cache
def record(name: str) -> dict:
    """A result file's whole record ({"name", "commit", "date", "device", "settings", "results"})."""
    return json.loads((RESULTS_DIR / f"{name}.json").read_text(encoding="utf-8"))


def results(name: str) -> dict:
    return record(name)["results"]


def source(*names: str, rows: tuple[str, ...] = ("sampling",), part: str | None = None) -> str:
    """The line under a table: which files, at which commits and dates (of each row, for the files
    in `rows`; of `part`'s own stamp, `results[part]["measured"]`, for a file whose parts are
    measured by separate runs), on which device."""
    parts = []
    for name in names:
        r = record(name)
        commits = sorted({row["commit"] for row in r["results"].get("methods", [])}) if name in rows else []
        own = r["results"][part]["measured"] if part else r
        at = f"rows measured at {', '.join(commits)}" if commits else f"commit {own['commit']}, {own['date'][:10]}"
        parts.append(f"`benchmarks/results/{name}.json` ({at}; {r['device']})")
    return "From " + " and ".join(parts) + "."


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def f2(x: float | None) -> str:
    return DASH if x is None else f"{x:.2f}"
