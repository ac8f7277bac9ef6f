"""The reversal curse (LLaDA section 3.3, Table 4): complete the next line of a poem, and the
previous one, side by side with the autoregressive twin.

The protocol of the paper's released evaluation: a pair is the two halves of a sentence of a poem (split at
its `，`, of any lengths), asked as `X的下一句是什么？` (forward) and `X的上一句是什么？` (backward) with the instruction to
answer with the line only; an answer counts when it contains the gold half-line (exact match is
reported too). Two sets of facts are built the same way: countries and capitals, and fictitious people and
their works (the reversal-curse paper's kind).

- `data`: pairs, the sets that hold them, the test/SFT split, questions and probes;
- `corpus`: the pretraining and SFT text built from a set (held-out documents never in SFT);
- `run`: asking a model (questions, statements, infilling) and `evaluate`, the whole evaluation;
- `score`: containment and exact match.
"""

from remask.eval.reversal.corpus import restatements, sft_dialogues, statement_documents, write_jsonl
from remask.eval.reversal.data import (
    COUPLET,
    DIRECTIONS,
    KINDS,
    QUESTIONS,
    Direction,
    Pair,
    Probe,
    Question,
    ReversalSet,
    capital_set,
    couplets,
    load_holdout,
    make_probes,
    person_set,
    place,
    poem_set,
    probes,
    question,
    sentence_pairs,
    split,
    statements,
)
from remask.eval.reversal.run import answer_questions, evaluate, infill_answers, probe_answers
from remask.eval.reversal.score import record_direction, score_answers

__all__ = [
    "COUPLET", "DIRECTIONS", "KINDS", "QUESTIONS", "Direction", "Pair", "Probe", "Question", "ReversalSet", "answer_questions",
    "capital_set", "couplets", "evaluate", "infill_answers", "load_holdout", "make_probes", "person_set", "place",
    "poem_set", "probe_answers", "probes", "question", "record_direction", "restatements", "score_answers",
    "sentence_pairs", "sft_dialogues", "split", "statement_documents", "statements", "write_jsonl",
]
