"""The reversal curse (LLaDA section 3.3, Table 4): complete the next line of a poem, and the
previous one, side by side with the autoregressive twin.

The protocol of the paper's released evaluation: a pair is the two halves of a couplet (split at
`，`), asked as `X的下一句是什么？` (forward) and `X的上一句是什么？` (backward) with the instruction to
answer with the line only; an answer counts when it contains the gold half-line (exact match is
reported too). A second set of facts is built the same way: countries and capitals.

This module builds the pairs, the pretraining documents, the SFT dialogues (poems held out of SFT
never appear in them), answers questions with either kind of model, and scores them.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from remask.data.corpora import Poem, parse_jsonl_file
from remask.data.facts import capitals
from remask.errors import RemaskError
from remask.pipeline import Pipeline, left_pad
from remask.sampling import SamplerConfig, fill_masks
from remask.sampling.autoregressive import ar_generate_cached
from remask.sampling.engine import fill_masks_fast, generate_fast
from remask.tokenizer import check_text

Direction = Literal["forward", "backward"]
DIRECTIONS: tuple[Direction, Direction] = ("forward", "backward")
SENTENCE_END = re.compile(r"(?<=[。？！；])")
HALF = re.compile(r"^[\u3400-\u9fff]{4,9}$")  # a half-line: Chinese characters only


@dataclass(frozen=True)
class Pair:
    first: str
    second: str
    source: int  # the document (poem, fact) it comes from

    def halves(self, direction: Direction) -> tuple[str, str]:
        """(the known half, the half asked for) of a question in `direction`."""
        known, gold = fields(direction)
        return getattr(self, known), getattr(self, gold)


def fields(direction: Direction) -> tuple[str, str]:
    """The names of (the known half, the half asked for) in `direction`: the first half is known
    forwards, the second backwards."""
    return ("first", "second") if direction == "forward" else ("second", "first")


@dataclass
class ReversalSet:
    """Pairs grouped by the documents that hold them; pretraining reads `documents`."""

    kind: Literal["poem", "capital"]
    documents: list[str]
    pairs: list[Pair]
    stats: dict = field(default_factory=dict)

    def by_source(self) -> dict[int, list[Pair]]:
        out: dict[int, list[Pair]] = {}
        for p in self.pairs:
            out.setdefault(p.source, []).append(p)
        return out


# --- building the sets --------------------------------------------------------------------------------


def couplets(poem: Poem) -> list[tuple[str, str]]:
    """The regular couplets of a poem: its lines are joined first (a couplet may be wrapped over
    two lines), cut into sentences at 。？！；, and a sentence `A，B` with two halves of equal
    length counts; so do two consecutive comma-less sentences of equal length (a couplet written
    with 。 between its halves). Prose (prefaces) and irregular lines are skipped."""
    sentences = [s.strip() for s in SENTENCE_END.split("".join(poem.lines)) if s.strip()]
    out, pending = [], None
    for sentence in sentences:
        body = sentence.rstrip("。？！；")
        parts = body.split("，")
        if len(parts) == 2 and len(parts[0]) == len(parts[1]) and all(HALF.match(p) for p in parts):
            out.append((parts[0], parts[1]))
            pending = None
        elif len(parts) == 1 and HALF.match(body):
            if pending is not None and len(pending) == len(body):
                out.append((pending, body))
                pending = None
            else:
                pending = body
        else:
            pending = None
    return out


def poem_set(poems: Sequence[Poem]) -> ReversalSet:
    """One document per poem (its text as pretraining sees it); pairs whose halves are unique in
    the whole set (a half-line that occurs twice has no single answer)."""
    found = [(i, a, b) for i, poem in enumerate(poems) for a, b in couplets(poem)]
    halves: dict[str, int] = {}
    for _, a, b in found:
        for h in (a, b):
            halves[h] = halves.get(h, 0) + 1
    pairs = [Pair(a, b, i) for i, a, b in found if halves[a] == 1 and halves[b] == 1]
    if not pairs:
        raise RemaskError("the poem file holds no usable couplets (two halves of equal length split by ，)")
    stats = {"poems": len(poems), "poems_with_couplets": len({p.source for p in pairs}), "couplets": len(pairs),
             "couplets_dropped_as_ambiguous": len(found) - len(pairs)}
    return ReversalSet("poem", [p.text() for p in poems], pairs, stats)


CAPITAL_DOCUMENT = "The capital of {first} is {second}."  # a fact's own document: read one way only


def capital_set(pairs: Sequence[tuple[str, str]] | None = None) -> ReversalSet:
    """Countries and capitals: each fact a one-sentence document read one way only, so the AR
    twin sees the country before the capital and never the reverse."""
    facts = list(capitals() if pairs is None else pairs)
    docs = [CAPITAL_DOCUMENT.format(first=country, second=capital) for country, capital in facts]
    counts: dict[str, int] = {}
    for country, capital in facts:
        for h in (country, capital):
            counts[h] = counts.get(h, 0) + 1
    kept = [Pair(c, k, i) for i, (c, k) in enumerate(facts) if counts[c] == 1 and counts[k] == 1]
    return ReversalSet("capital", docs, kept, {"facts": len(facts), "pairs": len(kept)})


def load_holdout(path: str | Path) -> list[tuple[str, str]]:
    """Pairs from JSONL lines {"first": str, "second": str}."""

    def parse(record: object, where: str) -> tuple[str, str]:
        if not (isinstance(record, dict) and all(isinstance(record.get(k), str) and record[k] for k in ("first", "second"))):
            raise RemaskError(f"{where}: each line must be {{\"first\": str, \"second\": str}} (non-empty)")
        return check_text(record["first"], f"{where}: 'first'"), check_text(record["second"], f"{where}: 'second'")

    return parse_jsonl_file(path, "holdout file", parse)


def split(data: ReversalSet, *, test_fraction: float, seed: int,
          holdout: Sequence[tuple[str, str]] | None = None) -> tuple[set[int], list[Pair]]:
    """(documents whose pairs SFT may use, test pairs). Test documents are drawn with `seed`;
    with `holdout`, the documents holding those pairs are the test documents and the pairs
    themselves are the test set. No test document contributes anything to SFT."""
    sources = sorted(data.by_source())
    if holdout is not None:
        index = {(p.first, p.second): p for p in data.pairs}
        missing = [f"{a}，{b}" for a, b in holdout if (a, b) not in index]
        if missing:
            raise RemaskError(f"{len(missing)} holdout pair(s) are not couplets of the poems, e.g. {missing[0]}")
        test_pairs = [index[(a, b)] for a, b in holdout]
        test_sources = {p.source for p in test_pairs}
    else:
        rng = random.Random(seed)
        n_test = max(1, round(len(sources) * test_fraction))
        test_sources = set(rng.sample(sources, n_test))
        test_pairs = [p for p in data.pairs if p.source in test_sources]
    return set(sources) - test_sources, test_pairs


# --- questions ----------------------------------------------------------------------------------------

QUESTIONS: dict[str, dict[str, str]] = {
    "poem": {"forward": "{x}的下一句是什么？只回答这一句。", "backward": "{x}的上一句是什么？只回答这一句。"},
    "capital": {"forward": "What is the capital of {x}? Answer with the name only.",
                "backward": "Which country has the capital {x}? Answer with the name only."},
}


# Each pair stated as pretraining text, either way round ("mixed training"): "plain", a sentence;
# "qa", the question followed by its answer as plain text, so that the chat turn after SFT meets a
# familiar form (in the benchmark the AR twin learnt to apply the plain statements to pairs never
# stated, 0.73 forwards by step 900, and the question form not at all by then).
PLAIN_STATEMENTS: dict[str, dict[str, str]] = {
    "poem": {"forward": "{first}的下一句是{second}。", "backward": "{second}的上一句是{first}。"},
    "capital": {"forward": "The capital of {first} is {second}.", "backward": "{second} is the capital of {first}."},
}
StatementStyle = Literal["qa", "plain"]


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


def question(kind: str, direction: Direction, pair: Pair) -> tuple[str, str]:
    """(question text, gold answer)."""
    known, gold = pair.halves(direction)
    return QUESTIONS[kind][direction].format(x=known), gold


def sft_dialogues(data: ReversalSet, sources: set[int]) -> list[dict]:
    """Both directions of every pair of the SFT documents, as {"messages": [...]} records."""
    out = []
    for pair in data.pairs:
        if pair.source in sources:
            for direction in DIRECTIONS:
                q, a = question(data.kind, direction, pair)
                out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


FACT_RESTATEMENTS = ("{first}'s capital is {second}.", "Capital of {first}: {second}.",
                     "In {first}, the seat of government is {second}.")


def restatements(data: ReversalSet, copies: int, seed: int) -> list[str]:
    """`copies` further renderings of every document for pretraining, each pair's first half still
    before its second (so an autoregressive model never reads a pair backwards): a poem's couplets
    in a seeded random order, one a line, without title or author; a fact in other words. Knowledge
    seen in varied contexts is what later fine-tuning can extract (Allen-Zhu and Li 2023, part 3.1)."""
    rng, out = random.Random(seed), []
    for _ in range(copies):
        for _source, pairs in sorted(data.by_source().items()):
            if data.kind == "poem":
                order = rng.sample(pairs, len(pairs))
                out.append("\n".join(f"{p.first}，{p.second}。" for p in order))
            else:
                out.extend(rng.choice(FACT_RESTATEMENTS).format(first=p.first, second=p.second) for p in pairs)
    return out


def statement_documents(data: ReversalSet, sources: set[int], style: StatementStyle = "plain") -> list[str]:
    """Both directions of every pair of `sources` stated as pretraining text (`statements`: "X的下一句是Y。"
    and "Y的上一句是X。", or with "qa" "X的下一句是什么？只回答这一句。Y。"), one document per source:
    "mixed training" (Allen-Zhu and Li 2023, part 3.1), in which the model meets the relations the
    questions ask about while it stores the facts, and can learn to apply them to what it stored.
    Only SFT documents are passed: a test pair is never stated backwards, and never asked about."""
    templates = statements(data.kind, style)
    out = []
    for source, pairs in sorted(data.by_source().items()):
        if source in sources:
            out.append("\n".join(templates[d].format(first=p.first, second=p.second) for p in pairs for d in DIRECTIONS))
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    from remask.atomic import write_text

    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# --- answering --------------------------------------------------------------------------------------


def answer_questions(pipe: Pipeline, questions: list[str], *, sampler: SamplerConfig, max_new_tokens: int,
                     seed: int = 0, batch_size: int = 32, progress: Callable[[int], None] | None = None) -> list[str]:
    """Each question as one chat turn, `batch_size` at a time (left-padded); the diffusion model
    answers with the sampler, the AR twin by decoding left to right (greedy unless
    sampler.temperature > 0). Answers end at the model's end-of-turn."""
    out = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        ids, attention = left_pad([pipe.encode_prompt([{"role": "user", "content": q}]) for q in chunk],
                                  pipe.tokenizer.pad_id, pipe.device)
        generator = torch.Generator(device=pipe.device).manual_seed(seed + start)
        vocab = pipe.model.config.vocab_size
        if pipe.model.config.causal:
            x, _ = ar_generate_cached(pipe.model, ids, max_new_tokens, vocab_size=vocab, eos_ids=pipe.stop_ids(),
                                      attention_mask=attention, temperature=sampler.temperature, generator=generator)
        else:
            x, _ = generate_fast(pipe.model, ids, sampler, mask_id=pipe.tokenizer.mask_id, vocab_size=vocab,
                                 attention_mask=attention, eos_ids=pipe.stop_ids(), generator=generator)
        for row in x[:, ids.shape[1]:].tolist():
            out.append(pipe.answer(row, [0] * len(row)).text)
        if progress is not None:
            progress(len(chunk))
    return out


