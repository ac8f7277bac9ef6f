"""The sampling benchmark's methods, prompts and scores (benchmarks/sampling.py runs them): which
samplers are compared, which windows of the training documents each task reads, how answers are
scored, and the threshold sweep's plot. Method and results: docs/sampling.md."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from remask.data.corpora import tang300_poems
from remask.errors import RemaskError
from remask.pipeline import Pipeline
from remask.sampling import SamplerConfig
from remask.sampling.engine import Engine

REF = "reference"


@dataclass(frozen=True)
class Method:
    name: str
    sampler: SamplerConfig | None  # None: the AR twin
    fast: bool = True  # the fast sampler (False: the reference `generate`)
    cached: bool = True  # AR twin: with its KV cache
    model: str = "mdm"  # whose answers: mdm (the diffusion twin), ar, or bdN (a block model of L' = N)
    plain: bool = False  # AR twin: a plain KV-cache loop (the baseline remask's own decoding must beat)


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
            Method("ar_kv_cache", None, model="ar"), Method("ar_no_cache", None, cached=False, model="ar"),
            Method("ar_plain_kv_loop", None, model="ar", plain=True)]
    return out


def block_methods(gen_length: int, blocks: list[int], thresholds=(0.5, 0.7, 0.9)) -> list[Method]:
    """Each block model (its exact cache always on): one token per step, threshold decoding and the
    factor rule inside its blocks."""
    base = SamplerConfig(gen_length=gen_length, steps=gen_length)
    out = []
    for n in blocks:
        out.append(Method(f"block{n}_one_per_step", base, model=f"bd{n}"))
        out += [Method(f"block{n}_threshold_{t}", base.replace(parallel="threshold", threshold=t), model=f"bd{n}")
                for t in thresholds]
        out.append(Method(f"block{n}_factor_1", base.replace(parallel="factor", factor=1.0), model=f"bd{n}"))
    return out


def block_length_of(method: str) -> int | None:
    """The block length of a block model's method (`block8_threshold_0.9` -> 8), else None."""
    head = method.split("_")[0]
    return int(head[5:]) if head.startswith("block") and head[5:].isdigit() else None


def block_models(runs: Path) -> list[int]:
    """The block lengths of the block models beside the twins (benchmarks/block.py --parts twins)."""
    return sorted(int(p.parent.name[2:]) for p in Path(runs).glob("bd*/final") if p.parent.name[2:].isdigit())


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


def best_of(name: str, repeats: int, once) -> tuple[list, dict]:
    """`once()`'s answers and cost, its wall time the least of `repeats` runs (this machine is
    shared and noisy), which must give the same answers."""
    first, wall = None, float("inf")
    for _ in range(repeats):
        answers, cost = once()
        if first is not None and answers != first[0]:
            raise RemaskError(f"{name} gave different answers on a repeated run")
        first = first or (answers, cost)
        wall = min(wall, cost["wall_s"])
    answers, cost = first
    cost |= {"wall_s": wall, "tokens_per_s": cost["useful_tokens"] / wall if wall else 0.0, "repeats": repeats}
    return answers, cost


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
        raise RemaskError(f"{run_dir / 'mdm' / 'final'} records no pretraining length (retrain with benchmarks/reversal.py)")
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
        raise RemaskError(f"no training document holds {min_tokens} tokens (benchmarks/reversal.py --set benchmark.long_poems=N)")
    per = -(-count // len(long))
    prompts, truths = [], []
    for j in range(per):
        for ids in long:
            o = round((j + shift) * (len(ids) - context - length) / per)
            prompts.append(ids[o:o + context])
            truths.append(tok.decode(ids[o + context:o + context + length]))
    return prompts[:count], truths[:count]


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


def task_settings(args: dict, task: str) -> dict:
    """The options a task's rows were measured under (the sampler aside, which each row names)."""
    keys = {"free": ("context", "prompts"), "memorised": ("context", "prompts"),
            "memorised_short": ("short_context", "short_prompts", "context", "gen_length"),
            "thresholds": ("short_context", "short_prompts", "context", "gen_length"),
            "batch": ("batch",), "stream": ("batch", "stream_requests")}.get(task, ())
    return {"runs": str(args["runs"]), "repeats": args["repeats"]} | {k: args[k] for k in keys}


def model_of(runs: Path | str, method: Method) -> str:
    """The model directory a method's answers come from."""
    return str(Path(runs) / method.model / "final")


def until_stop(answer: list[int], stops: list[int]) -> list[int]:
    """An answer up to its first end-of-text, included."""
    end = next((i for i, t in enumerate(answer) if t in stops), None)
    return answer if end is None else answer[:end + 1]


def useful_tokens(answers: list[list[int]], stops: list[int]) -> int:
    """The answers' tokens before their end-of-text."""
    return sum(len(a) - (1 if a and a[-1] in stops else 0) for a in answers)


def run_stream(method: Method, pipe: Pipeline, prompts: list[list[int]], in_flight: int,
               repeats: int) -> tuple[list[list[int]], dict]:
    """The prompts as requests to one engine, at most `in_flight` rows at once, the next joining
    as a row ends (a server's continuous batching): answers in the prompts' order, the cost, and
    the rows a step carried on average."""
    stops = pipe.stop_ids()

    def once():
        engine = Engine(pipe.model, mask_id=pipe.tokenizer.mask_id, vocab_size=pipe.model.config.vocab_size, eos_ids=stops)
        queue, rows, row_steps, steps = list(prompts), [], 0, 0
        t0 = time.perf_counter()
        while queue or engine.active:
            while queue and engine.active < in_flight:
                rows.append(engine.add(queue.pop(0), method.sampler))
            row_steps, steps = row_steps + engine.active, steps + 1
            engine.step()
        wall = time.perf_counter() - t0
        answers = [until_stop(r.result().answer, stops) for r in rows]
        return answers, cost_of(engine.stats.forward_passes, useful_tokens(answers, stops), wall) | {
            "steps": steps, "row_steps": row_steps, "rows_per_step": row_steps / steps}
    answers, cost = best_of(method.name, repeats, once)
    return answers, cost | {"ms_per_row_step": cost["wall_s"] / cost["row_steps"] * 1e3}


def agreement(answers: list[list[int]], reference: list[list[int]]) -> float:
    """Mean fraction of each reference answer's tokens reproduced at their position."""
    return statistics.fmean(sum(a == b for a, b in zip(x, r)) / max(1, len(r)) for x, r in zip(answers, reference))
