"""The reversal benchmark's budget curve (`benchmarks/reversal.py --parts curve`): every kept
checkpoint of each twin's one long pretraining run is fine-tuned with the recipe's SFT and tested
with every probe, so held-out accuracy can be read against the pretraining budget in epochs.

Each point (twin, step) is fine-tuned and tested once: its SFT run lies under OUT/curve/, its
scores (with the SHA-256 of the checkpoint's weights) are added to OUT/curve/TWIN.jsonl as soon as
they are known, and a later run (after an interruption, while pretraining goes on, or once a run
has been lengthened) does only the points still missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from reversal_eval import OBJECTIVES, evaluate_plain, evaluate_qa, sampler_for

from remask.atomic import write_text
from remask.eval.reversal import KINDS

if TYPE_CHECKING:
    from reversal import Data, ReversalRecipe

PROBES = ("document", "statement", "question", "sft_fit")  # the document: infilled (diffusion), continued (AR)


def corpus_tokens(recipe: ReversalRecipe, model_dir: Path) -> int:
    """Tokens of one pass over the pretraining corpus, in the model's own tokenizer."""
    from remask.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    return len(tok.encode((recipe.benchmark.out / "corpus.txt").read_text(encoding="utf-8")))


def checkpoints(recipe: ReversalRecipe, objective: str) -> list[tuple[int, Path]]:
    """(step, model directory) of the kept checkpoints of the twin's pretraining run at multiples
    of `curve_every` steps, and the final model last (at the recipe's last step) once it exists."""
    from reversal_train import twin_steps

    from remask.train.checkpointing import step_dirs

    run, every, last = recipe.benchmark.out / objective, recipe.benchmark.curve_every, twin_steps(recipe, objective)
    found = [(step, path) for step, path in step_dirs(run) if step < last and step % every == 0]
    if (run / "final").is_dir():
        found.append((last, run / "final"))
    return found


def measure(recipe: ReversalRecipe, data: Data, base: Path, tuned: Path) -> list[dict]:
    """Every probe of every kind on one (base, fine-tuned) pair of a twin: the held-out pairs'
    document, statement and question, and the fit, the question on every pair SFT asked about."""
    options, rows = recipe.benchmark, []
    style = "qa" if options.statements == "qa" else "plain"
    for kind in KINDS:
        sampler, test = sampler_for(kind, options), data.test(kind)
        plain = evaluate_plain(base, kind, test, sampler, style, recipe.probe_window)
        found = {"document": plain["couplet" if kind == "poem" else "document"], "statement": plain["statement"],
                 "question": evaluate_qa(tuned, data.set(kind), test, sampler),
                 "sft_fit": evaluate_qa(tuned, data.set(kind), data.sft_pairs(kind), sampler)}
        rows += [{"kind": kind, "probe": probe, "forward": r["forward"], "backward": r["backward"], "n": r["n"]}
                 for probe, r in found.items()]
    return rows


