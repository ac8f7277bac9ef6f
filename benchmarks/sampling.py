"""Fast sampling against the reference sampler and the AR twin, on the same weights and prompts.

    python benchmarks/sampling.py [--parts free memorised memorised_short couplets batch thresholds]

Models: those of benchmarks/reversal.py (runs/reversal/, run it first): a diffusion model and its AR
twin with the same recipe, pretrained at 128 tokens per sequence on poems, capital facts and the
two longest Tang poems (their pretrained checkpoints, not the ones fine-tuned on the questions).

Tasks:
- free: 256 answer positions after real prompts (128 tokens of the training poems, then the title
  and author of a Tang poem the models never saw); quality = agreement with the reference's
  tokens and the text's NLL per character under the AR twin;
- memorised: the rest of a known long poem: `--prompts` windows of the training documents long
  enough (`--context` tokens given, 256 to produce; each document from its start, then further
  in), scored by character accuracy against the true text;
- memorised_short: the same within the length the twins were pretrained at: `--short-prompts`
  windows of those poems (`--short-context` tokens given, the rest of that length to produce), at
  evenly spaced offsets (the memorised task 384 tokens long reads positions the models never
  trained on, and only these long poems are in the corpus once, so the prompt determines what
  follows); also the reference sampler and the accelerations at shorter blocks (8, 16);
- couplets: benchmarks/reversal.py's couplet probe on its test pairs, both directions, as
  `remask eval reversal --mode infill` reads it: the diffusion model infills the unknown
  half-line inside its training window (the reference is `fill_masks`, the fast engine's
  `fill_masks_fast` takes the caches and parallel rules over the region), the AR twin continues
  the first half-line (forwards only: it cannot read what follows its answer); contains-gold;
- batch: 16 prompts of mixed lengths at once against one at a time, same method;
- thresholds: accuracy against speed over confidence thresholds, with no cache, the prefix cache
  and the dual cache, at blocks 32, 16 and 8 (a PNG), on the windows halfway between
  memorised_short's: settings are chosen on this sweep and measured on memorised_short.

Per method: forward passes, tokens per forward pass, useful tokens/s (generated tokens up to the
end-of-text, never prompt or padding), wall time (the least of `--repeats` runs, which must give
the same answers), accuracy, and the speed-up over the reference measured in the same run.
Writes benchmarks/results/sampling.json (+ sampling_thresholds.png).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import RESULTS_DIR, nll_per_char, write_result

from remask.data.corpora import tang300_poems
from remask.eval.reversal import COUPLET, DIRECTIONS, Pair, load_holdout, make_probes, score_answers
from remask.pipeline import Pipeline, left_pad
from remask.sampling import SamplerConfig, ar_generate, generate
from remask.sampling.autoregressive import ar_generate_cached
from remask.sampling.fast import fill_masks_fast, generate_fast
from remask.sampling.generate import fill_masks

REF = "reference"


@dataclass(frozen=True)
class Method:
    name: str
    sampler: SamplerConfig | None  # None: the AR twin
    fast: bool = True  # the fast sampler (False: the reference `generate`)
    cached: bool = True  # AR twin: with its KV cache


def methods(gen_length: int, block: int, thresholds=(0.9,)) -> list[Method]:
    """The reference, each acceleration on its own and the AR twin, all at the reference's block length."""
    base = SamplerConfig(gen_length=gen_length, steps=gen_length, block_length=block)
    out = [
        Method(REF, base, fast=False),
        Method("lossless", base),
        Method("prefix_cache", base.replace(cache="prefix")),
        Method("dual_cache", base.replace(cache="dual")),
    ]
    for t in thresholds:
        out += [Method(f"{name}threshold_{t}", base.replace(cache=cache, parallel="threshold", threshold=t))
                for name, cache in (("", "none"), ("prefix_", "prefix"), ("dual_", "dual"))]
    out += [Method("dual_factor_1", base.replace(cache="dual", parallel="factor", factor=1.0)),
            Method("dual_entropy_0.5", base.replace(cache="dual", parallel="entropy", entropy_bound=0.5)),
            Method("ar_kv_cache", None), Method("ar_no_cache", None, cached=False)]
    return out


