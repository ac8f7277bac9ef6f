"""The items of remask's local evaluation tasks, from the shipped data (no download): country ->
capital multiple choice, the next half-line of a Tang poem, and the held-out Tang poems for
perplexity. `remask eval choice` and the lm-eval tasks in `tasks/` read the same items."""

from __future__ import annotations

import random

from remask.data.corpora import read_corpus, tang300_poems
from remask.data.facts import capitals
from remask.data.tokenize import split_documents


def capital_choice_items(*, seed: int = 0, options: int = 4) -> list[dict]:
    """"The capital of X is" with the right capital and `options - 1` others, in a seeded order."""
    pairs = capitals()
    rng = random.Random(seed)
    all_capitals = sorted({c for _, c in pairs})
    items = []
    for country, capital in pairs:
        others = rng.sample([c for c in all_capitals if c != capital], options - 1)
        choices = [capital, *others]
        rng.shuffle(choices)
        items.append({"context": f"The capital of {country} is", "choices": [f" {c}" for c in choices],
                      "answer": choices.index(capital)})
    return items


def poem_next_line_items() -> list[dict]:
    """Each poem's title, author and first half-line; the target is the second half-line."""
    items = []
    for poem in tang300_poems():
        first = poem.lines[0]
        if "，" not in first:
            continue
        head, tail = first.split("，", 1)
        items.append({"context": f"{poem.title}\n{poem.author}\n{head}，", "target": tail.rstrip("。？！")})
    return items


def tang300_held_out(val_fraction: float = 0.05) -> list[dict]:
    """The poems pretraining holds out at `val_fraction` (remask's default 0.05)."""
    docs = read_corpus("builtin:tang300")
    _, val = split_documents(docs, val_fraction)
    return [{"text": docs[i]} for i in val]