COUPLET = "{first}，{second}。"


# each kind's pair as pretraining reads it: (probe name, template)
DOCUMENT_PROBES = {"poem": ("couplet", COUPLET), "capital": ("document", CAPITAL_DOCUMENT)}


def probes(kind: str, style: StatementStyle = "plain") -> dict[str, dict[str, str]]:
    """The plain texts a base model (no SFT) completes, by name and direction ({first}/{second} are
    the pair's halves): the pair as pretraining reads it (a poem's couplet; a fact's own sentence),
    with either half unknown, and the statement of either kind."""
    name, template = DOCUMENT_PROBES[kind]
    return {name: {d: template for d in DIRECTIONS}} | {"statement": statements(kind, style)}


def probe_steps(sampler: SamplerConfig, n: int) -> int:
    """Steps for n masks at the sampler's rate of steps per answer position."""
    return max(1, min(n, round(n * sampler.steps / sampler.gen_length)))


def probe_rows(tok, pairs: list[Pair], direction: Direction, template: str) -> list[tuple[list[int], int, list[int], bool]]:
    """Each pair's probe in pieces: (BOS and the text before the unknown half, the gold half's
    token count, the text after it, whether the known half comes before it)."""
    bos = [tok.bos_id] if tok.bos_id is not None else []
    rows = []
    for pair in pairs:
        known, gold = pair.halves(direction)
        halves = {"first": pair.first, "second": pair.second} | {fields(direction)[1]: "\0"}
        before, after = template.format(**halves).split("\0")
        rows.append((bos + tok.encode(before), len(tok.encode(gold)), tok.encode(after), known in before))
    return rows


