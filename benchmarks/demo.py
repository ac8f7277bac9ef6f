"""The main job's poems, measured: the demo's samples and a comparison of sampler settings.

    python benchmarks/demo.py [--model runs/demo/final] [--ar runs/demo-ar/final] [--grid]

The models are those of the demo (`remask demo`, or `remask pretrain --config recipes/demo.yaml`)
and of its autoregressive twin (`remask pretrain --config recipes/demo-ar.yaml`). Per sample: its
text, the distinct-character ratio of the poem body (distinct characters / characters, punctuation
and whitespace left out), whether it ended at an end-of-text, whether that end-of-text was the
anchor (under anchor_eos: the text filled every position before it), whether it ran past its poem
(no end-of-text, or a second title or author line inside), whether its last line is complete, and
its negative log-likelihood per character under the AR twin (lower reads as more fluent to an
independent model of the same data). `--grid` also scores sampler settings (remasking, temperature,
block length, steps, the end-of-text anchor) over every demo prompt and several seeds, and says
which ones meet the targets (nothing runs past, distinct ratio >= 0.8). Writes
benchmarks/results/demo.json.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import unicodedata
from pathlib import Path

import torch
from _common import ArgumentParser, nll_per_char, positive_int, run_main, write_result

from remask.app.demo import DEMO_PROMPTS, DEMO_SAMPLING
from remask.pipeline import Pipeline
from remask.sampling import SamplerConfig

TARGET_DISTINCT = 0.8


def body_chars(text: str) -> list[str]:
    """The poem body's characters, punctuation and whitespace left out."""
    return [c for c in text if not c.isspace() and not unicodedata.category(c).startswith(("P", "Z", "S"))]


def distinct_ratio(text: str) -> float:
    chars = body_chars(text)
    return len(set(chars)) / len(chars) if chars else 0.0


def ends_at_line_end(text: str) -> bool:
    """The last line is complete: the text ends with a sentence's closing punctuation."""
    return text.rstrip().endswith(("。", "？", "！", "；", ".", "?", "!"))


def runs_past(text: str, ended: bool) -> bool:
    """The answer did not stop where its poem does: no end-of-text, or a new title or author inside."""
    return not ended or "《" in text or "作者" in text


def sample_all(pipe: Pipeline, ar: Pipeline, sampler: SamplerConfig, seeds: int) -> list[dict]:
    """Every demo prompt with `seeds` seeds (the demo's own, prompt i with seed i, first), as one batch."""
    runs = [(prompt, i + s * len(DEMO_PROMPTS)) for s in range(seeds) for i, prompt in enumerate(DEMO_PROMPTS)]
    answers = pipe.generate_many([p for p, _ in runs], sampler, [seed for _, seed in runs])
    # The AR twin scores each answer and its end-of-text: -log p(answer + EOS | prompt) per character.
    nll = nll_per_char(ar, [(ar.encode_prompt(p), ar.tokenizer.encode(g.text) + [ar.tokenizer.eos_id])
                            for (p, _), g in zip(runs, answers)])
    return [{"prompt": prompt, "seed": seed, "text": g.text, "distinct_ratio": distinct_ratio(g.text),
             "ended": g.ended, "at_anchor": g.ended and g.reveal_step[-1] < 0,
             "runs_past": runs_past(g.text, g.ended), "ends_at_line_end": ends_at_line_end(g.text), "ar_nll": value}
            for (prompt, seed), g, value in zip(runs, answers, nll)]


def summary(samples: list[dict]) -> dict:
    return {"samples": len(samples),
            "ended": sum(s["ended"] for s in samples) / len(samples),
            "at_anchor": sum(s["at_anchor"] for s in samples) / len(samples),
            "runs_past": sum(s["runs_past"] for s in samples) / len(samples),
            "ends_at_line_end": sum(s["ends_at_line_end"] for s in samples) / len(samples),
            "distinct_ratio_mean": statistics.fmean(s["distinct_ratio"] for s in samples),
            "distinct_ratio_min": min(s["distinct_ratio"] for s in samples),
            "ar_nll_mean": statistics.fmean(s["ar_nll"] for s in samples),
            "chars_mean": statistics.fmean(len(s["text"]) for s in samples)}


