"""Fast sampling against the reference sampler and the AR twin, on the same weights and prompts.

    python benchmarks/sampling.py [--parts train free memorised reversal batch thresholds]

Models (trained once by `--parts train`, kept under runs/sampling/): a diffusion model and its AR
twin (same recipe) pretrained on the Tang poems with their longest poems repeated so that they
know them by heart; for the reversal task, the models of benchmarks/reversal.py (runs/reversal/).

Tasks:
- free: 256 answer positions after real prompts (a held-out poem's title and author, 128-token
  context of poems before it); quality = agreement with the reference's text and the text's NLL
  per character under the AR twin;
- memorised: the rest of a known long poem (the first 128 tokens given, 256 to produce),
  scored by character accuracy against the true text;
- reversal: the poem reversal task (forward and backward accuracy) on benchmarks/reversal.py's models;
- batch: 16 prompts of mixed lengths at once against one at a time, same method;
- thresholds: quality against speed over confidence thresholds (a PNG).

Per method: forward passes, tokens per forward pass, useful tokens/s (generated tokens up to the
end-of-text, never prompt or padding), wall time, accuracy, and the speed-up over the reference
measured in the same run. Writes benchmarks/results/sampling.json (+ sampling_tradeoff.png).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import RESULTS_DIR, write_result

from remask.app.pipeline import Pipeline
from remask.data.corpora import tang300_poems
from remask.data.tokenize import split_documents
from remask.sampling import SamplerConfig, ar_generate, generate
from remask.sampling.autoregressive import ar_generate_cached
from remask.sampling.fast import generate_fast

REF = "reference"


@dataclass(frozen=True)
class Method:
    name: str
    sampler: SamplerConfig | None  # None: the AR twin
    fast: bool = True  # the fast sampler (False: the reference `generate`)
    cached: bool = True  # AR twin: with its KV cache


def methods(gen_length: int, block: int, thresholds=(0.9,)) -> list[Method]:
    base = SamplerConfig(gen_length=gen_length, steps=gen_length, block_length=block)
    out = [
        Method(REF, base, fast=False),
        Method("lossless", base),
        Method("prefix_cache", base.replace(cache="prefix")),
        Method("dual_cache", base.replace(cache="dual")),
    ]
    for t in thresholds:
        out += [Method(f"threshold_{t}", base.replace(parallel="threshold", threshold=t)),
                Method(f"dual_threshold_{t}", base.replace(cache="dual", parallel="threshold", threshold=t))]
    out += [Method("dual_factor_1", base.replace(cache="dual", parallel="factor", factor=1.0)),
            Method("dual_entropy_0.5", base.replace(cache="dual", parallel="entropy", entropy_bound=0.5)),
            Method("ar_kv_cache", None), Method("ar_no_cache", None, cached=False)]
    return out


def run_method(method: Method, pipe: Pipeline, ar: Pipeline, prompts: list[list[int]], gen_length: int,
               batch_size: int = 1) -> tuple[list[list[int]], dict]:
    """Answers (ids up to and including the end-of-text) and the cost figures."""
    answers, passes, wall = [], 0, 0.0
    target = ar if method.sampler is None else pipe
    stops = target.stop_ids()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), target.tokenizer.pad_id, dtype=torch.long)
        attention = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):], attention[r, width - len(p):] = torch.tensor(p), 1
        mask = None if batch_size == 1 else attention
        t0 = time.perf_counter()
        if method.sampler is None and method.cached:
            x, n = ar_generate_cached(target.model, ids, gen_length, vocab_size=target.model.config.vocab_size,
                                      eos_ids=stops, attention_mask=mask)
        elif method.sampler is None:
            calls = [0]

            def counted(i, a, _calls=calls):
                _calls[0] += 1
                return target.model_fn(i, a)

            x = ar_generate(counted, ids, gen_length, eos_ids=stops, attention_mask=mask)
            n = calls[0]
        elif method.fast:
            x, stats = generate_fast(target.model, ids, method.sampler, mask_id=target.tokenizer.mask_id,
                                     vocab_size=target.model.config.vocab_size, attention_mask=mask, eos_ids=stops)
            n = stats.forward_passes
        else:
            calls = [0]

            def counted(i, a, _calls=calls):
                _calls[0] += 1
                return target.model_fn(i, a)

            x = generate(counted, ids, method.sampler, mask_id=target.tokenizer.mask_id, attention_mask=mask,
                         eos_ids=stops)
            n = calls[0]
        wall += time.perf_counter() - t0
        passes += n
        for row in x[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            answers.append(row if end is None else row[:end + 1])
    useful = sum(len(a) - (1 if a and a[-1] in stops else 0) for a in answers)  # tokens before the end-of-text
    return answers, {"forward_passes": passes, "useful_tokens": useful, "wall_s": wall,
                     "tokens_per_s": useful / wall if wall else 0.0,
                     "tokens_per_forward": useful / passes if passes else 0.0}


def char_accuracy(produced: str, truth: str) -> float:
    """Fraction of the true text's characters reproduced at their position."""
    return sum(a == b for a, b in zip(produced, truth)) / max(1, len(truth))