def short_blocks(gen_length: int, blocks=(8, 16), thresholds=(0.8, 0.9)) -> list[Method]:
    """Shorter semi-autoregressive blocks: the reference sampler at each block length (one token
    per step), and the caches with threshold decoding and the factor rule at it."""
    base = SamplerConfig(gen_length=gen_length, steps=gen_length)
    out = []
    for b in blocks:
        at = base.replace(block_length=b)
        out.append(Method(f"one_per_step_b{b}", at, fast=False))  # the reference sampler at block b
        for cache in ("prefix", "dual"):
            out += [Method(f"{cache}_b{b}_threshold_{t}", at.replace(cache=cache, parallel="threshold", threshold=t))
                    for t in thresholds]
            out.append(Method(f"{cache}_b{b}_factor_1", at.replace(cache=cache, parallel="factor", factor=1.0)))
    return out


def run_method(method: Method, pipe: Pipeline, ar: Pipeline, prompts: list[list[int]], gen_length: int,
               batch_size: int = 1, repeats: int = 1) -> tuple[list[list[int]], dict]:
    """Answers (ids up to and including the end-of-text) and the cost figures (`best_of`)."""
    return best_of(method.name, repeats, lambda: run_once(method, pipe, ar, prompts, gen_length, batch_size))


def best_of(name: str, repeats: int, once) -> tuple[list, dict]:
    """`once()`'s answers and cost, its wall time the least of `repeats` runs (this machine is
    shared and noisy), which must give the same answers."""
    first, wall = None, float("inf")
    for _ in range(repeats):
        answers, cost = once()
        if first is not None and answers != first[0]:
            sys.exit(f"error: {name} gave different answers on a repeated run")
        first = first or (answers, cost)
        wall = min(wall, cost["wall_s"])
    answers, cost = first
    cost |= {"wall_s": wall, "tokens_per_s": cost["useful_tokens"] / wall if wall else 0.0, "repeats": repeats}
    return answers, cost


def run_infill(method: Method, pipe: Pipeline, cases: list[tuple[list[int], slice]], repeats: int = 1):
    """The diffusion model filling each case's region (one case at a time, one block over the
    region, as many steps as masks): the region's ids and the cost figures (`best_of`)."""
    calls = [0]

    def counted(i, a):
        calls[0] += 1
        return pipe.model_fn(i, a)

    def once():
        answers, passes, wall = [], 0, 0.0
        for ids, region in cases:
            n = region.stop - region.start
            sampler = method.sampler.replace(gen_length=n, steps=n, block_length=None)
            x = torch.tensor([ids], device=pipe.device)
            calls[0] = 0
            t0 = time.perf_counter()
            if method.fast:
                out, stats = fill_masks_fast(pipe.model, x, region, sampler, mask_id=pipe.tokenizer.mask_id,
                                             vocab_size=pipe.model.config.vocab_size)
                calls[0] = stats.forward_passes
            else:
                out = fill_masks(counted, x, sampler, mask_id=pipe.tokenizer.mask_id, region=region)
            wall += time.perf_counter() - t0
            passes += calls[0]
            answers.append(out[0, region].tolist())
        return answers, cost_of(passes, sum(len(a) for a in answers), wall)
    return best_of(method.name, repeats, once)


