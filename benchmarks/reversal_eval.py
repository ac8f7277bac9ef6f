"""The reversal benchmark's evaluation (benchmarks/reversal.py trains the models): the SFT'd twins
asked the questions, the base twins completing plain text, and the ablations over sampler settings,
all through `remask.eval.reversal`."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from remask.eval.reversal import (
    DIRECTIONS,
    KINDS,
    Pair,
    ReversalSet,
    answer_questions,
    probe_answers,
    probes,
    question,
    record_direction,
)
from remask.pipeline import Pipeline
from remask.sampling import SamplerConfig

if TYPE_CHECKING:
    from reversal import BenchmarkOptions, Data, ReversalRecipe

OBJECTIVES = ("mdm", "ar")  # the twins trained from scratch, side by side


def twins(recipe: ReversalRecipe) -> tuple[str, ...]:
    """The twins the benchmark trains: the diffusion model, the AR twin, and the block model of
    benchmark.block_twin positions per block ("bd16"), when set."""
    block = recipe.benchmark.block_twin
    return OBJECTIVES + (() if block is None else (f"bd{block}",))


def objective_of(twin: str) -> tuple[str, int | None]:
    """A twin's training objective and block length: "bd16" is ("bd", 16)."""
    return ("bd", int(twin[2:])) if twin.startswith("bd") else (twin, None)


def sampler_for(kind: str, options: BenchmarkOptions, **changes) -> SamplerConfig:
    length = options.poem_answer_length if kind == "poem" else options.fact_answer_length
    return SamplerConfig(gen_length=length, steps=length, block_length=None, temperature=0.0,
                         remasking="low_confidence").replace(**changes)


def evaluate_qa(model_dir: Path, data: ReversalSet, pairs: list[Pair], sampler: SamplerConfig) -> dict:
    """The SFT'd model asked about `pairs` both ways: scores and five examples per direction."""
    pipe = Pipeline.load(model_dir)
    out: dict = {}
    for direction in DIRECTIONS:
        questions = [question(data.kind, direction, p) for p in pairs]
        answers = answer_questions(pipe, questions, sampler=sampler)
        record_direction(out, direction, answers, [q.gold for q in questions])
        out[f"{direction}_examples"] = [{"question": q.text, "gold": q.gold, "answer": a}
                                        for q, a in list(zip(questions, answers))[:5]]
    return out


def evaluate_plain(model_dir: Path, kind: str, pairs: list[Pair], sampler: SamplerConfig, style: str, window: int,
                   only: tuple[str, ...] | None = None) -> dict:
    """A base model (no SFT) completing each of the kind's plain-text probes (`probes`: the pair as
    pretraining reads it, and the statement in pretraining's style; those named in `only`) in both
    directions, the diffusion model in a `window` of masks (0: none); None where the probe cannot
    be put to it (the AR twin, the unknown half first); a block model reads each from a block
    boundary (`block_offset` in its row)."""
    pipe = Pipeline.load(model_dir)
    out = {}
    for probe, templates in probes(kind, style).items():
        if only is not None and probe not in only:
            continue
        row: dict = {}
        for direction in DIRECTIONS:
            answers = probe_answers(pipe, pairs, direction, template=templates[direction], sampler=sampler,
                                    window=window)
            record_direction(row, direction, answers, [p.halves(direction)[1] for p in pairs])
        out[probe] = row | {"n": len(pairs), "text": templates, "window": None if pipe.causal else window} | (
            {"block_offset": pipe.block_offset()} if pipe.block_offset() else {})
    return out


