"""Training text built from a reversal set: the SFT dialogues (questions about the SFT documents'
pairs, both directions), further renderings of every document, and the SFT pairs stated both ways
in pretraining ("mixed training"). A test document never contributes to any of them."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

from remask.eval.reversal.data import DIRECTIONS, DOCUMENT_PROBES, ReversalSet, StatementStyle, question, statements

AnswerStyle = Literal["half", "sentence"]


def sft_dialogues(data: ReversalSet, sources: set[int], answers: AnswerStyle = "half") -> list[dict]:
    """Both directions of every pair of the SFT documents, as {"messages": [...]} records. The
    answer is the half asked for ("half"), or the whole sentence that holds the pair as pretraining
    reads it ("sentence": "X，Y。" for a couplet, either way round; the fact's own sentence), which
    still counts only when it holds the gold half, the unknown one."""
    out = []
    for pair in data.pairs:
        if pair.source in sources:
            for direction in DIRECTIONS:
                q = question(data.kind, direction, pair)
                answer = q.gold if answers == "half" else DOCUMENT_PROBES[data.kind][1].format(first=pair.first,
                                                                                                 second=pair.second)
                out.append({"messages": [{"role": "user", "content": q.text}, {"role": "assistant", "content": answer}]})
    return out


FACT_RESTATEMENTS = {
    "capital": ("{first}'s capital is {second}.", "Capital of {first}: {second}.",
                "In {first}, the seat of government is {second}."),
    "person": ("{first}, the {second}, was born in a small town.", "Known to many: {first}, the {second}.",
               "{first} became famous as the {second}."),
}


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
                out.extend(rng.choice(FACT_RESTATEMENTS[data.kind]).format(first=p.first, second=p.second) for p in pairs)
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
    """`records` as JSONL at `path`, written whole or not at all."""
    from remask.atomic import write_text

    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