def probe_window(before: list[int], n: int, after: list[int], mask_id: int,
                 window: int | None) -> tuple[list[int], slice]:
    """A diffusion model's probe: the text with n masks for the unknown half, then masks up to
    `window` tokens (never revealed); and the answer's region."""
    ids = before + [mask_id] * n + after
    return ids + [mask_id] * max(0, (window or 0) - len(ids)), slice(len(before), len(before) + n)


def probe_answers(pipe: Pipeline, pairs: list[Pair], direction: Direction, *, template: str,
                  sampler: SamplerConfig, seed: int = 0, batch_size: int = 32,
                  window: int | None = None) -> list[str | None]:
    """A base model (no SFT) completing plain text: `template` with the unknown half left out, after
    the BOS token. The diffusion model fills n masks in its place (n the gold half's token count,
    revealed by the sampler's rules at sampler.steps / sampler.gen_length steps per mask, one each
    by default); with `window`, the text is followed by masks up to `window` tokens, never revealed:
    the text after it, unknown, so the model reads a sequence of the length it was trained on
    (a bidirectional model trained on full windows only reads a short one poorly). The AR twin
    decodes n tokens after the text before it (greedy, or sampled at sampler.temperature; what
    follows cannot matter to it), so the answer is None where the known half does not come first:
    a left-to-right model cannot read what follows its answer. A sampler with a cache or a
    parallel rule fills through the fast engine (`fill_masks_fast`), otherwise `fill_masks`."""
    tok = pipe.tokenizer
    rows = probe_rows(tok, pairs, direction, template)
    if pipe.model.config.causal:
        out: list[str | None] = [None] * len(rows)
        ask = [i for i, row in enumerate(rows) if row[3]]
        for start in range(0, len(ask), batch_size):
            chunk = ask[start:start + batch_size]
            ids, attention = left_pad([rows[i][0] for i in chunk], tok.pad_id, pipe.device)
            generator = torch.Generator(device=pipe.device).manual_seed(seed + start)
            x, _ = ar_generate_cached(pipe.model, ids, max(rows[i][1] for i in chunk),
                                      vocab_size=pipe.model.config.vocab_size, attention_mask=attention,
                                      temperature=sampler.temperature, generator=generator)
            for i, row in zip(chunk, x[:, ids.shape[1]:].tolist()):
                out[i] = tok.decode(row[:rows[i][1]])
        return out
    out = []
    for i, (before, n, after, _) in enumerate(rows):
        generator = torch.Generator(device=pipe.device).manual_seed(seed + i)
        ids, answer = probe_window(before, n, after, tok.mask_id, window)
        probe = sampler.replace(steps=probe_steps(sampler, n), gen_length=n, block_length=None)
        x = torch.tensor([ids], device=pipe.device)
        if sampler.cache != "none" or sampler.parallel != "schedule":  # the fast engine's settings
            x, _ = fill_masks_fast(pipe.model, x, answer, probe, mask_id=tok.mask_id,
                                   vocab_size=pipe.model.config.vocab_size, generator=generator)
        else:
            x = fill_masks(pipe.model_fn, x, probe, mask_id=tok.mask_id, generator=generator, region=answer)
        out.append(tok.decode(x[0, answer].tolist()))
    return out


