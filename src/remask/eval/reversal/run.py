"""Asking a model about pairs: questions through the chat template (a model after SFT), and plain
text with the unknown half left out (a base model: the diffusion model infills it, the AR twin
continues the text before it); and `evaluate`, the whole evaluation of model directories on a
pairs file, as `remask eval reversal` reports it.

Every question and probe has its own random generator, seeded from (seed, its index), as the fast
engine gives each row its own: a sampled answer does not depend on the others in its batch, so
`batch_size` changes the speed, never the answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from remask.config import SEED_LIMIT
from remask.errors import RemaskError
from remask.eval.reversal.data import (
    DIRECTIONS,
    DOCUMENT_PROBES,
    Direction,
    Kind,
    Pair,
    Probe,
    Question,
    StatementStyle,
    load_holdout,
    make_probes,
    question,
    statements,
)
from remask.eval.reversal.score import record_direction
from remask.pipeline import Pipeline, check_seed
from remask.sampling import SamplerConfig

Mode = Literal["qa", "infill", "statement"]


def item_seed(seed: int, index: int) -> int:
    """The seed of the index-th question (or probe) of a run seeded with `seed`."""
    return (seed + index) % SEED_LIMIT


def sample(pipe: Pipeline, prompts: list[list[int]], sampler: SamplerConfig, seeds: Sequence[int]) -> list[str]:
    """Each prompt's answer text, prompt i sampled with its own generator seeded `seeds[i]`."""
    return [g.text for g in pipe.sample(prompts, sampler, seeds)]


def answer_questions(pipe: Pipeline, questions: Sequence[Question], *, sampler: SamplerConfig, seed: int = 0,
                     batch_size: int = 32, progress: Callable[[int], None] | None = None) -> list[str]:
    """Each question as one chat turn, `batch_size` at a time; the diffusion model answers with the
    sampler, the AR twin by decoding left to right (greedy unless sampler.temperature > 0). Answers
    end at the model's end-of-turn. Question i is sampled with seed `item_seed(seed, i)`.
    RemaskError, naming the pair, where a question and its answer do not fit the model's context."""
    if batch_size < 1:
        raise RemaskError(f"the batch size must be 1 or more, got {batch_size}")
    prompts = [pipe.encode_prompt([{"role": "user", "content": q.text}]) for q in questions]
    for q, ids in zip(questions, prompts):
        pipe.check_context(len(ids), sampler.gen_length, what=f"the {q.direction} question about the pair {q.pair}")
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = range(start, min(start + batch_size, len(prompts)))
        out += sample(pipe, [prompts[i] for i in chunk], sampler, [item_seed(seed, i) for i in chunk])
        if progress is not None:
            progress(len(chunk))
    return out


def probe_steps(sampler: SamplerConfig, n: int) -> int:
    """Steps for n masks at the sampler's rate of steps per answer position."""
    return max(1, min(n, round(n * sampler.steps / sampler.gen_length)))


def _continue(pipe: Pipeline, probes: list[Probe], temperature: float, seed: int, batch_size: int) -> list[str | None]:
    """The AR twin's probes: n tokens after the text before the unknown half; None where the known
    half does not come first."""
    out: list[str | None] = [None] * len(probes)
    ask = [i for i, p in enumerate(probes) if p.known_first]
    for i in ask:
        pipe.check_context(len(probes[i].before), probes[i].n, what=f"the {probes[i].direction} probe of the pair "
                                                                    f"{probes[i].pair}")
    for start in range(0, len(ask), batch_size):
        chunk = ask[start:start + batch_size]
        rows = pipe.decode([probes[i].before for i in chunk], max(probes[i].n for i in chunk), temperature=temperature,
                           seeds=[item_seed(seed, i) for i in chunk], stop=False)
        for i, row in zip(chunk, rows):
            out[i] = pipe.tokenizer.decode(row[:probes[i].n])
    return out


def _infill(pipe: Pipeline, probe: Probe, sampler: SamplerConfig, seed: int, window: int | None) -> str:
    """The diffusion model's probe: the n masks of the unknown half revealed by the sampler's rules
    at its steps per answer position, masks up to `window` after the text never revealed; a cache
    or a parallel rule fills through the fast engine, otherwise the reference `fill_masks`. A block
    model reads the text from a block boundary (`Pipeline.block_offset`): a pair of up to
    block_length tokens lies inside one block, where it sees both halves; a longer one spans
    blocks, and a half in a later block is hidden from the masks before it."""
    tok, offset = pipe.tokenizer, pipe.block_offset()
    ids, region = probe.masked(tok.mask_id, window)
    pipe.check_context(offset + len(ids) - probe.n, probe.n, what=f"the {probe.direction} probe of the pair {probe.pair}")
    fill = sampler.replace(steps=probe_steps(sampler, probe.n), gen_length=probe.n, block_length=None)
    return tok.decode(pipe.infill(ids, region, fill, seed=seed, offset=offset))