def evaluate_all(recipe: ReversalRecipe, data: Data, models: dict[str, Path]) -> dict:
    """reversal.json's results (INTERFACE.md): each twin (the block twin too, when trained) SFT'd
    and asked the test couplets, each base twin's plain-text probes on test couplets and facts, the
    same on as many SFT couplets, the capitals and people; a block twin reads each probe from a
    block boundary, so that a couplet of up to its block length lies inside one block."""
    options, window, names = recipe.benchmark, recipe.probe_window, twins(recipe)
    poem, fact = sampler_for("poem", options), sampler_for("fact", options)
    results: dict = {o: evaluate_qa(models[f"{o}-sft"], data.poems, data.poem_test, poem) for o in names}
    style = "qa" if options.statements == "qa" else "plain"  # the probes ask in the statements' form
    plain = {kind: {o: evaluate_plain(models[o], kind, data.test(kind), sampler_for(kind, options), style, window)
                    for o in names}
             for kind in KINDS}
    results["plain"] = plain
    # the same measures on pairs of the SFT poems, which pretraining states both ways and SFT asks
    # about: what each model does with pairs it has read backwards, beside the test pairs it has not
    sft_pairs = data.sft_pairs("poem")
    seen = random.Random(recipe.pretrain.run.seed).sample(sft_pairs, min(len(data.poem_test), len(sft_pairs)))
    results["sft_pairs"] = {"qa": {o: evaluate_qa(models[f"{o}-sft"], data.poems, seen, poem) for o in names},
                            "plain": {o: evaluate_plain(models[o], "poem", seen, poem, style, window) for o in names}}
    results["mdm_infill"] = {k: v for k, v in plain["poem"]["mdm"]["couplet"].items() if k != "text"}
    results["capitals"] = {o: evaluate_qa(models[f"{o}-sft"], data.facts, data.fact_test, fact) for o in names}
    results["people"] = {o: evaluate_qa(models[f"{o}-sft"], data.people, data.person_test, fact) for o in names}
    results["sft_fit"] = {o: sft_fit(models[f"{o}-sft"], data, options) for o in names}
    results["twins"] = {o: twin_info(recipe, o) for o in names}
    return results


def twin_info(recipe: ReversalRecipe, twin: str) -> dict:
    """What a twin is: its attention layout, block length, and where its pretraining began."""
    objective, block = objective_of(twin)
    layout = {"mdm": "full", "ar": "causal", "bd": "block"}[objective]
    start = (f"the diffusion twin's final model, converted for {recipe.benchmark.block_steps} steps"
             if objective == "bd" else "scratch")
    return {"attention": layout, "block_length": block, "pretrained_from": start}


def sft_fit(model_dir: Path, data: Data, options: BenchmarkOptions) -> dict:
    """The SFT'd twin asked every question it was fine-tuned on (both directions of every pair of
    the SFT documents, all kinds): pooled accuracy, and each kind's."""
    by_kind = {}
    for found, _ in data.sets():
        by_kind[found.kind] = evaluate_qa(model_dir, found, data.sft_pairs(found.kind), sampler_for(found.kind, options))
    out: dict = {"n": sum(r["n"] for r in by_kind.values())}
    for direction in DIRECTIONS:
        out[direction] = sum(r[direction] * r["n"] for r in by_kind.values()) / out["n"]
    return out | {"by_kind": {k: {d: r[d] for d in (*DIRECTIONS, "n")} for k, r in by_kind.items()}}


