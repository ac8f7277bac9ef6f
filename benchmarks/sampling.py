"""Fast sampling against the reference sampler and the AR twin, on the same weights and prompts.

    python benchmarks/sampling.py [--parts free memorised memorised_short couplets batch stream thresholds]

Models: benchmarks/reversal.py's twins (runs/reversal/, run it first), their pretrained checkpoints.
Tasks (method, tables and discussion: docs/sampling.md): free (256 positions after real prompts,
scored against the reference's tokens and by the AR twin's NLL per character), memorised (the rest
of a known long poem, character accuracy), memorised_short (the same within the pretraining length,
plus blocks 8 and 16), couplets (the reversal probe, infilled by the diffusion model, continued by
the AR twin), batch (16 mixed prompts at once against one at a time), stream (48 requests, 16 in
flight, each joining as another ends, against one in flight), thresholds (the sweep that
chooses the settings, with a PNG). Per method: forward passes, tokens per pass, useful tokens/s
(the least wall time of `--repeats` runs, which must agree), accuracy, speed-up over the reference.
Each row names its task, method, sampler, model, settings, commit and date; a run of some parts
replaces those tasks' rows in benchmarks/results/sampling.json and keeps the others' as measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import RESULTS_DIR, ArgumentParser, merge_rows, nll_per_char, positive_int, previous_results, run_main, stamp, write_result
from sampling_tasks import (
    REF,
    Method,
    add_speedups,
    agreement,
    best_of,
    block_length_of,
    block_methods,
    block_models,
    char_accuracy,
    corpus_documents,
    cost_of,
    free_prompts,
    memorised_windows,
    methods,
    model_of,
    plot_thresholds,
    pretrained_length,
    run_stream,
    short_blocks,
    task_settings,
    until_stop,
    useful_tokens,
)

from remask.errors import RemaskError
from remask.eval.reversal import COUPLET, DIRECTIONS, Pair, load_holdout, make_probes, score_answers
from remask.pipeline import Pipeline, left_pad
from remask.sampling import ar_generate, generate
from remask.sampling.autoregressive import ar_generate_cached
from remask.sampling.engine import fill_masks_fast, generate_fast
from remask.sampling.generate import fill_masks


def run_method(method: Method, pipes: dict[str, Pipeline], prompts: list[list[int]], gen_length: int,
               batch_size: int = 1, repeats: int = 1) -> tuple[list[list[int]], dict]:
    """Answers (ids up to and including the end-of-text) and the cost figures (`best_of`)."""
    return best_of(method.name, repeats, lambda: run_once(method, pipes[method.model], prompts, gen_length, batch_size))


@torch.no_grad()
def plain_kv_loop(model, prompt: torch.Tensor, attention: torch.Tensor | None, n: int, vocab_size: int,
                  stops: list[int]) -> tuple[torch.Tensor, int]:
    """The baseline for AR decoding: the textbook greedy KV-cache loop over the same model (prefill,
    then one token at a time, each step's keys and values concatenated onto the cache), no batching
    logic: (B, P + n') ids and its forward passes."""
    logits, cache = model(prompt, attention, return_kv=True, logits_at=slice(-1, None))
    out, P = [prompt], prompt.shape[1]
    for t in range(n):
        nxt = logits[:, -1, :vocab_size].argmax(-1, keepdim=True)  # (B, 1)
        out.append(nxt)
        if t == n - 1 or all(int(x) in stops for x in nxt[:, 0]):
            break
        logits, new = model(nxt, None, torch.tensor([P + t], device=prompt.device), past=cache, return_kv=True)
        cache = cache.cat(new)
    return torch.cat(out, 1), len(out) - 1


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


def run_once(method: Method, target: Pipeline, prompts: list[list[int]], gen_length: int,
             batch_size: int = 1) -> tuple[list[list[int]], dict]:
    answers, passes, wall = [], 0, 0.0
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
        if method.plain:
            x, n = plain_kv_loop(target.model, ids, mask, gen_length, target.model.config.vocab_size, stops)
        elif method.sampler is None and method.cached:
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
        answers += [until_stop(row, stops) for row in x[:, ids.shape[1]:].tolist()]
    return answers, cost_of(passes, useful_tokens(answers, stops), wall)


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


@dataclass
class Bench:
    """What every part reads: the options, the models by name (the two twins, the block models
    beside them) and the documents they were pretrained on."""

    args: argparse.Namespace
    pipes: dict[str, Pipeline]
    docs: list[str]

    @property
    def pipe(self) -> Pipeline:
        return self.pipes["mdm"]

    @property
    def ar(self) -> Pipeline:
        return self.pipes["ar"]

    @property
    def blocks(self) -> list[int]:
        return sorted(int(k[2:]) for k in self.pipes if k.startswith("bd"))

    def chosen(self, *names: str) -> list[Method]:
        """The methods of these names (the twins' and the block models'), in the usual order."""
        every = methods(self.args.gen_length, self.args.block_length) + block_methods(self.args.gen_length, self.blocks)
        return [m for m in every if m.name in names]

    def row(self, task: str, method: Method, length: int | None, batch_size: int, cost: dict, scores: dict,
            when: dict) -> dict:
        """One self-describing result row: task, method, sampler, model, settings, figures, commit and date."""
        row = {"method": method.name, "task": task, "gen_length": length, "batch_size": batch_size, **cost, **scores,
               "sampler": None if method.sampler is None else method.sampler.to_dict(),
               "model": model_of(self.args.runs, method), "settings": task_settings(vars(self.args), task), **when}
        extra = f" x{row['speedup_vs_batch_1']:.2f} vs batch 1" if "speedup_vs_batch_1" in row else ""
        print(f"{task:<17} {method.name:<24} b{batch_size:<3} {cost['forward_passes']:>6} passes "
              f"{cost['tokens_per_forward']:6.2f} tok/pass {cost['tokens_per_s']:8.1f} tok/s "
              f"acc {row['accuracy']:.3f}{extra}", file=sys.stderr)
        return row

    def measure(self, task: str, method_list: list[Method], prompts: list[list[int]],
                score: Callable[[list, list | None], dict], length: int) -> list[dict]:
        """Each method on the prompts one at a time, scored (score(answers, the reference's answers))."""
        rows, reference_answers, when = [], None, stamp()
        for m in method_list:
            answers, cost = run_method(m, self.pipes, prompts, length, repeats=self.args.repeats)
            reference_answers = answers if m.name == REF else reference_answers
            rows.append(self.row(task, m, length, 1, cost, score(answers, reference_answers), when))
        return add_speedups(rows)


def against(b: Bench, truths: list[str]) -> Callable[[list, list | None], dict]:
    """Score answers by character accuracy against the true continuations."""
    def score(answers, ref):
        return {"accuracy": statistics.fmean(char_accuracy(b.pipe.tokenizer.decode(a), t) for a, t in zip(answers, truths))}
    return score


def part_free(b: Bench) -> list[dict]:
    a = b.args
    prompts = free_prompts(b.pipe, b.docs, a.prompts, [a.context])

    def score(answers, ref):
        return {"accuracy": agreement(answers, ref or answers),
                "ar_nll_per_char": statistics.fmean(nll_per_char(b.ar, [(p, x) for p, x in zip(prompts, answers) if x]))}
    return b.measure("free", methods(a.gen_length, a.block_length) + block_methods(a.gen_length, b.blocks), prompts, score,
                     a.gen_length)


def part_memorised(b: Bench) -> list[dict]:
    a, L = b.args, b.args.gen_length
    prompts, truths = memorised_windows(b.pipe, b.docs, a.prompts, a.context, L, a.context + L)
    return b.measure("memorised", methods(L, a.block_length) + block_methods(L, b.blocks), prompts, against(b, truths), L)


def part_memorised_short(b: Bench) -> list[dict]:
    """Within the pretraining length, on the windows between the sweep's (settings chosen there, measured here)."""
    a = b.args
    n = pretrained_length(a.runs) - a.short_context
    prompts, truths = memorised_windows(b.pipe, b.docs, a.short_prompts, a.short_context, n, a.context + a.gen_length,
                                        shift=0.5)
    return b.measure("memorised_short", methods(n, a.block_length) + short_blocks(n) + block_methods(n, b.blocks), prompts,
                     against(b, truths), n)


def part_thresholds(b: Bench) -> list[dict]:
    a = b.args
    n = pretrained_length(a.runs) - a.short_context
    prompts, truths = memorised_windows(b.pipe, b.docs, a.short_prompts, a.short_context, n, a.context + a.gen_length)
    base = [m for m in methods(n, a.block_length, thresholds=(0.5, 0.7, 0.8, 0.9, 0.95, 0.99))
            if m.name in (REF, "ar_kv_cache") or "threshold" in m.name]
    shorter = [m for m in short_blocks(n, thresholds=(0.7, 0.8, 0.9, 0.95)) if "threshold" in m.name]
    rows = b.measure("thresholds", base + shorter, prompts, against(b, truths), n)
    plot_thresholds(rows, a.out.parent / "sampling_thresholds.png")
    return rows


def part_couplets(b: Bench) -> list[dict]:
    """The couplet probe both ways: the diffusion model infills its window, the AR twin continues
    the text before the answer (forwards only: it cannot read what follows its answer)."""
    a, tok = b.args, b.pipe.tokenizer
    pairs = load_holdout(a.runs / "test_pairs.jsonl")
    out = []
    for direction in DIRECTIONS:
        cases, prefixes, golds = couplet_cases(b.pipe, pairs, direction, pretrained_length(a.runs))
        rows, when = [], stamp()
        for m in methods(a.block_length, a.block_length):
            if m.sampler is None and None in prefixes:
                continue
            if m.sampler is not None:
                answers, cost = run_infill(m, b.pipe, cases, repeats=a.repeats)
            else:
                n = max(c[1].stop - c[1].start for c in cases)
                answers, cost = run_method(m, b.pipes, prefixes, n, repeats=a.repeats)
            accuracy = score_answers([tok.decode(x) for x in answers], golds)["accuracy"]
            rows.append(b.row(f"couplets_{direction}", m, None, 1, cost, {"accuracy": accuracy}, when))
        out += add_speedups(rows)
    return out


MIXED_CONTEXTS = [16, 48, 80, 128]  # the batch and stream parts' prompt lengths, in turn


def part_batch(b: Bench) -> list[dict]:
    """Mixed-length prompts all at once against one at a time, same method; accuracy = agreement with one at a time."""
    a, L = b.args, b.args.gen_length
    mixed = free_prompts(b.pipe, b.docs, a.batch, MIXED_CONTEXTS)
    rows, when = [], stamp()
    for m in b.chosen("dual_threshold_0.9", "lossless", "ar_kv_cache", *(f"block{n}_threshold_0.9" for n in b.blocks)):
        alone_answers, alone = run_method(m, b.pipes, mixed, L, batch_size=1, repeats=a.repeats)
        batched_answers, batched = run_method(m, b.pipes, mixed, L, batch_size=a.batch, repeats=a.repeats)
        for size, cost, answers in ((1, alone, alone_answers), (a.batch, batched, batched_answers)):
            scores = {"accuracy": agreement(answers, alone_answers),
                      "speedup_vs_batch_1": cost["tokens_per_s"] / alone["tokens_per_s"], "speedup_vs_naive": None}
            rows.append(b.row("batch", m, L, size, cost, scores, when))
    return rows


def part_stream(b: Bench) -> list[dict]:
    """More requests than rows in flight, each joining as another ends (a server's continuous
    batching), for the engine's methods: `--batch` rows in flight against one; accuracy =
    agreement with one in flight. The AR twin's decoding has no engine and is not in this part."""
    a, L = b.args, b.args.gen_length
    prompts = free_prompts(b.pipe, b.docs, a.stream_requests, MIXED_CONTEXTS)
    if len(prompts) < a.stream_requests:
        raise RemaskError(f"--stream-requests {a.stream_requests}: only {len(prompts)} prompts to be had")
    rows, when = [], stamp()
    for m in b.chosen("dual_threshold_0.9", *(f"block{n}_threshold_0.9" for n in b.blocks)):
        results = {n: run_stream(m, b.pipes[m.model], prompts, n, a.repeats) for n in (1, a.batch)}
        for n, (answers, cost) in results.items():
            scores = {"accuracy": agreement(answers, results[1][0]), "in_flight": n, "requests": len(prompts),
                      "speedup_vs_batch_1": cost["tokens_per_s"] / results[1][1]["tokens_per_s"], "speedup_vs_naive": None}
            rows.append(b.row("stream", m, L, n, cost, scores, when))
    return rows


PARTS = {"free": part_free, "memorised": part_memorised, "memorised_short": part_memorised_short,
         "thresholds": part_thresholds, "couplets": part_couplets, "batch": part_batch,
         "stream": part_stream}  # in the order they run
TASKS = (set(PARTS) - {"couplets"}) | {f"couplets_{d}" for d in DIRECTIONS}  # the tasks' names in the rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--runs", type=Path, default=Path("runs/reversal"), help="benchmarks/reversal.py's --out")
    ap.add_argument("--gen-length", type=positive_int, default=256)
    ap.add_argument("--block-length", type=positive_int, default=32)
    ap.add_argument("--context", type=positive_int, default=128)
    ap.add_argument("--short-context", type=positive_int, default=32, help="prompt tokens of the memorised_short task")
    ap.add_argument("--prompts", type=positive_int, default=4)
    ap.add_argument("--short-prompts", type=positive_int, default=16, help="windows of memorised_short and of the sweep")
    ap.add_argument("--repeats", type=positive_int, default=3, help="runs per method; the fastest counts")
    ap.add_argument("--batch", type=positive_int, default=16)
    ap.add_argument("--stream-requests", type=positive_int, default=48, help="requests of the stream part")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "sampling.json",
                    help="the result file, merged into (its PNG goes beside it)")
    return ap.parse_args(argv)


@torch.no_grad()  # scoped, not set_grad_enabled(False): tests call main in their own process
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    names = ["mdm", "ar", *(f"bd{n}" for n in block_models(args.runs))]
    bench = Bench(args, {name: Pipeline.load(args.runs / name / "final") for name in names}, corpus_documents(args.runs))
    rows = previous_results("sampling", args.out).get("methods", [])
    for name, part in PARTS.items():
        if name in args.parts:
            rows = merge_rows(rows, part(bench))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    rows = [r for r in rows if r.get("task") in TASKS]
    write_result("sampling", settings, {"methods": rows}, out=args.out)
    write_block_rows(rows, args.out.parent / "block.json")


def write_block_rows(rows: list[dict], path: Path) -> None:
    """block.json's "methods" (INTERFACE.md): the block models' and the AR twin's rows (and the
    diffusion twin's best fast setting), with their block length and their tokens/s over the AR
    twin's KV decoding on the same task and batch; the file's other results and settings kept."""
    record = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"settings": {}, "results": {}}
    ar = {(r["task"], r["batch_size"]): r["tokens_per_s"] for r in rows if r["method"] == "ar_kv_cache"}
    methods = [r | {"block_length": block_length_of(r["method"]),
                    "speedup_vs_ar_kv": r["tokens_per_s"] / ar[(r["task"], r["batch_size"])]
                    if (r["task"], r["batch_size"]) in ar else None}
               for r in rows if r["method"].startswith(("block", "ar")) or r["method"] == "dual_threshold_0.9"]
    stamp = {"commit": record["commit"], "date": record["date"]} if "commit" in record else None  # its other parts' stamp
    write_result("block", record["settings"], record["results"] | {"methods": methods}, out=path, stamp=stamp)


if __name__ == "__main__":
    run_main(main)
