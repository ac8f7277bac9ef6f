"""The reversal curse, side by side: a masked diffusion model and its AR twin (same size, data,
token count and recipe) pretrained on poems and facts, fine-tuned on forward and backward questions
about part of them, and tested on the rest, which they saw in pretraining only.

    python benchmarks/reversal.py [--poems FILE] [--holdout PAIRS.jsonl] [--parts train eval ablations]

- pretraining data: `--poem-count` poems of the fortune-format `--poems` file (default: the 300
  Tang poems), `--fact-count` country -> capital facts, one sentence each (country first), and
  the file's `--long-poems` longest poems `--long-repeat` times (for benchmarks/sampling.py's
  memorised continuations; never in the reversal sets); `--restatements` more renderings of each
  poem (its couplets reordered) and fact (other words), every pair still first half first; the
  SFT documents' pairs stated both ways ("mixed training", `--statements plain|qa|none`); the corpus
  cut at a new offset every epoch (`--packing shift`); the twins trained side by side (`--jobs 2`);
- SFT: `X的下一句是什么？` / `X的上一句是什么？` (and "What is the capital of X?" / "Which country has the
  capital Y?") for the pairs of the SFT documents, both directions;
- test: the pairs of the held-out documents (or `--holdout` pairs: their poems are held out),
  both directions; an answer counts when it contains the gold half-line (exact match too);
  also the base models completing plain text, no SFT: the diffusion model infilling the couplet
  (`X，[M]*n。` / `[M]*n，Y。`; for a fact, its own sentence), the AR twin continuing it (forwards
  only), and both completing the pair's statement (`X的下一句是` / `Y的上一句是`, for the test pairs
  never stated in pretraining); the diffusion model reads each probe in a window of masks of its
  pretraining length (`--probe-window`), as it never read a shorter sequence;
  the same measures on as many pairs of the SFT poems, for contrast;
- ablations (`--parts ablations`): forward/backward accuracy of the SFT'd diffusion model against
  sampling steps, remasking, block length, guidance scale and answer length; of the base diffusion
  model's infilling against steps, remasking and the probe's window.

Models are kept under `--out` (default runs/reversal/) and reused when their recipe, data and base
weights are unchanged (the timing then reports the seconds they took to train),
with the corpus, the SFT dialogues and the test pairs (test_pairs.jsonl, in `--holdout`'s format).
Writes benchmarks/results/reversal.json (and reversal_ablations.json + PNGs with --parts ablations).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from _common import RESULTS_DIR, write_result

from remask.atomic import write_text
from remask.data.corpora import tang300_poems
from remask.data.facts import capitals
from remask.eval.reversal import (
    DIRECTIONS,
    QUESTIONS,
    ReversalSet,
    answer_questions,
    capital_set,
    load_holdout,
    poem_set,
    probe_answers,
    probes,
    question,
    restatements,
    score_answers,
    sft_dialogues,
    split,
    statement_documents,
    write_jsonl,
)
from remask.pipeline import Pipeline
from remask.sampling import SamplerConfig
from remask.train.config import (
    CorpusData,
    DialogueData,
    ModelSection,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    SFTConfig,
)
from remask.train.pretrain import pretrain
from remask.train.sft import sft

OBJECTIVES = ("mdm", "ar")


def longest_poems(all_poems, count: int) -> list[int]:
    """Indices of the `count` longest poems: extra pretraining text that the sampling benchmark asks
    the models to continue from memory (benchmarks/sampling.py); never in the reversal sets."""
    return sorted(range(len(all_poems)), key=lambda i: (-len(all_poems[i].text()), i))[:count]


def choose_poems(all_poems, count: int, seed: int, holdout: list[tuple[str, str]] | None, exclude=()):
    """`count` poems with couplets (a seeded choice), always including those that hold `holdout` pairs,
    never those in `exclude`."""
    data = poem_set(all_poems)
    with_pairs = sorted(set(data.by_source()) - set(exclude))
    needed = set()
    if holdout is not None:
        index = {(p.first, p.second): p.source for p in data.pairs}
        needed = {index[pair] for pair in holdout if pair in index}
    rest = [i for i in with_pairs if i not in needed]
    chosen = sorted(needed | set(random.Random(seed).sample(rest, max(0, min(count, len(with_pairs)) - len(needed)))))
    return [all_poems[i] for i in chosen], data.stats


def corpus_text(sets: list[ReversalSet], extra: list[str] = ()) -> str:
    """Fortune format: every document one entry, then `extra` documents; a last entry holds the
    question templates' words (no pair in it) so the character tokenizer knows them."""
    template_words = " ".join(t.format(x="") for kinds in QUESTIONS.values() for t in kinds.values())
    docs = [d for s in sets for d in s.documents] + list(extra) + [template_words]
    return "\n%\n".join(docs) + "\n"


