"""The reversal curse, side by side: a masked diffusion model and its AR twin (same size, data,
token count and recipe) pretrained on poems and facts, fine-tuned on forward and backward questions
about part of them, and tested on the rest, which they saw in pretraining only; with them a third
twin between the two, the diffusion twin converted to a block diffusion model (`block_twin`
positions per block, `block_steps` steps of BD3-LM's objective on the same corpus) and fine-tuned
with the block objective, whose plain probes read from a block boundary (a couplet of up to
`block_twin` tokens inside one block).

    python benchmarks/reversal.py [--recipe recipes/reversal.yaml] [--poems FILE] [--holdout PAIRS.jsonl]
        [--parts data train eval ablations] [--out DIR] [--set pretrain.optim.max_steps=100 benchmark.poem_count=8 ...]

The recipe (recipes/reversal.yaml) holds the twins' pretraining and SFT configs and the benchmark's
own options; the flags and `--set` (dotted KEY=VALUE overrides) change it.
- pretraining data: `poem_count` poems of the fortune-format `poems` file (default: the 300 Tang
  poems), `fact_count` country -> capital facts, one sentence each (country first), and the file's
  `long_poems` longest poems `long_repeat` times (for benchmarks/sampling.py's memorised
  continuations; never in the reversal sets); `restatements` more renderings of each poem (its
  couplets reordered) and fact (other words), every pair still first half first; the SFT
  documents' pairs stated both ways ("mixed training", `statements`); the twins trained side by
  side (`jobs`);
- SFT: `X的下一句是什么？` / `X的上一句是什么？` (and "What is the capital of X?" / "Which country has the
  capital Y?") for the pairs of the SFT documents, both directions;
- test: the pairs of the held-out documents (or the `holdout` pairs: any pair whose halves are the
  two parts of a sentence of a poem split at its comma, of any lengths, as in the paper's released
  set; their poems are held out, and a pair not found is named in the one error), both directions;
  an answer counts when it contains the gold half-line (exact match too); also
  the base models completing plain text, no SFT: the diffusion model infilling the couplet
  (`X，[M]*n。` / `[M]*n，Y。`; for a fact, its own sentence), the AR twin continuing it (forwards
  only), and both completing the pair's statement (`X的下一句是` / `Y的上一句是`); the diffusion model
  reads each probe in a window of masks of its pretraining length (`probe_window`); the same
  measures on as many pairs of the SFT poems, for contrast;
- ablations (`--parts ablations`): forward/backward accuracy of the SFT'd diffusion model against
  sampling steps, remasking, block length, guidance scale and answer length; of the base diffusion
  model's infilling against steps, remasking and the probe's window.

Models are kept under `out` (default runs/reversal/) and reused when their recipe, data and base
weights are unchanged (the timing then reports the seconds they took to train; a run of another
recipe is trained anew, the old one kept beside it as NAME.previous), with the corpus,
the SFT dialogues and the test pairs (test_pairs.jsonl, in `--holdout`'s format); `--parts data`
writes those three and stops. Writes benchmarks/results/reversal.json (and reversal_ablations.json
+ PNG with --parts ablations). Bad input is one `error:` line and exit code 2.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from _common import REPO_ROOT, RESULTS_DIR, ArgumentParser, metrics_seconds, previous_results, run_main, write_result
from reversal_curve import curve, ordered, plot_curve, summary
from reversal_eval import ablations, evaluate_all, plot_ablations, sampler_for, sentence_answers
from reversal_train import (  # noqa: F401 (train_once: the tests')
    pretrain_config,
    sft_config,
    train_once,
    train_twins,
    twin_steps,
)

from remask.atomic import write_text
from remask.config import ConfigBase, setting
from remask.data.corpora import Poem, decode_text, parse_fortune_poems, tang300_poems
from remask.data.facts import capitals
from remask.errors import ConfigError
from remask.eval.reversal import (
    QUESTIONS,
    Pair,
    ReversalSet,
    capital_set,
    load_holdout,
    person_set,
    place,
    poem_set,
    restatements,
    sft_dialogues,
    split,
    statement_documents,
    write_jsonl,
)
from remask.train.config import PretrainConfig, SFTConfig, config_replace, load_recipe

PARTS = ("data", "train", "eval", "curve", "answers", "ablations")
RECIPE = REPO_ROOT / "recipes" / "reversal.yaml"


@dataclass(frozen=True)
class BenchmarkOptions(ConfigBase):
    """The benchmark's own options (recipes/reversal.yaml explains each)."""

    poems: Path | None = None
    holdout: Path | None = None
    out: Path = Path("runs/reversal")
    parts: list[str] = field(default_factory=lambda: ["train", "eval", "curve"])
    poem_count: int = setting(20, gt=0)
    test_fraction: float = setting(0.25, gt=0, lt=1)
    fact_count: int = setting(40, ge=0)
    person_count: int = setting(40, ge=0)
    long_poems: int = setting(2, ge=0)
    long_repeat: int = setting(1, ge=0)
    restatements: int = setting(2, ge=0)
    statements: Literal["plain", "qa", "none"] = "plain"
    probe_window: int | None = setting(None, ge=0)
    poem_answer_length: int = setting(16, gt=0)
    fact_answer_length: int = setting(40, gt=0)
    jobs: int = setting(2, gt=0)
    curve_every: int = setting(2700, gt=0)
    curve_sft_steps: int = setting(400, gt=0)
    mdm_steps_factor: float = setting(1.0, gt=0)
    ar_steps_factor: float = setting(1.0, gt=0)
    block_twin: int | None = setting(16, gt=0)
    block_steps: int = setting(1200, gt=0)

    def check(self) -> None:
        self.need(bool(self.parts) and set(self.parts) <= set(PARTS), "parts",
                  f"must be a non-empty list of {', '.join(PARTS)}, got {self.parts!r}")


