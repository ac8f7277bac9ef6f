"""The reversal evaluation's data: pairs (the two halves of a couplet, or a country and its capital)
grouped by the documents that hold them, the test/SFT split, and what is put to a model about a
pair: a question (a chat turn) or a probe (plain text with the unknown half left out)."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from remask.data.corpora import PUNCTUATION, QUOTES, Poem, parse_jsonl_file, poem_sentences
from remask.data.facts import capitals, people
from remask.errors import RemaskError
from remask.tokenizer import Tokenizer, check_text

Direction = Literal["forward", "backward"]
DIRECTIONS: tuple[Direction, Direction] = ("forward", "backward")
Kind = Literal["poem", "capital", "person"]
KINDS: tuple[Kind, ...] = ("poem", "capital", "person")
StatementStyle = Literal["qa", "plain"]
HALF = re.compile(r"^[\u3400-\u9fff]{4,9}$")  # a half-line: Chinese characters only


def fields(direction: Direction) -> tuple[str, str]:
    """The names of (the known half, the half asked for) in `direction`: the first half is known
    forwards, the second backwards."""
    return ("first", "second") if direction == "forward" else ("second", "first")


@dataclass(frozen=True)
class Pair:
    first: str
    second: str
    source: int  # the document (poem, fact) it comes from; for a pairs file, its line's index

    def halves(self, direction: Direction) -> tuple[str, str]:
        """(the known half, the half asked for) of a question in `direction`."""
        known, gold = fields(direction)
        return getattr(self, known), getattr(self, gold)

    def __str__(self) -> str:
        return f"{self.first} / {self.second}"


@dataclass
class ReversalSet:
    """Pairs grouped by the documents that hold them; pretraining reads `documents`."""

    kind: Kind
    documents: list[str]
    pairs: list[Pair]
    stats: dict = field(default_factory=dict)

    def by_source(self) -> dict[int, list[Pair]]:
        out: dict[int, list[Pair]] = {}
        for p in self.pairs:
            out.setdefault(p.source, []).append(p)
        return out


# --- building the sets --------------------------------------------------------------------------------


def clauses(sentence: str) -> list[str]:
    """A sentence (as `poem_sentences` gives it) cut at its commas, its end mark dropped."""
    return sentence.rstrip("。？！；").split("，")


def couplets(poem: Poem) -> list[tuple[str, str]]:
    """The regular couplets of a poem, from its sentences (`poem_sentences`: wrapped lines joined,
    sub-titles dropped): a sentence `A，B` with two halves of equal length counts, and so does
    `A，B，C，D` read as two such couplets (a couplet ended by a comma, as in 长大一相逢，); so do two
    consecutive comma-less sentences of equal length (a couplet written with 。 between its halves).
    Prose (prefaces) and irregular lines are skipped."""
    out, pending = [], None
    for sentence in poem_sentences(poem):
        parts = clauses(sentence)
        firsts, seconds = parts[::2], parts[1::2]
        if (len(parts) % 2 == 0 and all(HALF.match(p) for p in parts)
                and all(len(a) == len(b) for a, b in zip(firsts, seconds))):
            out.extend(zip(firsts, seconds))
            pending = None
        elif len(parts) == 1 and HALF.match(parts[0]):
            if pending is not None and len(pending) == len(parts[0]):
                out.append((pending, parts[0]))
                pending = None
            else:
                pending = parts[0]
        else:
            pending = None
    return out


def sentence_pairs(poem: Poem) -> list[tuple[str, str]]:
    """Every pair the paper's protocol may ask about, of any lengths: the two halves of a sentence
    split at its comma (`A，B`), or of each half of a sentence of 2k clauses (`A，B，C，D` as two)."""
    out = []
    for sentence in poem_sentences(poem):
        parts = clauses(sentence.rstrip("。？！；，"))
        if len(parts) % 2 == 0 and all(parts):
            out.extend(zip(parts[::2], parts[1::2]))
    return out


def _unique(found: Sequence[tuple[int, str, str]]) -> list[Pair]:
    """The pairs whose halves occur once in `found` (a half that occurs twice has no single answer)."""
    counts: dict[str, int] = {}
    for _, a, b in found:
        for h in (a, b):
            counts[h] = counts.get(h, 0) + 1
    return [Pair(a, b, i) for i, a, b in found if counts[a] == 1 and counts[b] == 1]


def half(text: str) -> str:
    """A half as a poem's sentences read it (`poem_sentences`): full-width marks, no spaces, no
    quotation marks, no mark at either end ("床前明月光，" is 床前明月光)."""
    return text.translate(PUNCTUATION).strip(QUOTES).strip("，。？！；：、")


def place(poems: Sequence[Poem], pairs: Sequence[Pair]) -> list[Pair]:
    """`pairs` found in `poems`, each with the index of the first poem that holds it as its source
    and its halves as the poem writes them (`half`: full-width marks, no spaces or end marks):
    the two halves of a sentence split at its comma (`sentence_pairs`), of any lengths, or the two
    parts of a comma-less sentence (an edition that drops the comma: 蜀道之难难于上青天。). One
    RemaskError naming every pair that is not found."""
    where: dict[tuple[str, str], int] = {}
    joined: dict[str, int] = {}  # the comma-less sentences
    for i, poem in enumerate(poems):
        for a, b in sentence_pairs(poem):
            where.setdefault((a, b), i)
        for sentence in poem_sentences(poem):
            if "，" not in sentence:
                joined.setdefault(sentence.rstrip("。？！；"), i)
    placed, missing = [], []
    for p in pairs:
        first, second = half(p.first), half(p.second)
        source = where.get((first, second), joined.get(first + second)) if first and second else None
        if source is None:
            missing.append(str(p))
        else:
            placed.append(Pair(first, second, source))
    if missing:
        raise RemaskError(f"{len(missing)} holdout pair(s) are not the two halves of a sentence of the poems split at its "
                          f"comma: {'; '.join(missing)}")
    return placed


def poem_set(poems: Sequence[Poem], holdout: Sequence[Pair] | None = None) -> ReversalSet:
    """One document per poem (its text as pretraining sees it); pairs: the regular couplets whose
    halves are unique in the whole set, and the `holdout` pairs wherever they are (`place`; a
    couplet sharing a half with one of them is dropped, so that a half has one answer)."""
    found = [(i, a, b) for i, poem in enumerate(poems) for a, b in couplets(poem)]
    pairs = _unique(found)
    placed = list(dict.fromkeys(place(poems, holdout))) if holdout else []
    taken = {h for p in placed for h in (p.first, p.second)}
    kept = [p for p in pairs if p.first not in taken and p.second not in taken]
    pairs = sorted(kept + [p for p in placed if p not in kept], key=lambda p: p.source)
    if not pairs:
        raise RemaskError("the poem file holds no usable couplets (two halves of equal length split by ，)")
    stats = {"poems": len(poems), "poems_with_couplets": len({p.source for p in pairs}), "couplets": len(pairs),
             "couplets_dropped_as_ambiguous": len(found) - len(kept)}
    if holdout:
        stats["holdout_pairs"] = len(placed)
    return ReversalSet("poem", [p.text() for p in poems], pairs, stats)


CAPITAL_DOCUMENT = "The capital of {first} is {second}."  # a fact's own document: read one way only


def capital_set(pairs: Sequence[tuple[str, str]] | None = None) -> ReversalSet:
    """Countries and capitals: each fact a one-sentence document read one way only, so the AR
    twin sees the country before the capital and never the reverse."""
    facts = list(capitals() if pairs is None else pairs)
    docs = [CAPITAL_DOCUMENT.format(first=country, second=capital) for country, capital in facts]
    kept = _unique([(i, c, k) for i, (c, k) in enumerate(facts)])
    return ReversalSet("capital", docs, kept, {"facts": len(facts), "pairs": len(kept)})


PERSON_DOCUMENT = "{first} is the {second}."  # a person's own document: the name first, always


def person_set(pairs: Sequence[tuple[str, str]] | None = None, *, count: int = 40, seed: int = 0) -> ReversalSet:
    """Fictitious people and their works (`people`), in the style of the reversal-curse paper
    ("Daphne Barrington is the director of ..."): each fact a one-sentence document, the name
    first, so the AR twin never reads a description before its name."""
    facts = list(people(count, seed) if pairs is None else pairs)
    docs = [PERSON_DOCUMENT.format(first=name, second=description) for name, description in facts]
    kept = _unique([(i, n, d) for i, (n, d) in enumerate(facts)])
    return ReversalSet("person", docs, kept, {"facts": len(facts), "pairs": len(kept)})


def load_holdout(path: str | Path) -> list[Pair]:
    """Pairs from JSONL lines {"first": str, "second": str}; a pair's source is its line's index."""

    def parse(record: object, where: str) -> tuple[str, str]:
        if not (isinstance(record, dict) and all(isinstance(record.get(k), str) and record[k] for k in ("first", "second"))):
            raise RemaskError(f"{where}: each line must be {{\"first\": str, \"second\": str}} (non-empty)")
        return check_text(record["first"], f"{where}: 'first'"), check_text(record["second"], f"{where}: 'second'")

    return [Pair(a, b, i) for i, (a, b) in enumerate(parse_jsonl_file(path, "holdout file", parse))]


def split(data: ReversalSet, *, test_fraction: float, seed: int,
          holdout: Sequence[Pair] | None = None) -> tuple[set[int], list[Pair]]:
    """(documents whose pairs SFT may use, test pairs). Test documents are drawn with `seed`;
    with `holdout`, the documents holding those pairs are the test documents and the set's own
    pairs are the test set. No test document contributes anything to SFT."""
    sources = sorted(data.by_source())
    if holdout is not None:
        index = {(p.first, p.second): p for p in data.pairs}
        missing = [str(p) for p in holdout if (p.first, p.second) not in index]
        if missing:
            raise RemaskError(f"{len(missing)} holdout pair(s) are not pairs of this set: {'; '.join(missing)}")
        test_pairs = [index[(p.first, p.second)] for p in holdout]
        test_sources = {p.source for p in test_pairs}
    else:
        rng = random.Random(seed)
        n_test = max(1, round(len(sources) * test_fraction))
        test_sources = set(rng.sample(sources, n_test))
        test_pairs = [p for p in data.pairs if p.source in test_sources]
    return set(sources) - test_sources, test_pairs


# --- what is put to a model ---------------------------------------------------------------------------

QUESTIONS: dict[str, dict[str, str]] = {
    "poem": {"forward": "{x}的下一句是什么？只回答这一句。", "backward": "{x}的上一句是什么？只回答这一句。"},
    "capital": {"forward": "What is the capital of {x}? Answer with the name only.",
                "backward": "Which country has the capital {x}? Answer with the name only."},
    "person": {"forward": "Who is {x}? Answer with the description only.",
               "backward": "Who is the {x}? Answer with the name only."},
}

# Each pair stated as pretraining text, either way round ("mixed training"): "plain", a sentence;
# "qa", the question followed by its answer as plain text, so that the chat turn after SFT meets a
# familiar form (in the benchmark the AR twin learnt to apply the plain statements to pairs never
# stated, 0.73 forwards by step 900, and the question form not at all by then).
PLAIN_STATEMENTS: dict[str, dict[str, str]] = {
    "poem": {"forward": "{first}的下一句是{second}。", "backward": "{second}的上一句是{first}。"},
    "capital": {"forward": "The capital of {first} is {second}.", "backward": "{second} is the capital of {first}."},
    "person": {"forward": "{first} is the {second}.", "backward": "The {second} is {first}."},
}


def statements(kind: str, style: StatementStyle = "plain") -> dict[str, str]:
    """The {first}/{second} templates of a kind's statements, by direction."""
    if style == "plain":
        return PLAIN_STATEMENTS[kind]
    sep, end = ("", "。") if kind == "poem" else (" ", ".")
    out = {}
    for d in DIRECTIONS:
        known, gold = fields(d)
        out[d] = QUESTIONS[kind][d].replace("{x}", f"{{{known}}}") + sep + f"{{{gold}}}" + end
    return out