@torch.no_grad()
def ar_nll_per_char(ar: Pipeline, prompt: list[int], answer_text: str) -> float:
    ids = ar.tokenizer.encode(answer_text)
    if not ids:
        return float("nan")
    seq = torch.tensor([prompt + ids])
    logp = torch.log_softmax(ar.model_fn(seq, None)[0, len(prompt) - 1:-1].double(), -1)
    return -logp.gather(-1, torch.tensor(ids)[:, None]).sum().item() / len(answer_text)


def free_prompts(pipe: Pipeline, count: int, context: int) -> list[list[int]]:
    """A held-out poem's title and author after `context` tokens of the poems before it."""
    poems = tang300_poems()
    docs = [p.text() for p in poems]
    _, val = split_documents(docs, 0.05)
    tok, out = pipe.tokenizer, []
    for i in val[:count]:
        before = [t for d in docs[max(0, i - 4):i] for t in [tok.bos_id, *tok.encode(d), tok.eos_id]][-context:]
        head = f"{poems[i].title}\n{poems[i].author}\n"
        out.append(before + [tok.bos_id, *tok.encode(head)])
    return out


def memorised_prompts(pipe: Pipeline, poems, context: int, length: int) -> tuple[list[list[int]], list[str]]:
    """The first `context` tokens of each long poem and its next `length` characters."""
    tok = pipe.tokenizer
    prompts, truths = [], []
    for poem in poems:
        ids = [tok.bos_id, *tok.encode(poem.text())]
        prompts.append(ids[:context])
        truths.append(tok.decode(ids[context:context + length]))
    return prompts, truths


def table(rows: list[dict], ref_speed: float) -> list[dict]:
    for r in rows:
        r["speedup_vs_naive"] = r["tokens_per_s"] / ref_speed if ref_speed else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["free", "memorised", "reversal", "batch", "thresholds"])
    ap.add_argument("--mdm", type=Path, default=Path("runs/sampling/mdm/final"))
    ap.add_argument("--ar", type=Path, default=Path("runs/sampling/ar/final"))
    ap.add_argument("--reversal-dir", type=Path, default=Path("runs/reversal"))
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    previous = RESULTS_DIR / "sampling.json"
    results = json.loads(previous.read_text())["results"] if previous.exists() else {}
    pipe, ar = Pipeline.load(args.mdm), Pipeline.load(args.ar)
    L, block = args.gen_length, args.block_length

    def evaluate(task: str, prompts: list[list[int]], score, method_list: list[Method]) -> list[dict]:
        rows, reference_answers = [], None
        for m in method_list:
            answers, cost = run_method(m, pipe, ar, prompts, L)
            if m.name == REF:
                reference_answers = answers
            texts = [(ar if m.sampler is None else pipe).tokenizer.decode(a) for a in answers]
            rows.append({"method": m.name, "task": task, "gen_length": L, "batch_size": 1, **cost,
                         "accuracy": score(texts, answers, reference_answers),
                         "sampler": None if m.sampler is None else m.sampler.to_dict()})
            print(f"{task:<10} {m.name:<22} {cost['forward_passes']:>6} passes {cost['tokens_per_forward']:6.2f} tok/pass "
                  f"{cost['tokens_per_s']:8.1f} tok/s acc {rows[-1]['accuracy']:.3f}", file=sys.stderr)
        ref_speed = next(r["tokens_per_s"] for r in rows if r["method"] == REF)
        return table(rows, ref_speed)

    all_rows = results.get("methods", [])
    if "free" in args.parts:
        prompts = free_prompts(pipe, args.prompts, args.context)

        def score_free(texts, answers, ref):
            agree = [sum(a == b for a, b in zip(x, r)) / max(1, len(r)) for x, r in zip(answers, ref or answers)]
            return sum(agree) / len(agree)

        rows = evaluate("free", prompts, score_free, methods(L, block))
        all_rows = [r for r in all_rows if r.get("task") != "free"] + rows
    if "memorised" in args.parts:
        long_poems = sorted(tang300_poems(), key=lambda p: -len(p.text()))[:args.prompts]
        prompts, truths = memorised_prompts(pipe, long_poems, args.context, L)

        def score_memorised(texts, answers, ref):
            return sum(char_accuracy(t, truth) for t, truth in zip(texts, truths)) / len(truths)

        rows = evaluate("memorised", prompts, score_memorised, methods(L, block))
        all_rows = [r for r in all_rows if r.get("task") != "memorised"] + rows
    results["methods"] = all_rows
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_result("sampling", settings, results)


if __name__ == "__main__":
    main()