@dataclass(frozen=True)
class ReversalRecipe(ConfigBase):
    """The whole benchmark: its options, and the twins' pretraining and SFT configs."""

    benchmark: BenchmarkOptions = field(default_factory=BenchmarkOptions)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    @property
    def probe_window(self) -> int:
        """The diffusion model's probe window: the option, else the pretraining length."""
        window = self.benchmark.probe_window
        return self.pretrain.data.seq_len if window is None else window


def load(path: Path, overrides: list[str] = (), **flags) -> ReversalRecipe:
    """The recipe at `path` with dotted `KEY=VALUE` overrides (values read as YAML), then the
    benchmark options given as flags (None: not given)."""
    recipe = load_recipe(path, ReversalRecipe)
    changes = {f"benchmark.{k}": v for k, v in flags.items() if v is not None}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"an override is KEY=VALUE (e.g. pretrain.optim.max_steps=100), got {item!r}")
        changes[key] = yaml.safe_load(value)
    for key, value in changes.items():  # one at a time, so that an error names its key
        try:
            recipe = config_replace(recipe, **{key: value})
        except ConfigError as e:
            raise ConfigError(f"{key} {e.detail}" if e.field else f"{key}: {e.detail}") from None
        except (TypeError, AttributeError):  # a dotted path into a field that is not a section
            raise ConfigError(f"{key}: no such setting (benchmark.*, pretrain.* and sft.* are)") from None
    return recipe


# --- the data -----------------------------------------------------------------------------------------


@dataclass
class Data:
    """What the twins are trained and tested on."""

    poems: ReversalSet
    facts: ReversalSet
    people: ReversalSet
    poem_sft: set[int]  # the documents SFT asks about
    fact_sft: set[int]
    person_sft: set[int]
    poem_test: list[Pair]
    fact_test: list[Pair]
    person_test: list[Pair]
    long: list[str]  # the long poems' texts, for benchmarks/sampling.py
    file_stats: dict

    def sets(self) -> list[tuple[ReversalSet, set[int]]]:
        """Each reversal set with the documents SFT asks about."""
        return [(self.poems, self.poem_sft), (self.facts, self.fact_sft), (self.people, self.person_sft)]

    def set(self, kind: str) -> ReversalSet:
        return {"poem": self.poems, "capital": self.facts, "person": self.people}[kind]

    def sft_pairs(self, kind: str) -> list[Pair]:
        """The pairs SFT asks about, of one kind."""
        found, sources = {s.kind: (s, src) for s, src in self.sets()}[kind]
        return [p for p in found.pairs if p.source in sources]

    def test(self, kind: str) -> list[Pair]:
        return {"poem": self.poem_test, "capital": self.fact_test, "person": self.person_test}[kind]


def longest_poems(all_poems: list[Poem], count: int, exclude=()) -> list[int]:
    """Indices of the `count` longest poems not in `exclude`: extra pretraining text that the sampling
    benchmark asks the models to continue from memory (benchmarks/sampling.py); never in the reversal sets."""
    rest = [i for i in range(len(all_poems)) if i not in set(exclude)]
    return sorted(rest, key=lambda i: (-len(all_poems[i].text()), i))[:count]