def probe_answers(pipe: Pipeline, pairs: Sequence[Pair], direction: Direction, *, template: str,
                  sampler: SamplerConfig, seed: int = 0, batch_size: int = 32,
                  window: int | None = None) -> list[str | None]:
    """A base model (no SFT) completing plain text: `template` with the unknown half left out, after
    the BOS token (`make_probes`). The diffusion model fills n masks in its place (n the gold half's
    token count, at sampler.steps / sampler.gen_length steps per mask, one each by default); with
    `window`, the text is followed by masks up to `window` tokens, never revealed: the text after
    it, unknown, so the model reads a sequence of the length it was trained on (a bidirectional
    model trained on full windows only reads a short one poorly). The AR twin decodes n tokens after
    the text before it, `batch_size` probes at a time (greedy, or sampled at sampler.temperature),
    so the answer is None where the known half does not come first: a left-to-right model cannot
    read what follows its answer. Probe i is sampled with seed `item_seed(seed, i)`."""
    if batch_size < 1:
        raise RemaskError(f"the batch size must be 1 or more, got {batch_size}")
    probes = make_probes(pipe.tokenizer, pairs, direction, template)
    if pipe.causal:
        return _continue(pipe, probes, sampler.temperature, seed, batch_size)
    return [_infill(pipe, p, sampler, item_seed(seed, i), window) for i, p in enumerate(probes)]


def infill_answers(pipe: Pipeline, pairs: Sequence[Pair], direction: Direction, *, sampler: SamplerConfig,
                   seed: int = 0, window: int | None = None, kind: Kind = "poem") -> list[str]:
    """The base diffusion model without SFT fills the unknown half of the pair as pretraining reads
    it: `X，[M]*n。` (forward) or `[M]*n，Y。` (backward) for a poem, the fact's own sentence for a
    capital; n the gold half's length, after the BOS token (and in a `window` of masks:
    `probe_answers`); the masks are revealed by the sampler's rules."""
    if pipe.causal:
        raise RemaskError("infilling needs a diffusion model; an AR twin continues text (probe_answers)")
    return probe_answers(pipe, pairs, direction, template=DOCUMENT_PROBES[kind][1], sampler=sampler, seed=seed,
                         window=window)


def answers(pipe: Pipeline, pairs: Sequence[Pair], direction: Direction, *, mode: Mode, kind: Kind,
            sampler: SamplerConfig, statement_style: StatementStyle = "plain", window: int | None = None,
            seed: int = 0, batch_size: int = 32) -> list[str | None]:
    """One model's answers about `pairs` in `direction`, in `mode` (see `evaluate`)."""
    if mode == "infill":
        return infill_answers(pipe, pairs, direction, sampler=sampler, seed=seed, window=window, kind=kind)
    if mode == "statement":
        return probe_answers(pipe, pairs, direction, template=statements(kind, statement_style)[direction],
                             sampler=sampler, seed=seed, batch_size=batch_size, window=window)
    return answer_questions(pipe, [question(kind, direction, p) for p in pairs], sampler=sampler, seed=seed,
                            batch_size=batch_size)


def evaluate(models: Sequence[str | Path], test: str | Path, *, sampler: SamplerConfig, kind: Kind = "poem",
             mode: Mode = "qa", statement_style: StatementStyle = "plain", window: int | None = None, seed: int = 0,
             batch_size: int = 32, device: str = "cpu") -> dict:
    """Reversal-curse accuracy of model directories on the pairs of `test` (JSONL of {"first",
    "second"}), both directions: {"test", "kind", "mode", "sampler", "models": {dir: {"kind",
    ["window",] "answers": {direction: [...]}, "forward", "forward_exact", "backward",
    "backward_exact", "n"}}}. mode qa: the questions through the chat template; infill: a base
    diffusion model fills the unknown half of the pair as pretraining reads it; statement: a base
    model completes the pair's statement (`statements(kind, statement_style)`). A diffusion
    model's plain text is read in a window of `window` tokens (None: the length its training note
    records; 0: none). RemaskError on bad input, naming it."""
    from remask.checkpoint.model_dir import trained_seq_len

    check_seed(seed)
    if not models:
        raise RemaskError("give at least one --model DIR")
    if window is not None and window < 0:
        raise RemaskError(f"--window must be 0 or more, got {window}")
    if batch_size < 1:
        raise RemaskError(f"--batch-size must be 1 or more, got {batch_size}")
    pairs = load_holdout(test)
    report: dict = {"test": str(test), "kind": kind, "mode": mode, "sampler": sampler.to_dict(), "models": {}}
    for directory in models:
        pipe = Pipeline.load(directory, device=device)
        if mode == "infill" and pipe.causal:
            raise RemaskError(f"{directory} is an AR twin: infilling needs a diffusion model (use --mode qa)")
        row: dict = {"kind": {"causal": "autoregressive", "block": "block diffusion"}.get(pipe.model.config.attention, "diffusion")}
        if mode != "qa" and not pipe.causal:
            row["window"] = trained_seq_len(directory) if window is None else window
            if (row["window"] or 0) + pipe.block_offset() > pipe.context:
                raise RemaskError(f"--window {row['window']} exceeds {directory}'s context of {pipe.context} tokens"
                                  + (f" (less the block offset {pipe.block_offset()})" if pipe.block_offset() else ""))
            if pipe.block_offset():
                row["block_offset"] = pipe.block_offset()
        for direction in DIRECTIONS:
            said = answers(pipe, pairs, direction, mode=mode, kind=kind, sampler=sampler, seed=seed,
                           statement_style=statement_style, window=row.get("window"), batch_size=batch_size)
            row.setdefault("answers", {})[direction] = said
            record_direction(row, direction, said, [p.halves(direction)[1] for p in pairs])
        report["models"][str(directory)] = row
    return report