def recipe(args, objective: str, corpus: Path, out: Path) -> PretrainConfig:
    return PretrainConfig(
        objective=objective, t_sampling=args.t_sampling,
        model=ModelSection(preset=args.preset, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                           mlp_hidden_size=args.mlp_hidden_size),
        data=CorpusData(source=str(corpus), tokenizer="char", seq_len=args.seq_len, val_fraction=0.05,
                        short_batch_prob=0.0, packing=args.packing),
        optim=OptimConfig(lr=args.lr, batch_size=args.batch_size, max_steps=args.pretrain_steps, warmup_steps=100,
                          decay_fraction=args.decay_fraction, weight_decay=0.0),
        run=RunConfig(out=out, seed=args.seed, save_every=max(1, args.pretrain_steps // 4), val_every=10**6,
                      log_every=50, progress=args.progress, resume=True))


def sft_recipe(args, objective: str, base: Path, data: Path, out: Path) -> SFTConfig:
    return SFTConfig(
        model=base, objective=objective, t_sampling=args.t_sampling, data=DialogueData(source=data, seq_len=96, val_fraction=0.05),
        optim=OptimConfig(lr=args.sft_lr, batch_size=args.sft_batch_size, max_steps=args.sft_steps,
                          warmup_steps=min(50, max(1, args.sft_steps // 10)),
                          decay_fraction=0.3, weight_decay=0.0),
        run=RunConfig(out=out, seed=args.seed, save_every=max(1, args.sft_steps // 2), val_every=10**6, log_every=50,
                      progress=args.progress, resume=True))


def train_once(run: Path, config, workflow, inputs: list[Path]) -> tuple[Path, float]:
    """Train unless run/final exists from the same recipe (compared as config.yaml) and the same
    `inputs` files (data, base weights: compared by SHA-256, kept in run/benchmark.json); (final model, training
    seconds), those of a reused model being what it took when trained, so that the benchmark's
    timing is its cost from scratch."""
    import hashlib

    import yaml

    wanted = config.to_dict()
    digest = hashlib.sha256(b"".join(hashlib.sha256(f.read_bytes()).digest() for f in inputs)).hexdigest()
    saved, record = run / "config.yaml", run / "benchmark.json"
    if ((run / "final").is_dir() and saved.is_file() and record.is_file()
            and yaml.safe_load(saved.read_text()) == json.loads(json.dumps(wanted))
            and json.loads(record.read_text()).get("inputs_sha256") == digest):
        print(f"reusing {run / 'final'}", file=sys.stderr)
        return run / "final", json.loads(record.read_text())["train_s"]
    if run.exists():
        from remask.atomic import remove_dir

        remove_dir(run)
    t0 = time.perf_counter()
    final = workflow(config)
    took = time.perf_counter() - t0
    write_text(record, json.dumps({"train_s": took, "inputs_sha256": digest}) + "\n")
    return final, took


def train_objective(args, objective: str, corpus: Path, sft_data: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """Pretrain, then fine-tune, one of the twins (with a share of the cores when run beside the other)."""
    import os

    import torch

    if args.jobs > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
        args.progress = False
    base, pretrain_s = train_once(args.out / objective, recipe(args, objective, corpus, args.out / objective), pretrain,
                                  [corpus])
    tuned, sft_s = train_once(args.out / f"{objective}-sft", sft_recipe(args, objective, base, sft_data,
                                                                         args.out / f"{objective}-sft"), sft,
                          [sft_data, base / "model.safetensors"])
    return ({objective: base, f"{objective}-sft": tuned},
            {f"{objective}_pretrain_s": pretrain_s, f"{objective}_sft_s": sft_s})


def sampler_for(kind: str, args, **changes) -> SamplerConfig:
    length = args.poem_answer_length if kind == "poem" else args.fact_answer_length
    base = SamplerConfig(gen_length=length, steps=length, block_length=None, temperature=0.0,
                         remasking="low_confidence")
    return base.replace(**changes)


def evaluate_qa(model_dir: Path, data: ReversalSet, pairs, sampler: SamplerConfig, max_new_tokens: int) -> dict:
    pipe = Pipeline.load(model_dir)
    out = {}
    for direction in DIRECTIONS:
        questions, golds = zip(*(question(data.kind, direction, p) for p in pairs))
        answers = answer_questions(pipe, list(questions), sampler=sampler, max_new_tokens=max_new_tokens)
        scored = score_answers(answers, list(golds))
        out[direction], out[f"{direction}_exact"], out["n"] = scored["accuracy"], scored["exact"], scored["n"]
        out[f"{direction}_examples"] = [{"question": q, "gold": g, "answer": a}
                                        for q, g, a in list(zip(questions, golds, answers))[:5]]
    return out


def evaluate_plain(model_dir: Path, kind: str, pairs, sampler: SamplerConfig, style: str, window: int,
                   only: tuple[str, ...] | None = None) -> dict:
    """A base model (no SFT) completing each of the kind's plain-text probes (`probes`: the pair as
    pretraining reads it, and the statement in pretraining's style; those named in `only`) in both
    directions, the diffusion model in a `window` of masks (0: none); None where the probe cannot
    be put to it (the AR twin, the unknown half first)."""
    pipe = Pipeline.load(model_dir)
    out = {}
    for probe, templates in probes(kind, style).items():
        if only is not None and probe not in only:
            continue
        row = {}
        for direction in DIRECTIONS:
            answers = probe_answers(pipe, pairs, direction, template=templates[direction], sampler=sampler,
                                    window=window)
            scored = score_answers(answers, [p.halves(direction)[1] for p in pairs])
            row[direction], row[f"{direction}_exact"] = scored["accuracy"], scored["exact"]
        out[probe] = row | {"n": len(pairs), "text": templates, "window": None if pipe.model.config.causal else window}
    return out


def ablations(args, models: dict, poems: ReversalSet, test) -> dict:
    """Test-pair accuracy against one sampler setting at a time: the SFT'd diffusion model asked the
    questions ("qa": steps, remasking, block length, guidance scale, answer length), and the base
    diffusion model's plain infilling ("infill": steps per masked position, remasking, and the
    window of masks it reads the couplet in; blocks, guidance and answer length do not apply to a
    fixed span)."""
    base = sampler_for("poem", args)
    L, W = base.gen_length, args.probe_window
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
                    r = evaluate_qa(models["mdm-sft"], poems, test, s, args.poem_answer_length)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--poems", default=None, help="fortune-format poem file (default: the shipped Tang poems)")
    ap.add_argument("--holdout", default=None, help='JSONL of {"first", "second"} pairs to test on')
    ap.add_argument("--out", type=Path, default=Path("runs/reversal"))
    ap.add_argument("--parts", nargs="+", default=["train", "eval"], choices=["train", "eval", "ablations"])
    ap.add_argument("--poem-count", type=int, default=20)
    ap.add_argument("--test-fraction", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--n-layers", type=int, default=None)
    ap.add_argument("--n-heads", type=int, default=None)
    ap.add_argument("--mlp-hidden-size", type=int, default=None)
    ap.add_argument("--long-poems", type=int, default=2,
                    help="the longest poems of the file, added to pretraining for benchmarks/sampling.py")
    ap.add_argument("--long-repeat", type=int, default=1, help="copies of each long poem in the corpus")
    ap.add_argument("--fact-count", type=int, default=40, help="capital facts to use (a seeded choice; 0: all)")
    ap.add_argument("--restatements", type=int, default=2,
                    help="further renderings of each poem (couplets reordered) and fact (other words) in pretraining")
    ap.add_argument("--statements", choices=["qa", "plain", "none"], default="plain",
                    help="the SFT documents' pairs stated both ways in pretraining too, never the test documents' "
                         "(qa: each question followed by its answer, as plain text; plain: X的下一句是Y。)")
    ap.add_argument("--decay-fraction", type=float, default=0.3, help="pretraining's final learning-rate decay share")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--probe-window", type=int, default=None,
                    help="the diffusion model's plain-text probes read the text followed by masks up to this many "
                         "tokens, never revealed (default: --seq-len, the length it was pretrained on; 0: none)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--packing", choices=["concat", "shift", "pad"], default="shift",
                    help="how pretraining cuts the corpus (shift: at a new offset every epoch, so that the models "
                         "learn the lines apart from the chunk they fell in)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pretrain-steps", type=int, default=3600)
    ap.add_argument("--sft-lr", type=float, default=5e-4)
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--sft-batch-size", type=int, default=16)
    ap.add_argument("--poem-answer-length", type=int, default=16)
    ap.add_argument("--fact-answer-length", type=int, default=32)
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--jobs", type=int, default=2, help="train the two twins side by side in this many processes")
    ap.add_argument("--t-sampling", choices=["uniform", "stratified"], default="stratified",
                    help="the diffusion model's training times (stratified: lower-variance, still unbiased)")
    args = ap.parse_args()
    args.probe_window = args.seq_len if args.probe_window is None else args.probe_window
    if args.probe_window < 0:
        ap.error("--probe-window must be 0 or more")
    started = time.perf_counter()
    timings = {}

    from remask.data.corpora import decode_text, parse_fortune_poems

    all_poems = tang300_poems() if args.poems is None else parse_fortune_poems(decode_text(Path(args.poems)))
    holdout = load_holdout(args.holdout) if args.holdout else None
    long = longest_poems(all_poems, args.long_poems)
    chosen, file_stats = choose_poems(all_poems, args.poem_count, args.seed, holdout, exclude=long)
    fact_pairs = capitals()
    if args.fact_count:
        fact_pairs = sorted(random.Random(args.seed).sample(fact_pairs, min(args.fact_count, len(fact_pairs))))
    poems, facts = poem_set(chosen), capital_set(fact_pairs)
    poem_sft, poem_test = split(poems, test_fraction=args.test_fraction, seed=args.seed, holdout=holdout)
    fact_sft, fact_test = split(facts, test_fraction=args.test_fraction, seed=args.seed)
    print(f"poem file: {file_stats['poems']} poems, {file_stats['couplets']} couplets kept; using "
          f"{poems.stats['poems']} poems ({poems.stats['couplets']} couplets): {len(poem_test)} test couplets; "
          f"{len(facts.pairs)} capital facts: {len(fact_test)} test", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    extra = [all_poems[i].text() for i in long] * args.long_repeat
    for data, sources in ((poems, poem_sft), (facts, fact_sft)):
        extra += restatements(data, args.restatements, args.seed)
        if args.statements != "none":
            extra += statement_documents(data, sources, args.statements)
    corpus = write_text(args.out / "corpus.txt", corpus_text([poems, facts], extra))
    sft_data = write_jsonl(args.out / "sft.jsonl", sft_dialogues(poems, poem_sft) + sft_dialogues(facts, fact_sft))
    write_jsonl(args.out / "test_pairs.jsonl", [{"first": p.first, "second": p.second} for p in poem_test])
    sft_halves = {h for p in poems.pairs if p.source in poem_sft for h in (p.first, p.second)}
    assert not sft_halves & {h for p in poem_test for h in (p.first, p.second)}  # no test couplet reaches SFT

    models = {}
    jobs = [(args, objective, corpus, sft_data) for objective in OBJECTIVES]
    training_started = time.perf_counter()
    if args.jobs > 1:  # one process per model, the cores shared out (more tokens/s in all than one at a time)
        import multiprocessing
        import signal

        # a terminated benchmark takes its workers with it (leaving the pool terminates them)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            done = pool.starmap(train_objective, jobs)
    else:
        done = [train_objective(*job) for job in jobs]
    for found, times in done:
        models |= found
        timings |= times
    # the run's cost from scratch counts training as long as it took when done (reused models keep
    # their seconds) in place of this run's training wall time
    per_twin = [timings[f"{o}_pretrain_s"] + timings[f"{o}_sft_s"] for o in OBJECTIVES]
    training_wall_s = time.perf_counter() - training_started
    training_s = max(per_twin) if args.jobs > 1 else sum(per_twin)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {
        "poem_stats": poems.stats, "poem_file_stats": file_stats, "fact_stats": facts.stats,
        "pretrain_recipe": recipe(args, "mdm", corpus, args.out / "mdm").to_dict(),
        "sft_recipe": sft_recipe(args, "mdm", models["mdm"], sft_data, args.out / "mdm-sft").to_dict(),
        "sampler_poem": sampler_for("poem", args).to_dict(), "sampler_fact": sampler_for("fact", args).to_dict(),
        "questions": QUESTIONS}
    if "eval" in args.parts:
        t0 = time.perf_counter()
        results = {}
        for objective in OBJECTIVES:
            results[objective] = evaluate_qa(models[f"{objective}-sft"], poems, poem_test, sampler_for("poem", args),
                                             args.poem_answer_length)
        style = "qa" if args.statements == "qa" else "plain"  # the probes ask in the statements' form
        plain = {kind: {o: evaluate_plain(models[o], kind, pairs, sampler_for(kind, args), style, args.probe_window)
                        for o in OBJECTIVES}
                 for kind, pairs in (("poem", poem_test), ("capital", fact_test))}
        results["plain"] = plain
        # the same measures on pairs of the SFT poems, which pretraining states both ways and SFT asks
        # about: what each model does with pairs it has read backwards, beside the test pairs it has not
        sft_pairs = [p for p in poems.pairs if p.source in poem_sft]
        seen = random.Random(args.seed).sample(sft_pairs, min(len(poem_test), len(sft_pairs)))
        results["sft_pairs"] = {
            "qa": {o: evaluate_qa(models[f"{o}-sft"], poems, seen, sampler_for("poem", args), args.poem_answer_length)
                   for o in OBJECTIVES},
            "plain": {o: evaluate_plain(models[o], "poem", seen, sampler_for("poem", args), style, args.probe_window)
                      for o in OBJECTIVES}}
        results["mdm_infill"] = {k: v for k, v in plain["poem"]["mdm"]["couplet"].items() if k != "text"}
        results["capitals"] = {o: evaluate_qa(models[f"{o}-sft"], facts, fact_test, sampler_for("fact", args),
                                              args.fact_answer_length) for o in OBJECTIVES}
        timings["eval_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - started - training_wall_s + training_s
        results["timing"] = timings
        results["models"] = {k: str(v) for k, v in models.items()}
        write_result("reversal", settings, results)
    if "ablations" in args.parts:
        table = ablations(args, models, poems, poem_test)
        plot_ablations(table, RESULTS_DIR / "reversal_ablations.png")
        write_result("reversal_ablations", settings | {"plot": "benchmarks/results/reversal_ablations.png"}, table)


if __name__ == "__main__":
    main()