def choose_poems(all_poems: list[Poem], count: int, seed: int, holdout: list[Pair] | None, exclude=()):
    """`count` poems with couplets (a seeded choice), always including those that hold `holdout` pairs
    (placed: their sources index `all_poems`), never those in `exclude`."""
    data = poem_set(all_poems)
    with_pairs = sorted(set(data.by_source()) - set(exclude))
    needed = {p.source for p in holdout or ()}
    rest = [i for i in with_pairs if i not in needed]
    chosen = sorted(needed | set(random.Random(seed).sample(rest, max(0, min(count, len(with_pairs)) - len(needed)))))
    return [all_poems[i] for i in chosen], data.stats


def build_data(options: BenchmarkOptions, seed: int) -> Data:
    """The reversal sets, their split, and the long poems; RemaskError on a bad file or holdout (one
    error naming every pair that is not the two halves of a sentence of the poems)."""
    all_poems = tang300_poems() if options.poems is None else parse_fortune_poems(decode_text(options.poems))
    holdout = place(all_poems, load_holdout(options.holdout)) if options.holdout else None
    long = longest_poems(all_poems, options.long_poems, exclude={p.source for p in holdout or ()})
    chosen, file_stats = choose_poems(all_poems, options.poem_count, seed, holdout, exclude=long)
    fact_pairs = capitals()
    if options.fact_count:
        fact_pairs = sorted(random.Random(seed).sample(fact_pairs, min(options.fact_count, len(fact_pairs))))
    poems, facts = poem_set(chosen, holdout), capital_set(fact_pairs)
    people = person_set(count=options.person_count, seed=seed)
    poem_sft, poem_test = split(poems, test_fraction=options.test_fraction, seed=seed, holdout=holdout)
    fact_sft, fact_test = split(facts, test_fraction=options.test_fraction, seed=seed)
    person_sft, person_test = split(people, test_fraction=options.test_fraction, seed=seed)
    print(f"poem file: {file_stats['poems']} poems, {file_stats['couplets']} couplets kept; using "
          f"{poems.stats['poems']} poems ({poems.stats['couplets']} couplets): {len(poem_test)} test couplets; "
          f"{len(facts.pairs)} capital facts: {len(fact_test)} test; {len(people.pairs)} person facts: "
          f"{len(person_test)} test", file=sys.stderr)
    return Data(poems, facts, people, poem_sft, fact_sft, person_sft, poem_test, fact_test, person_test,
                [all_poems[i].text() for i in long], file_stats)


def corpus_text(sets: list[ReversalSet], extra: list[str] = ()) -> str:
    """Fortune format: every document one entry, then `extra` documents; a last entry holds the
    question templates' words (no pair in it) so the character tokenizer knows them."""
    template_words = " ".join(t.format(x="") for kinds in QUESTIONS.values() for t in kinds.values())
    docs = [d for s in sets for d in s.documents] + list(extra) + [template_words]
    return "\n%\n".join(docs) + "\n"


def write_data(options: BenchmarkOptions, data: Data, seed: int) -> tuple[Path, Path]:
    """The pretraining corpus, the SFT dialogues and the test pairs under `out`: (corpus, SFT data)."""
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    extra = data.long * options.long_repeat
    for found, sources in data.sets():
        extra += restatements(found, options.restatements, seed)
        if options.statements != "none":
            extra += statement_documents(found, sources, options.statements)
    corpus = write_text(out / "corpus.txt", corpus_text([found for found, _ in data.sets()], extra))
    for answers in ("half", "sentence"):  # sft.jsonl: the recipe's; sft_sentence.jsonl for --parts answers
        dialogues = [d for found, sources in data.sets() for d in sft_dialogues(found, sources, answers)]
        write_jsonl(out / ("sft.jsonl" if answers == "half" else "sft_sentence.jsonl"), dialogues)
    sft_data = out / "sft.jsonl"
    write_jsonl(out / "test_pairs.jsonl", [{"first": p.first, "second": p.second} for p in data.poem_test])
    sft_halves = {h for p in data.poems.pairs if p.source in data.poem_sft for h in (p.first, p.second)}
    assert not sft_halves & {h for p in data.poem_test for h in (p.first, p.second)}  # no test couplet reaches SFT
    return corpus, sft_data