def curve_sft(recipe: ReversalRecipe) -> ReversalRecipe:
    """The recipe with the curve's SFT: the recipe's, `curve_sft_steps` long (a checkpoint half way),
    shorter than the final model's so that a point stays affordable."""
    from remask.train.config import config_replace

    steps = recipe.benchmark.curve_sft_steps
    return config_replace(recipe, **{"sft.optim.max_steps": steps, "sft.run.save_every": max(1, steps // 2)})


def point_recipe(recipe: ReversalRecipe) -> str:
    """SHA-256 of what a point depends on beside its checkpoint: the curve's SFT recipe and the
    probes' settings (a point measured under other settings is measured again; progress bars aside)."""
    import hashlib

    options, sft = recipe.benchmark, curve_sft(recipe).sft.to_dict()
    sft["run"]["progress"] = False  # as the workers run it
    what = {"sft": sft, "window": recipe.probe_window, "statements": options.statements,
            "answer_lengths": [options.poem_answer_length, options.fact_answer_length]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def read_points(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def curve_twin(recipe: ReversalRecipe, data: Data, objective: str, sft_data: Path) -> list[dict]:
    """The twin's points still missing from TWIN.jsonl, measured and added one checkpoint at a time."""
    from reversal_train import fine_tune, sft_config, train_once, worker_recipe

    from remask.train.config import config_replace

    recipe = worker_recipe(recipe)
    root = recipe.benchmark.out / "curve"
    found = checkpoints(recipe, objective)
    recipe_sha = point_recipe(recipe)
    per_epoch = corpus_tokens(recipe, found[0][1]) if found else 1
    tokens_per_step = recipe.pretrain.optim.batch_size * recipe.pretrain.data.seq_len
    added, points, measured = [], root / f"{objective}.jsonl", {p["step"] for p in twin_points(recipe, objective)}
    for step, base in found:
        if step in measured:
            continue
        base_sha = weights_sha(base)
        config = config_replace(sft_config(curve_sft(recipe), objective, base, sft_data),
                                **{"run.out": root / f"{objective}-step-{step}-sft"})
        tuned, _ = train_once(config.run.out, config, fine_tune, [sft_data, base / "model.safetensors"])
        rows = [{"twin": objective, "step": step, "epochs": round(step * tokens_per_step / per_epoch, 1)} | r
                | {"recipe_sha256": recipe_sha, "base_sha256": base_sha} for r in measure(recipe, data, base, tuned)]
        kept = [p for p in read_points(points) if p["step"] != step]  # one of another SFT recipe or checkpoint is replaced
        write_text(points, "".join(json.dumps(r) + "\n" for r in kept + rows))
        print(f"curve: {objective} step {step} done", file=sys.stderr)
        added += rows
    return added


def curve(recipe: ReversalRecipe, data: Data, sft_data: Path) -> list[dict]:
    """Every point of both twins (measured now or before), by twin, step, kind and probe."""
    jobs = [(recipe, data, objective, sft_data) for objective in OBJECTIVES]
    if recipe.benchmark.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(recipe.benchmark.jobs) as pool:
            pool.starmap(curve_twin, jobs)
    else:
        for job in jobs:
            curve_twin(*job)
    return current_points(recipe)


def current_points(recipe: ReversalRecipe) -> list[dict]:
    """Both twins' points measured under the recipe's settings from the checkpoints there are now."""
    return [p for objective in OBJECTIVES for p in twin_points(recipe, objective)]


def twin_points(recipe: ReversalRecipe, objective: str) -> list[dict]:
    """The twin's points measured under the recipe's settings from its checkpoints as they are now
    (a point of a checkpoint since replaced, as when a run is lengthened past its old decay, is
    left out)."""
    sha, now = point_recipe(recipe), {step: weights_sha(base) for step, base in checkpoints(recipe, objective)}
    return [p for p in read_points(recipe.benchmark.out / "curve" / f"{objective}.jsonl")
            if p["recipe_sha256"] == sha and now.get(p["step"]) == p.get("base_sha256")]


def weights_sha(model_dir: Path) -> str:
    """SHA-256 of a model directory's weights: what a point was measured on."""
    from reversal_train import file_sha256

    return file_sha256(model_dir / "model.safetensors")


def best(points: list[dict], twin: str, kind: str, probe: str) -> dict | None:
    """The twin's point with the best held-out mean of both directions on `probe` (the earliest of equals)."""
    rows = [p for p in points if (p["twin"], p["kind"], p["probe"]) == (twin, kind, probe)]
    score = [(sum(v or 0 for v in (p["forward"], p["backward"])), -p["step"]) for p in rows]
    return rows[max(range(len(rows)), key=score.__getitem__)] if rows else None


def plot_curve(points: list[dict], path: Path) -> Path:
    """Forward and backward accuracy against epochs: one panel per kind and probe, both twins."""
    from remask.app.plot import pyplot, save_png

    plt = pyplot()
    fig, axes = plt.subplots(len(KINDS), len(PROBES), figsize=(4 * len(PROBES), 3.2 * len(KINDS)), squeeze=False)
    style = {("mdm", "forward"): "C0o-", ("mdm", "backward"): "C0s--", ("ar", "forward"): "C3o-",
             ("ar", "backward"): "C3s--"}
    for row, kind in zip(axes, KINDS):
        for ax, probe in zip(row, PROBES):
            for (twin, direction), fmt in style.items():
                rows = sorted((p for p in points if (p["twin"], p["kind"], p["probe"]) == (twin, kind, probe)
                               and p[direction] is not None), key=lambda p: p["step"])
                if rows:
                    name = "diffusion" if twin == "mdm" else "AR"
                    ax.plot([p["epochs"] for p in rows], [p[direction] for p in rows], fmt, ms=3,
                            label=f"{name} {direction}")
            ax.set_title(f"{kind}: {probe}" + (" (SFT pairs)" if probe == "sft_fit" else " (held out)"), fontsize=9)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("accuracy (contains gold)")
    for ax in axes[-1]:
        ax.set_xlabel("pretraining epochs")
    axes[0][0].legend(fontsize=7)
    return save_png(fig, path, dpi=100)


def summary(points: list[dict]) -> dict:
    """Each twin at its own best and both at the last common step (compute-matched), per kind and probe."""
    steps = [max((p["step"] for p in points if p["twin"] == o), default=None) for o in OBJECTIVES]
    matched = min(s for s in steps if s is not None) if all(s is not None for s in steps) else None
    out: dict = {"matched_step": matched}
    for kind in KINDS:
        for probe in PROBES:
            key = f"{kind}_{probe}"
            out.setdefault("best", {})[key] = {o: best(points, o, kind, probe) for o in OBJECTIVES}
            out.setdefault("matched", {})[key] = {
                o: next((p for p in points if (p["twin"], p["kind"], p["probe"], p["step"]) == (o, kind, probe, matched)),
                        None) for o in OBJECTIVES}
    return out


def ordered(points: list[dict]) -> list[dict]:
    """The points in a fixed order (twin, step, kind, probe), for reversal.json."""
    order = {o: i for i, o in enumerate(OBJECTIVES)}
    return sorted(points, key=lambda p: (order[p["twin"]], p["step"], KINDS.index(p["kind"]), PROBES.index(p["probe"])))