def infill_answers(pipe: Pipeline, pairs: list[Pair], direction: Direction, *, sampler: SamplerConfig,
                   seed: int = 0, window: int | None = None, kind: str = "poem") -> list[str]:
    """The base diffusion model without SFT fills the unknown half of the pair as pretraining reads
    it: `X，[M]*n。` (forward) or `[M]*n，Y。` (backward) for a poem, the fact's own sentence for a
    capital; n the gold half's length, after the BOS token (and in a `window` of masks:
    `probe_answers`); the masks are revealed by the sampler's rules."""
    if pipe.model.config.causal:
        raise RemaskError("infilling needs a diffusion model; an AR twin continues text (probe_answers)")
    return probe_answers(pipe, pairs, direction, template=DOCUMENT_PROBES[kind][1], sampler=sampler, seed=seed,
                         window=window)


def score_answers(answers: list[str | None], golds: list[str]) -> dict:
    """Contains (the paper's criterion) and exact match, as fractions; both None where an answer is
    None (the question cannot be put to this model: `probe_answers`)."""
    n = len(golds)
    if None in answers:
        return {"accuracy": None, "exact": None, "n": n}
    contains = sum(g in a for a, g in zip(answers, golds))
    exact = sum(a.strip().rstrip("。，？！.") == g for a, g in zip(answers, golds))
    return {"accuracy": contains / n if n else 0.0, "exact": exact / n if n else 0.0, "n": n}
