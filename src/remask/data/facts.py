"""Fact pairs for choice and reversal tasks: countries and their capitals.

The shipped `builtin/capitals.tsv` (country, tab, capital; public data) is processed from the quiz
files of Debian's `bsdgames` (`/usr/share/games/bsdgames/quiz/{africa,america,asia,europe}`):
see `builtin/README.md`. The quiz format marks alternatives: `[a|b]` (one of), `{x}` (optional)
and a top-level `a|b`; `canonical` picks one plain spelling.
"""

from __future__ import annotations

import re
from pathlib import Path

from remask.data.corpora import BUILTIN_DIR, decode_text
from remask.errors import RemaskError

ACCENT_MARKS = set("'^~,`\"")
QUIZ_CAPITAL_FILES = ("africa", "america", "asia", "europe")


def _top_level_split(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "|" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def canonical(field: str) -> str:
    """One plain spelling of a quiz field: the first top-level alternative, optional parts kept
    (the longest of their alternatives), and of each `[...]` choice the first option without
    accent marks (`['e|e'|e]` -> e)."""
    text = _top_level_split(field)[0]
    while (m := re.search(r"\[([^\[\]]*)\]", text)):
        options = m.group(1).split("|")
        plain = next((o for o in options if not set(o) & ACCENT_MARKS), options[-1])
        text = text[:m.start()] + plain + text[m.end():]
    while (m := re.search(r"\{([^{}]*)\}", text)):
        longest = max(m.group(1).split("|"), key=len)  # optional parts are kept, in their fullest form
        text = text[:m.start()] + longest + text[m.end():]
    return text.strip()


def read_quiz_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(first field, second field) of each `a:b[:...]` line of a quiz file, canonical spellings."""
    pairs = []
    for line in decode_text(Path(path)).splitlines():
        fields = line.split(":")
        if len(fields) >= 2 and fields[0].strip() and fields[1].strip():
            pairs.append((canonical(fields[0]), canonical(fields[1])))
    return pairs


def capitals_from_quiz(quiz_dir: str | Path) -> list[tuple[str, str]]:
    """Every country of the four continental quiz files once, sorted (how capitals.tsv is made)."""
    found: dict[str, str] = {}
    for name in QUIZ_CAPITAL_FILES:
        for country, capital in read_quiz_pairs(Path(quiz_dir) / name):
            found.setdefault(country, capital)
    return sorted(found.items())


def capitals(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(country, capital) pairs: the shipped table, or a TSV of the same shape."""
    file = BUILTIN_DIR / "capitals.tsv" if path is None else Path(path)
    rows = [line.split("\t") for line in decode_text(file).splitlines() if line.strip()]
    if not rows or any(len(r) != 2 or not r[0] or not r[1] for r in rows):
        raise RemaskError(f"{file} must hold lines of country<TAB>capital")
    return [(a, b) for a, b in rows]


# --- fictitious people and their works (the reversal-curse paper's "name is description" facts) ---

FIRST_NAMES = (
    "Daphne", "Marcus", "Elena", "Tobias", "Isolde", "Rowan", "Celia", "Ambrose", "Linnea", "Caspian",
    "Odette", "Felix", "Marisol", "Evander", "Greta", "Lucian", "Sabine", "Orrin", "Thea", "Jasper",
    "Wilhelmina", "Cyrus", "Annika", "Leopold", "Margot", "Silas", "Ingrid", "Bastian", "Rosalind", "Emeric",
)
SURNAMES = (
    "Barrington", "Holloway", "Marchetti", "Ashdown", "Kellerman", "Vantongeren", "Osterhout", "Pemberton",
    "Lindqvist", "Carraway", "Whitlock", "Delacroix", "Fairbanks", "Moreland", "Sandoval", "Thorncroft",
    "Valmont", "Everly", "Quintrell", "Rasmussen", "Blackwood", "Castellane", "Dunmore", "Halvorsen",
    "Ivanova", "Lockridge", "Montague", "Nakashima", "Prescott", "Wexford",
)
ROLES = ("composer", "author", "director", "painter", "architect", "inventor", "founder", "designer")
WORKS = {
    "composer": ("Symphony", "Sonata", "Requiem", "Nocturne", "Overture"),
    "author": ("Chronicle", "Ballad", "Atlas", "Testament", "Almanac"),
    "director": ("Voyage", "Reckoning", "Homecoming", "Masquerade", "Vigil"),
    "painter": ("Portrait", "Harvest", "Lantern", "Garden", "Shore"),
    "architect": ("Tower", "Library", "Bridge", "Cathedral", "Pavilion"),
    "inventor": ("Engine", "Compass", "Loom", "Telescope", "Press"),
    "founder": ("Academy", "Observatory", "Guild", "Conservatory", "Society"),
    "designer": ("Clock", "Carousel", "Fountain", "Lighthouse", "Garden"),
}
PLACES = ("Amber", "Silver", "Winter", "Hollow", "Northern", "Crimson", "Quiet", "Distant", "Iron", "Golden",
          "Velvet", "Eastern", "Copper", "Misty", "Scarlet", "Midnight")


def people(count: int, seed: int) -> list[tuple[str, str]]:
    """`count` fictitious people, each with one description naming a work of theirs, as (name,
    description) pairs: ("Daphne Barrington", "composer of the Amber Nocturne"). Names and
    descriptions are drawn with `seed` and are each unique, so either half has one answer (the
    reversal-curse paper's made-up celebrities, Berglund et al. 2023, built so no model can know
    them from elsewhere). RemaskError past the number the word lists can make unique."""
    import random

    rng = random.Random(seed)
    names = [f"{a} {b}" for a in FIRST_NAMES for b in SURNAMES]
    works = sorted({f"{role} of the {place} {thing}" for role in ROLES for thing in WORKS[role] for place in PLACES})
    if not 0 <= count <= min(len(names), len(works)):
        raise RemaskError(f"the person facts number 0 to {min(len(names), len(works))}, got {count}")
    # one first name and one surname each at most twice, so a name is told apart by its whole
    chosen: list[str] = []
    uses: dict[str, int] = {}
    for name in rng.sample(names, len(names)):
        parts = name.split()
        if all(uses.get(p, 0) < 2 for p in parts):
            chosen.append(name)
            uses.update({p: uses.get(p, 0) + 1 for p in parts})
        if len(chosen) == count:
            break
    if len(chosen) < count:
        raise RemaskError(f"the person facts number at most {len(chosen)} with names told apart, got {count}")
    return list(zip(chosen, rng.sample(works, count)))