def ablations(recipe: ReversalRecipe, models: dict, poems: ReversalSet, test: list[Pair]) -> dict:
    """Test-pair accuracy against one sampler setting at a time: the SFT'd diffusion model asked the
    questions ("qa": steps, remasking, block length, guidance scale, answer length), and the base
    diffusion model's plain infilling ("infill": steps per masked position, remasking, and the
    window of masks it reads the couplet in; blocks, guidance and answer length do not apply to a
    fixed span)."""
    base = sampler_for("poem", recipe.benchmark)
    L, W = base.gen_length, recipe.probe_window
    steps = [base.replace(steps=s) for s in sorted({max(1, L // 4), max(1, L // 2), L})]
    remasking = [base.replace(remasking=r) for r in ("low_confidence", "random", "margin", "entropy")]
    # each axis: (value shown, sampler, window of the infilling)
    grids = {
        "qa": {
            "steps": [(s.steps, s, W) for s in steps],
            "remasking": [(s.remasking, s, W) for s in remasking],
            "block_length": [(b, base.replace(block_length=b, steps=L), W) for b in (2, 4, L // 2, L) if L % b == 0],
            "cfg_scale": [(w, base.replace(cfg_scale=w), W) for w in (0.0, 0.5, 1.0, 2.0)],
            "gen_length": [(g, base.replace(gen_length=g, steps=g), W) for g in (L, 2 * L, 4 * L)],
        },
        "infill": {
            "steps": [(f"{s.steps}/{L}", s, W) for s in steps],  # per masked position
            "remasking": [(s.remasking, s, W) for s in remasking],
            "window": [(w, base, w) for w in sorted({0, 32, 64, W})],
        },
    }
    out: dict = {}
    for group, grid in grids.items():
        for name, settings in grid.items():
            rows = []
            for value, s, window in settings:
                if group == "qa":
                    r = evaluate_qa(models["mdm-sft"], poems, test, s)
                else:
                    r = evaluate_plain(models["mdm"], "poem", test, s, "plain", window, only=("couplet",))["couplet"]
                rows.append({"value": value, "forward": r["forward"], "backward": r["backward"], "n": r["n"]})
            out.setdefault(group, {})[name] = rows
    return out


def plot_ablations(results: dict, path: Path) -> None:
    from remask.app.plot import pyplot, save_png

    plt = pyplot()
    width = max(len(grid) for grid in results.values())
    fig, axes = plt.subplots(len(results), width, figsize=(4 * width, 3.5 * len(results)), squeeze=False)
    for row, (group, grid) in zip(axes, results.items()):
        for ax in row[len(grid):]:
            ax.axis("off")
        for ax, (name, rows) in zip(row, grid.items()):
            labels = [str(r["value"]) for r in rows]
            x = range(len(rows))
            ax.plot(x, [r["forward"] for r in rows], "o-", label="forward")
            ax.plot(x, [r["backward"] for r in rows], "s-", label="backward")
            ax.set_xticks(list(x), labels, rotation=30 if name == "remasking" else 0)
            ax.set_title(f"{group}: {name}")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("accuracy (contains gold)")
        row[0].legend()
    save_png(fig, path, dpi=110)



def sentence_answers(recipe: ReversalRecipe, data: Data, models: dict[str, Path]) -> dict:
    """Each twin's final model fine-tuned on the same questions answered with the whole sentence
    ("X，Y。" either way round; a fact's own sentence: sft_sentence.jsonl), then asked the held-out
    questions and its own: an answer counts when it holds the gold half. The diffusion model can
    write the sentence around the half it is given; the AR twin must begin it with the unknown
    half when asked backwards."""
    from reversal_train import fine_tune, sft_config, train_once

    from remask.train.config import config_replace

    out = recipe.benchmark.out
    results: dict = {}
    for o in OBJECTIVES:
        base, sft_data = models[o], out / "sft_sentence.jsonl"
        config = config_replace(sft_config(recipe, o, base, sft_data), **{"run.out": out / f"{o}-sft-sentence"})
        tuned, seconds = train_once(config.run.out, config, fine_tune, [sft_data, base / "model.safetensors"])
        row: dict = {"sft_s": seconds}
        for found, _ in data.sets():
            sampler = sampler_for(found.kind, recipe.benchmark, gen_length=2 * sampler_for(found.kind, recipe.benchmark).gen_length)
            sampler = sampler.replace(steps=sampler.gen_length)
            row[found.kind] = {"question": evaluate_qa(tuned, found, data.test(found.kind), sampler),
                               "sft_fit": evaluate_qa(tuned, found, data.sft_pairs(found.kind), sampler)}
        results[o] = row
    return results
