"""Multiple-choice tasks: each option scored by log p(option | context) (the bound for the
diffusion model, exact when the option is short; exact for the AR twin), accuracy with a 95%
confidence interval, raw and length-normalised.

A task file is JSONL, one item a line: `{"context": str, "choices": [str, ...], "answer": int}`
(`question` is accepted for `context`, and `answer` may be the text of the right option). The
option is scored as the text that follows the context directly, so spacing belongs to the options
(" Paris"), as in lm-evaluation-harness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from remask.data.corpora import parse_jsonl_file
from remask.errors import RemaskError, check_fits
from remask.eval.scoring import Score, Scorer, wilson_interval
from remask.tokenizer import Tokenizer, check_text

Normalize = Literal["none", "tokens", "bytes"]


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: list[str]
    answer: int


def parse_item(record: object, where: str) -> ChoiceItem:
    if not isinstance(record, dict):
        raise RemaskError(f"{where}: each line must be a JSON object with context, choices and answer")
    context = record.get("context", record.get("question"))
    if not isinstance(context, str):
        raise RemaskError(f"{where}: field 'context' (or 'question') must be a string")
    choices = record.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise RemaskError(f"{where}: field 'choices' must be a list of at least two non-empty strings")
    for i, c in enumerate(choices):
        check_text(c, f"{where}: choice {i}")
    check_text(context, f"{where}: field 'context'")
    if "answer" not in record:
        raise RemaskError(f"{where}: the item has no gold 'answer'")
    answer = record["answer"]
    if isinstance(answer, str):
        if answer not in choices:
            raise RemaskError(f"{where}: the gold answer {answer!r} is not among the choices")
        answer = choices.index(answer)
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise RemaskError(f"{where}: field 'answer' must be an index into 'choices' (0..{len(choices) - 1}) "
                          f"or one of them, got {record['answer']!r}")
    return ChoiceItem(context, choices, answer)


def load_task(path: str | Path) -> list[ChoiceItem]:
    return parse_jsonl_file(path, "task file", parse_item)


def split_continuation(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) with the continuation's tokens as they are encoded after the
    context (a BPE may merge across the boundary: then the whole string decides)."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    whole = tokenizer.encode(context + continuation, where="task text")
    ctx = tokenizer.encode(context, where="task text")
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return bos + ctx, whole[len(ctx):]
    return bos + ctx, tokenizer.encode(continuation, where="task text")


@dataclass
class ChoiceResult:
    n: int
    correct: int
    correct_norm: int
    normalize: Normalize
    items: list[dict]

    def report(self) -> dict:
        lo, hi = wilson_interval(self.correct, self.n)
        lo_n, hi_n = wilson_interval(self.correct_norm, self.n)
        return {"n": self.n, "accuracy": self.correct / self.n, "ci95": [lo, hi],
                "accuracy_norm": self.correct_norm / self.n, "ci95_norm": [lo_n, hi_n],
                "normalize": self.normalize}


def normalised(score: Score, text: str, normalize: Normalize) -> float:
    if normalize == "tokens":
        return score.log_likelihood / score.tokens
    if normalize == "bytes":
        return score.log_likelihood / max(1, len(text.encode("utf-8")))
    return score.log_likelihood


def evaluate_choice(scorer: Scorer, tokenizer: Tokenizer, items: list[ChoiceItem], *,
                    normalize: Normalize = "bytes", progress: Callable[[int], None] | None = None) -> ChoiceResult:
    """Score every option of every item; the prediction is the highest log-likelihood (and, for
    accuracy_norm, the highest per `normalize` unit)."""
    correct = correct_norm = 0
    rows = []
    for k, item in enumerate(items):
        pairs = [split_continuation(tokenizer, item.context, c) for c in item.choices]
        for j, (context, option) in enumerate(pairs):  # a context cut to fit would be scored silently wrong
            check_fits(len(context), len(option), scorer.max_len, what=f"item {k + 1}: the context of option {j + 1}")
        scores = scorer.score(pairs)
        raw = [s.log_likelihood for s in scores]
        norm = [normalised(s, c, normalize) for s, c in zip(scores, item.choices)]
        pred, pred_norm = raw.index(max(raw)), norm.index(max(norm))
        correct += pred == item.answer
        correct_norm += pred_norm == item.answer
        rows.append({"answer": item.answer, "prediction": pred, "prediction_norm": pred_norm, "log_likelihoods": raw,
                     "stderr": [s.stderr for s in scores], "exact": [s.exact for s in scores]})
        if progress is not None:
            progress(1)
    return ChoiceResult(len(items), correct, correct_norm, normalize, rows)