def run_once(method: Method, pipe: Pipeline, ar: Pipeline, prompts: list[list[int]], gen_length: int,
             batch_size: int = 1) -> tuple[list[list[int]], dict]:
    answers, passes, wall = [], 0, 0.0
    target = ar if method.sampler is None else pipe
    stops = target.stop_ids()
    calls = [0]

    def counted(i, a):
        calls[0] += 1
        return target.model_fn(i, a)

    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, attention = left_pad(chunk, target.tokenizer.pad_id, target.device)
        mask = None if len(chunk) == 1 else attention
        calls[0] = 0
        t0 = time.perf_counter()
        if method.sampler is None and method.cached:
            x, n = ar_generate_cached(target.model, ids, gen_length, vocab_size=target.model.config.vocab_size,
                                      eos_ids=stops, attention_mask=mask)
        elif method.sampler is None:
            x = ar_generate(counted, ids, gen_length, eos_ids=stops, attention_mask=mask)
            n = calls[0]
        elif method.fast:
            x, stats = generate_fast(target.model, ids, method.sampler, mask_id=target.tokenizer.mask_id,
                                     vocab_size=target.model.config.vocab_size, attention_mask=mask, eos_ids=stops)
            n = stats.forward_passes
        else:
            x = generate(counted, ids, method.sampler, mask_id=target.tokenizer.mask_id, attention_mask=mask,
                         eos_ids=stops)
            n = calls[0]
        wall += time.perf_counter() - t0
        passes += n
        for row in x[:, ids.shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            answers.append(row if end is None else row[:end + 1])
    useful = sum(len(a) - (1 if a and a[-1] in stops else 0) for a in answers)  # tokens before the end-of-text
    return answers, cost_of(passes, useful, wall)


def cost_of(passes: int, useful: int, wall: float) -> dict:
    return {"forward_passes": passes, "useful_tokens": useful, "wall_s": wall,
            "tokens_per_s": useful / wall if wall else 0.0, "tokens_per_forward": useful / passes if passes else 0.0}


def char_accuracy(produced: str, truth: str) -> float:
    """Fraction of the true text's characters reproduced at their position."""
    return sum(a == b for a, b in zip(produced, truth)) / max(1, len(truth))


def pretrained_length(run_dir: Path) -> int:
    """The sequence length the twins were pretrained at (their training note; benchmarks/reversal.py's --seq-len)."""
    from remask.checkpoint.model_dir import trained_seq_len

    n = trained_seq_len(run_dir / "mdm" / "final")
    if n is None:
        sys.exit(f"error: {run_dir / 'mdm' / 'final'} records no pretraining length (retrain with benchmarks/reversal.py)")
    return n


def corpus_documents(run_dir: Path) -> list[str]:
    """The documents the models were pretrained on (benchmarks/reversal.py's corpus.txt)."""
    return (run_dir / "corpus.txt").read_text(encoding="utf-8").split("\n%\n")


def free_prompts(pipe: Pipeline, docs: list[str], count: int, contexts: list[int]) -> list[list[int]]:
    """`context` tokens of training poems, then the title and author of a Tang poem the models
    never saw (one whose characters they all know)."""
    tok, seen = pipe.tokenizer, set(docs)
    stream = [t for d in docs[:40] for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]
    unk = tok.token_to_id("<|unk|>")
    out = []
    for poem in tang300_poems():
        head = tok.encode(f"{poem.title}\n{poem.author}\n")
        if poem.text() in seen or unk in head:
            continue
        context = contexts[len(out) % len(contexts)]
        out.append(stream[len(out) * 7:len(out) * 7 + context] + [tok.bos_id, *head])
        if len(out) == count:
            return out
    return out


def memorised_windows(pipe: Pipeline, docs: list[str], count: int, context: int, length: int, min_tokens: int,
                      shift: float = 0.0) -> tuple[list[list[int]], list[str]]:
    """`count` windows of `context` tokens and the text of the next `length` tokens, taken in
    turn from each training document of at least `min_tokens` tokens (the memorised task's long
    poems, each in the corpus once, so the prompt determines its continuation) at evenly spaced
    offsets, moved by `shift` of the spacing (0.5 gives windows between those of 0)."""
    tok = pipe.tokenizer
    long = [[tok.bos_id, *tok.encode(d)] for d in sorted(set(docs), key=lambda d: -len(d))]
    long = [ids for ids in long if len(ids) >= min_tokens]
    if not long:
        sys.exit(f"error: no training document holds {min_tokens} tokens (benchmarks/reversal.py --long-poems)")
    per = -(-count // len(long))
    prompts, truths = [], []
    for j in range(per):
        for ids in long:
            o = round((j + shift) * (len(ids) - context - length) / per)
            prompts.append(ids[o:o + context])
            truths.append(tok.decode(ids[o + context:o + context + length]))
    return prompts[:count], truths[:count]


def couplet_cases(pipe: Pipeline, pairs: list[Pair], direction: str,
                  window: int) -> tuple[list[tuple[list[int], slice]], list[list[int] | None], list[str]]:
    """benchmarks/reversal.py's couplet probe (`eval.reversal.probe_answers`): for the diffusion
    model, BOS and the couplet with the unknown half masked, then masks up to `window`, and the
    answer's region; for the AR twin, the text before the answer to continue (None where the
    known half comes after it); the golds."""
    tok = pipe.tokenizer
    cases, prefixes, golds = [], [], []
    for probe in make_probes(tok, pairs, direction, COUPLET):
        cases.append(probe.masked(tok.mask_id, window))
        prefixes.append(probe.before if probe.known_first else None)
        golds.append(probe.gold)
    return cases, prefixes, golds


def add_speedups(rows: list[dict]) -> list[dict]:
    ref = next((r["tokens_per_s"] for r in rows if r["method"] == REF), None)
    for r in rows:
        r["speedup_vs_naive"] = r["tokens_per_s"] / ref if ref else None
    return rows


def plot_thresholds(rows: list[dict], path: Path) -> None:
    from remask.app.plot import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    curves: dict[str, list[dict]] = {}
    for r in rows:
        if "threshold_" in r["method"]:
            curves.setdefault(r["method"].rsplit("_", 1)[0], []).append(r)
    for name, pts in curves.items():
        cache = name.split("_")[0] if name != "threshold" else "no cache"
        block = next((part[1:] for part in name.split("_") if part[:1] == "b" and part[1:].isdigit()), None)
        label = f"{cache}, block {block or 32}, threshold"
        ax.plot([r["tokens_per_s"] for r in pts], [r["accuracy"] for r in pts], "o-", label=label, ms=3)
        for r in pts:
            ax.annotate(r["method"].rsplit("_", 1)[1], (r["tokens_per_s"], r["accuracy"]), fontsize=6)
    for r in rows:
        if r["method"] in (REF, "ar_kv_cache"):
            ax.plot([r["tokens_per_s"]], [r["accuracy"]], "s", label=r["method"])
        if r["method"] == REF:
            ax.axhline(r["accuracy"] - 0.01, color="grey", lw=0.8, ls="--", label="reference - 1 point")
    ax.set_xscale("log")
    ax.set_xlabel("useful tokens/s (log)")
    ax.set_ylabel("character accuracy (memorised windows, the sweep)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    save_png(fig, path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["free", "memorised", "memorised_short", "couplets", "batch", "thresholds"]
    ap.add_argument("--parts", nargs="+", default=parts, choices=parts)
    ap.add_argument("--runs", type=Path, default=Path("runs/reversal"), help="benchmarks/reversal.py's --out")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--short-context", type=int, default=32, help="prompt tokens of the memorised_short task")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--short-prompts", type=int, default=16, help="windows of the memorised_short task and of the sweep")
    ap.add_argument("--repeats", type=int, default=3, help="runs per method; the fastest counts")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    previous = RESULTS_DIR / "sampling.json"
    results = json.loads(previous.read_text())["results"] if previous.exists() else {}
    pipe, ar = Pipeline.load(args.runs / "mdm" / "final"), Pipeline.load(args.runs / "ar" / "final")
    docs = corpus_documents(args.runs)
    L, block = args.gen_length, args.block_length

    def evaluate(task: str, prompts, score, method_list: list[Method], mdm: Pipeline, twin: Pipeline,
                 length: int) -> list[dict]:
        rows, reference_answers = [], None
        for m in method_list:
            answers, cost = run_method(m, mdm, twin, prompts, length, repeats=args.repeats)
            if m.name == REF:
                reference_answers = answers
            rows.append({"method": m.name, "task": task, "gen_length": length, "batch_size": 1, **cost,
                         **score(answers, reference_answers),
                         "sampler": None if m.sampler is None else m.sampler.to_dict()})
            print(f"{task:<10} {m.name:<22} {cost['forward_passes']:>6} passes {cost['tokens_per_forward']:6.2f} tok/pass "
                  f"{cost['tokens_per_s']:8.1f} tok/s acc {rows[-1]['accuracy']:.3f}", file=sys.stderr)
        return add_speedups(rows)

    all_rows = results.get("methods", [])

    def keep(task: str, rows: list[dict]) -> None:
        nonlocal all_rows
        all_rows = [r for r in all_rows if r.get("task") != task] + rows

    free = free_prompts(pipe, docs, args.prompts, [args.context])
    if "free" in args.parts:
        def score_free(answers, ref):
            agree = [sum(a == b for a, b in zip(x, r)) / max(1, len(r)) for x, r in zip(answers, ref or answers)]
            return {"accuracy": statistics.fmean(agree),
                    "ar_nll_per_char": statistics.fmean(nll_per_char(ar, [(p, a) for p, a in zip(free, answers) if a]))}

        keep("free", evaluate("free", free, score_free, methods(L, block), pipe, ar, L))
    prompts, truths = memorised_windows(pipe, docs, args.prompts, args.context, L, args.context + L)

    def against(truths: list[str]):
        def score(answers, ref):
            return {"accuracy": statistics.fmean(char_accuracy(pipe.tokenizer.decode(a), t)
                                                 for a, t in zip(answers, truths))}
        return score

    score_memorised = against(truths)
    if "memorised" in args.parts:
        keep("memorised", evaluate("memorised", prompts, score_memorised, methods(L, block), pipe, ar, L))
    n = pretrained_length(args.runs) - args.short_context
    if "memorised_short" in args.parts:  # the windows between the sweep's: settings chosen there, measured here
        short, short_truths = memorised_windows(pipe, docs, args.short_prompts, args.short_context, n, args.context + L,
                                                shift=0.5)
        keep("memorised_short", evaluate("memorised_short", short, against(short_truths),
                                         methods(n, block) + short_blocks(n), pipe, ar, n))
    if "thresholds" in args.parts:
        sweep, sweep_truths = memorised_windows(pipe, docs, args.short_prompts, args.short_context, n, args.context + L)
        base = [m for m in methods(n, block, thresholds=(0.5, 0.7, 0.8, 0.9, 0.95, 0.99))
                if m.name == REF or m.name == "ar_kv_cache" or "threshold" in m.name]
        shorter = [m for m in short_blocks(n, thresholds=(0.7, 0.8, 0.9, 0.95)) if "threshold" in m.name]
        rows = evaluate("thresholds", sweep, against(sweep_truths), base + shorter, pipe, ar, n)
        keep("thresholds", rows)
        plot_thresholds(rows, RESULTS_DIR / "sampling_thresholds.png")
    if "couplets" in args.parts:
        pairs = load_holdout(args.runs / "test_pairs.jsonl")
        window = pretrained_length(args.runs)
        for direction in DIRECTIONS:
            cases, prefixes, golds = couplet_cases(pipe, pairs, direction, window)
            rows = []
            for m in methods(block, block):
                if m.sampler is not None:  # the diffusion model infills the window
                    answers, cost = run_infill(m, pipe, cases, repeats=args.repeats)
                    texts = [pipe.tokenizer.decode(a) for a in answers]
                elif None in prefixes:  # the AR twin cannot read what follows its answer
                    continue
                else:
                    n = max(c[1].stop - c[1].start for c in cases)
                    answers, cost = run_method(m, pipe, ar, prefixes, n, repeats=args.repeats)
                    texts = [pipe.tokenizer.decode(a) for a in answers]
                rows.append({"method": m.name, "task": f"couplets_{direction}", "gen_length": None, "batch_size": 1,
                             **cost, "accuracy": score_answers(texts, golds)["accuracy"],
                             "sampler": None if m.sampler is None else m.sampler.to_dict()})
                print(f"couplets {direction:<8} {m.name:<22} {cost['forward_passes']:>6} passes "
                      f"{cost['tokens_per_s']:8.1f} tok/s acc {rows[-1]['accuracy']:.3f}", file=sys.stderr)
            keep(f"couplets_{direction}", add_speedups(rows))
    if "batch" in args.parts:
        mixed = free_prompts(pipe, docs, args.batch, [16, 48, 80, 128])
        rows = []
        for m in [m for m in methods(L, block) if m.name in ("dual_threshold_0.9", "lossless", "ar_kv_cache")]:
            alone_answers, alone = run_method(m, pipe, ar, mixed, L, batch_size=1, repeats=args.repeats)
            batched_answers, batched = run_method(m, pipe, ar, mixed, L, batch_size=args.batch, repeats=args.repeats)
            for size, cost, answers in ((1, alone, alone_answers), (args.batch, batched, batched_answers)):
                rows.append({"method": m.name, "task": "batch", "gen_length": L, "batch_size": size, **cost,
                             "accuracy": statistics.fmean(
                                 sum(a == b for a, b in zip(x, r)) / max(1, len(r)) for x, r in zip(answers, alone_answers)),
                             "speedup_vs_batch_1": cost["tokens_per_s"] / alone["tokens_per_s"]})
                print(f"batch {size:>3} {m.name:<22} {cost['tokens_per_s']:8.1f} tok/s "
                      f"x{rows[-1]['speedup_vs_batch_1']:.2f} agree {rows[-1]['accuracy']:.3f}", file=sys.stderr)
        for r in rows:
            r["speedup_vs_naive"] = None
        keep("batch", rows)
    tasks = (set(parts) - {"couplets"}) | {f"couplets_{d}" for d in DIRECTIONS}
    results["methods"] = [r for r in all_rows if r.get("task") in tasks]  # parts this script still has
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_result("sampling", settings, results)


if __name__ == "__main__":
    main()