# --- the run ------------------------------------------------------------------------------------------


def settings_of(recipe: ReversalRecipe, path: Path, overrides: list[str], data: Data) -> dict:
    """What reversal.json records of the run's settings."""
    shown = path.resolve().relative_to(REPO_ROOT) if path.resolve().is_relative_to(REPO_ROOT) else path  # no machine paths
    return {"recipe": str(shown), "overrides": list(overrides), "benchmark": recipe.benchmark.to_dict(),
            "probe_window": recipe.probe_window, "poem_stats": data.poems.stats, "poem_file_stats": data.file_stats,
            "fact_stats": data.facts.stats,
            "pretrain_recipe": pretrain_config(recipe, "mdm", recipe.benchmark.out / "corpus.txt").to_dict(),
            "person_stats": data.people.stats,
            "sft_recipe": sft_config(recipe, "mdm", recipe.benchmark.out / "mdm" / "final",
                                     recipe.benchmark.out / "sft.jsonl").to_dict(),
            "sampler_poem": sampler_for("poem", recipe.benchmark).to_dict(),
            "sampler_fact": sampler_for("fact", recipe.benchmark).to_dict(), "questions": QUESTIONS}


def run(path: Path, overrides: list[str], **flags) -> None:
    started = time.perf_counter()
    recipe = load(path, overrides, **flags)
    options, seed = recipe.benchmark, recipe.pretrain.run.seed
    data = build_data(options, seed)
    corpus, sft_data = write_data(options, data, seed)
    if set(options.parts) == {"data"}:
        print(f"wrote {corpus}, {sft_data} and {options.out / 'test_pairs.jsonl'}", file=sys.stderr)
        return
    results = previous_results("reversal") if "eval" not in options.parts else {}
    settings = settings_of(recipe, path, overrides, data)
    if {"train", "eval", "answers", "ablations"} & set(options.parts):
        models, timings = train_twins(recipe, corpus, sft_data)
    if "eval" in options.parts:
        t0 = time.perf_counter()
        results = evaluate_all(recipe, data, models)
        timings["eval_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - started - timings.pop("training_wall_s") + timings["training_s"]
        results["timing"] = {k: v for k, v in timings.items() if k != "training_s"}
        results["models"] = {k: str(v) for k, v in models.items()}
    if "curve" in options.parts:  # the checkpoints there are now (pretraining may still be running)
        points = curve(recipe, data, sft_data)
        budget = {"max_steps": {o: twin_steps(recipe, o) for o in ("mdm", "ar")}, "curve_every": options.curve_every,
                  "sft_steps": recipe.sft.optim.max_steps, "curve_sft_steps": options.curve_sft_steps,
                  "pretrain_s": {o: metrics_seconds(options.out / o) for o in ("mdm", "ar")}}
        results |= {"curve": ordered(points), "curve_summary": summary(points) | {"budget": budget},
                    "curve_plot": "benchmarks/results/reversal_curve.png"}
        plot_curve(points, RESULTS_DIR / "reversal_curve.png")
    if {"eval", "curve"} & set(options.parts):
        write_result("reversal", settings, results)
    if "answers" in options.parts:
        results["sentence_answers"] = sentence_answers(recipe, data, models)
        write_result("reversal", settings, results)
    if "ablations" in options.parts:
        table = ablations(recipe, models, data.poems, data.poem_test)
        plot_ablations(table, RESULTS_DIR / "reversal_ablations.png")
        write_result("reversal_ablations", settings | {"plot": "benchmarks/results/reversal_ablations.png"}, table)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=RECIPE, help="the benchmark's recipe (default: recipes/reversal.yaml)")
    ap.add_argument("--poems", default=None, help="fortune-format poem file (default: the shipped Tang poems)")
    ap.add_argument("--holdout", default=None, help='JSONL of {"first", "second"} pairs to test on')
    ap.add_argument("--out", default=None, help="where the data and models go (default: the recipe's, runs/reversal)")
    ap.add_argument("--parts", nargs="+", default=None, choices=PARTS, help="default: the recipe's (train eval)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="recipe changes by dotted path, values as YAML: --set pretrain.optim.max_steps=100")
    args = ap.parse_args(argv)
    run(args.recipe, args.overrides, poems=args.poems, holdout=args.holdout, out=args.out, parts=args.parts)
    return 0


if __name__ == "__main__":
    run_main(main)