COUPLET = "{first}，{second}。"

# each kind's pair as pretraining reads it: (probe name, template)
DOCUMENT_PROBES = {"poem": ("couplet", COUPLET), "capital": ("document", CAPITAL_DOCUMENT),
                   "person": ("document", PERSON_DOCUMENT)}


def probes(kind: str, style: StatementStyle = "plain") -> dict[str, dict[str, str]]:
    """The plain texts a base model (no SFT) completes, by name and direction ({first}/{second} are
    the pair's halves): the pair as pretraining reads it (a poem's couplet; a fact's own sentence),
    with either half unknown, and the statement of either kind."""
    name, template = DOCUMENT_PROBES[kind]
    return {name: {d: template for d in DIRECTIONS}} | {"statement": statements(kind, style)}


@dataclass(frozen=True)
class Question:
    """A pair asked about in one direction, as one chat turn."""

    pair: Pair
    direction: Direction
    text: str
    gold: str  # the half asked for


def question(kind: str, direction: Direction, pair: Pair) -> Question:
    known, gold = pair.halves(direction)
    return Question(pair, direction, QUESTIONS[kind][direction].format(x=known), gold)


@dataclass(frozen=True)
class Probe:
    """A pair as plain text with the unknown half left out, in token ids: BOS and the text before
    the unknown half, the gold half's token count, the text after it."""

    pair: Pair
    direction: Direction
    before: list[int]
    n: int
    after: list[int]
    known_first: bool  # the known half comes before the unknown one (an AR twin can be asked)
    gold: str

    def masked(self, mask_id: int, window: int | None = None) -> tuple[list[int], slice]:
        """A diffusion model's probe: the text with n masks for the unknown half, then masks up to
        `window` tokens (never revealed); and the answer's region."""
        ids = self.before + [mask_id] * self.n + self.after
        return ids + [mask_id] * max(0, (window or 0) - len(ids)), slice(len(self.before), len(self.before) + self.n)


def make_probes(tok: Tokenizer, pairs: Sequence[Pair], direction: Direction, template: str) -> list[Probe]:
    """Each pair's probe for `template` ({first}/{second}), the half asked for left out."""
    bos = [tok.bos_id] if tok.bos_id is not None else []
    out = []
    for pair in pairs:
        known, gold = pair.halves(direction)
        halves = {"first": pair.first, "second": pair.second} | {fields(direction)[1]: "\0"}
        before, after = template.format(**halves).split("\0")
        out.append(Probe(pair, direction, bos + tok.encode(before), len(tok.encode(gold)), tok.encode(after),
                         known in before, gold))
    return out