def meets_targets(s: dict) -> bool:
    return s["runs_past"] == 0 and s["distinct_ratio_min"] >= TARGET_DISTINCT


def grid_settings(base: SamplerConfig) -> list[SamplerConfig]:
    out = []
    for remasking, temperature, block in itertools.product(("low_confidence", "random"), (0.0, 0.5, 0.7, 1.0),
                                                           (4, 16, 96)):
        if remasking == "random" and temperature == 0.0:
            continue  # greedy tokens in a random order: the low-confidence rows' tokens without their order
        for anchor in (False, True):
            if anchor and remasking == "low_confidence" and (block == 4 or temperature == 0.5):
                continue  # kept smaller: low confidence repeats itself with or without the anchor
            out.append(base.replace(remasking=remasking, temperature=temperature, block_length=block,
                                    anchor_eos=anchor))
    out += [base.replace(steps=base.gen_length // 2), base.replace(steps=base.gen_length // 2, block_length=8)]
    return out


def setting_name(sampler: SamplerConfig) -> str:
    return (f"{sampler.remasking} T={sampler.temperature} block={sampler.block_length} steps={sampler.steps}"
            f"{' anchored' if sampler.anchor_eos else ''}")


def main() -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/demo/final"))
    ap.add_argument("--ar", type=Path, default=Path("runs/demo-ar/final"))
    ap.add_argument("--seeds", type=positive_int, default=4, help="samples per prompt")
    ap.add_argument("--grid", action="store_true", help="also compare sampler settings")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    pipe, ar = Pipeline.load(args.model), Pipeline.load(args.ar)
    note = pipe.note  # the training note: which step final/ holds and why
    shipped = sample_all(pipe, ar, DEMO_SAMPLING, args.seeds)
    ship_summary = summary(shipped)
    print(f"shipped {DEMO_SAMPLING.to_dict()}: {ship_summary}", file=sys.stderr)
    results = {"samples": [s for s in shipped if s["seed"] < len(DEMO_PROMPTS)],  # what `remask demo` shows
               "kept_step": note.get("step"), "kept_val_loss": note.get("val_loss"),
               "sampler": DEMO_SAMPLING.to_dict(), "summary": ship_summary, "meets_targets": meets_targets(ship_summary)}
    if args.grid:
        rows = []
        for sampler in grid_settings(DEMO_SAMPLING):
            s = summary(sample_all(pipe, ar, sampler, args.seeds))
            name = setting_name(sampler)
            rows.append({"name": name, "sampler": {k: sampler.to_dict()[k] for k in
                                                   ("remasking", "temperature", "block_length", "steps",
                                                    "anchor_eos")}, **s,
                         "meets_targets": meets_targets(s)})
            print(f"{name:<54} past {s['runs_past']:.2f} ended {s['ended']:.2f} at anchor {s['at_anchor']:.2f} distinct "
                  f"{s['distinct_ratio_mean']:.3f} (min {s['distinct_ratio_min']:.3f}) ar_nll {s['ar_nll_mean']:.3f}",
                  file=sys.stderr)
        results["grid"] = rows
    import yaml

    def recipe(model: Path) -> dict | None:  # the training config of a run's final/ (RUN/config.yaml)
        path = model.parent / "config.yaml"
        return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None

    settings = {"model": str(args.model), "ar": str(args.ar), "seeds": args.seeds,
                "target_distinct_ratio": TARGET_DISTINCT, "model_recipe": recipe(args.model),
                "ar_recipe": recipe(args.ar)}
    write_result("demo", settings, results, out=args.out)


if __name__ == "__main__":
    run_main(main)
