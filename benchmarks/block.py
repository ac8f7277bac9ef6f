"""Block diffusion against its two ends: the likelihood table, what a conversion costs, and the
training cost per token.

    python benchmarks/block.py [--parts train nelbo convert cost] [--out runs/block] [--steps 2000]

- train: one corpus, one model size, one token budget: the AR twin, the full diffusion model and
  block models of L' = 4, 8, 16 pretrained from scratch (`remask pretrain` with the same data,
  batches, schedule and seed); then the block model of L' = 8 started from the trained AR twin and
  from the trained diffusion model (`--model.init-from`), fine-tuned for `--convert-steps`. Every
  run resumes where it stopped (rerun the command after an interruption).
- nelbo: the same held-out windows (seq_len tokens of the validation split, evenly spaced; the
  first token is the context, the rest scored) through the project's Scorer: the AR twin's exact
  NLL, each block model's NELBO and the diffusion model's bound, in nats per token with standard
  errors (BD3-LM table 3's comparison).
- convert: the NELBO along each conversion's checkpoints and along the scratch L' = 8 run's, and
  the steps (and seconds) each needs to reach the scratch model's final value.
- twins (not in the default parts): the reversal benchmark's diffusion twin (runs/reversal) converted
  to block models of L' = 4, 8, 16 on its own corpus, for the sampling benchmarks.
- clip (not in the default parts): the diffusion model and the block models trained again with t
  drawn from --clip-range (BD3-LM's clipped schedule), each scored beside its unclipped run as in
  nelbo (the bound: t on [0, 1]).
- cost: full optimizer steps (masking + forward + backward + AdamW) of every objective on identical
  batches, timed in alternating rounds in one process: tokens/s and the cost per token against
  the diffusion model's.
Writes benchmarks/results/block.json (the parts that ran are merged into an existing file;
benchmarks/sampling.py adds the decoding rows of the block models and the AR twin as "methods").
Method and discussion: docs/block.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _common import ArgumentParser, add_training_arguments, metrics_seconds, positive_int, previous_results, run_main, stamp, write_result

from remask.checkpoint import load_model
from remask.data.corpora import read_corpus
from remask.data.packing import PackedBatches, Stream, step_generator, training_rows
from remask.data.tokenize import corpus_tokenizer, prepare_tokens
from remask.eval.scoring import Scorer, ScoringConfig
from remask.model import build_model
from remask.tokenizer import Tokenizer
from remask.train.config import CorpusData, ModelSection, OptimConfig, PretrainConfig, RunConfig
from remask.train.objectives import OBJECTIVES, Noise, TextBatch
from remask.train.optim import build_optimizer
from remask.train.pretrain import pretrain, validation_rows
from remask.train.setup import run_layout

BLOCKS = (4, 8, 16)
SCRATCH = {"ar": ("ar", None), "mdm": ("mdm", None)} | {f"bd{n}": ("bd", n) for n in BLOCKS}
CONVERSIONS = {"ar-to-bd8": "ar", "mdm-to-bd8": "mdm"}  # run -> the trained model it starts from
CLIP_BASES = ("mdm", "bd4", "bd8", "bd16")  # the scratch runs the clip part trains again with t on --clip-range


def clipped(name: str) -> str:
    """The run that repeats scratch run `name` with t drawn from --clip-range (BD3-LM's clipped schedule)."""
    return f"{name}-clip"


def run_config(args, name: str) -> PretrainConfig:
    """The pretraining config of one run: scratch runs share everything but the objective (a
    clipped run, `clipped(name)`, the range of t as well)."""
    if name.endswith("-clip"):
        base = run_config(args, name.removesuffix("-clip"))
        return base.replace(t_min=args.clip_range[0], t_max=args.clip_range[1], run=base.run.replace(out=Path(args.out) / name))
    if name in SCRATCH:
        objective, block = SCRATCH[name]
        model, steps, every = ModelSection(preset=args.preset), args.steps, max(1, args.steps // 8)
    else:
        objective, block = "bd", 8
        model = ModelSection(init_from=Path(args.out) / CONVERSIONS[name] / "final")
        steps, every = args.convert_steps, max(1, args.convert_steps // 6)
    return PretrainConfig(
        objective=objective, block_length=block, t_sampling="stratified", model=model,
        data=CorpusData(source=args.data, seq_len=args.seq_len, short_batch_prob=0.0),
        optim=OptimConfig(batch_size=args.batch_size, max_steps=steps, lr=args.lr, warmup_steps=min(100, steps // 10),
                          decay_fraction=0.3),
        run=RunConfig(out=Path(args.out) / name, seed=0, val_every=10**9, save_every=every, keep_checkpoints=100,
                      log_every=25, resume=True, progress=args.progress))


def twins(args) -> dict:
    """The reversal benchmark's diffusion twin converted to block models of each --twin-blocks (its
    own conversion config: benchmarks/reversal_train.block_config), for benchmarks/sampling.py."""
    import reversal
    from reversal_train import block_config

    recipe = reversal.load(reversal.RECIPE, [f"benchmark.out={args.twins}", f"benchmark.block_steps={args.twin_steps}"])
    seconds = {}
    for block in args.twin_blocks:
        cfg = block_config(recipe, f"bd{block}", Path(args.twins) / "corpus.txt")
        if not (cfg.run.out / "final").is_dir():
            pretrain(cfg)
        seconds[f"bd{block}"] = metrics_seconds(cfg.run.out)
    return {"pretrain_seconds": seconds, "steps": args.twin_steps, "from": str(Path(args.twins) / "mdm" / "final")}


def train(args) -> dict:
    """Every run, in order (conversions after the models they start from); seconds each took."""
    seconds = {}
    for name in [*SCRATCH, *CONVERSIONS]:
        cfg = run_config(args, name)
        if (cfg.run.out / "final").is_dir():
            continue
        start = time.perf_counter()
        pretrain(cfg)
        seconds[name] = time.perf_counter() - start
    return {"seconds_this_call": seconds}


def held_out(args) -> tuple[Tokenizer, list[tuple[list[int], list[int]]]]:
    """The windows every model scores: (first token, the rest) of seq_len-token rows of the held-out split."""
    tok = Tokenizer.from_dir(Path(args.out) / "ar" / "final")
    docs = read_corpus(args.data)
    splits = prepare_tokens(args.data, docs, tok, val_fraction=CorpusData().val_fraction)
    rows = validation_rows(splits.val, args.seq_len, args.windows)
    return tok, [(r[:1].tolist(), r[1:].tolist()) for r in rows]


def score(directory: Path, windows, args) -> dict:
    """nats per token (with its standard error) of the windows under the model in `directory`."""
    model = load_model(directory).eval()
    tok = Tokenizer.from_dir(directory if (directory / "tokenizer.json").exists() else Path(args.out) / "ar" / "final")
    torch.manual_seed(0)
    scorer = Scorer(model, mask_id=tok.mask_id, bos_id=tok.bos_id,
                    scoring=ScoringConfig(mc_num=args.mc_num, batch_size=min(args.mc_num, 32)))
    scores = scorer.score(windows)
    tokens = sum(s.tokens for s in scores)
    nll = -sum(s.log_likelihood for s in scores)
    stderr = sum(s.stderr**2 for s in scores) ** 0.5
    return {"nats_per_token": nll / tokens, "stderr": stderr / tokens, "tokens": tokens,
            "measure": "exact NLL" if model.config.causal else "upper bound (NELBO)",
            "attention": model.config.attention, "block_length": model.config.block_length}


def order(ar: float, blocks: list[float], diffusion: float) -> dict:
    """Whether the block models' values (by block length, ascending) lie between the AR twin's and
    the diffusion model's, and whether all of them rise from AR through the blocks to diffusion."""
    ordered = [ar, *blocks, diffusion]
    return {"between_ar_and_diffusion": all(ar <= v <= diffusion for v in blocks), "monotone_in_block_length": ordered == sorted(ordered)}


def nelbo(args) -> dict:
    """{"nelbo": one row per model (INTERFACE.md: model, block_length, nats_per_token, stderr), "nelbo_info"}."""
    _, windows = held_out(args)
    table = {name: score(Path(args.out) / name / "final", windows, args) for name in SCRATCH}
    rows = [{"model": SCRATCH[name][0], "run": name} | values for name, values in table.items()]
    info = {"windows": len(windows)} | order(table["ar"]["nats_per_token"], [table[f"bd{n}"]["nats_per_token"] for n in BLOCKS],
                                              table["mdm"]["nats_per_token"]) | {
            "note": "nats per token on the same held-out windows; the AR twin's value is exact, the others "
                    "upper bounds estimated by Monte Carlo (exact enumeration where no dearer)"}
    return {"nelbo": rows, "nelbo_info": info}


def clip(args) -> dict:
    """Each of --clip-runs trained again with t on --clip-range, against itself trained with t on
    [0, 1]: the NELBO of both (the bound, t on [0, 1]) on the nelbo part's windows, and whether the
    clipped block models lie between the AR twin's NLL and the clipped diffusion model's bound."""
    for base in args.clip_runs:
        cfg = run_config(args, clipped(base))
        if not (cfg.run.out / "final").is_dir():
            pretrain(cfg)
    _, windows = held_out(args)
    names = [n for base in args.clip_runs for n in (base, clipped(base))]
    rows = {name: score(Path(args.out) / name / "final", windows, args) for name in names}
    gain = {base: rows[clipped(base)]["nats_per_token"] - rows[base]["nats_per_token"] for base in args.clip_runs}
    out = {"t_range": list(args.clip_range), "windows": len(windows), "nelbo": rows, "clipped_minus_unclipped": gain,
           "train_seconds": {name: metrics_seconds(Path(args.out) / name) for name in names}}
    if set(args.clip_runs) == set(CLIP_BASES):
        ar = score(Path(args.out) / "ar" / "final", windows, args)["nats_per_token"]
        out |= {"ar_nats_per_token": ar} | order(ar, [rows[clipped(f"bd{n}")]["nats_per_token"] for n in BLOCKS],
                                                 rows[clipped("mdm")]["nats_per_token"])
    return out


def curve(run: Path, windows, args) -> list[dict]:
    """The NELBO at each kept checkpoint of a run and at its final model, with the run's seconds."""
    points = sorted((int(p.name.removeprefix("step-")), p) for p in (run / "checkpoints").glob("step-*"))
    return [{"step": step, "seconds": metrics_seconds(run, step)} | score(path, windows, args) for step, path in points]


def convert(args) -> dict:
    _, windows = held_out(args)
    windows = windows[: max(1, len(windows) // 2)]
    scratch = curve(Path(args.out) / "bd8", windows, args)
    target = scratch[-1]["nats_per_token"]
    out = {"scratch_bd8": scratch, "target_nats_per_token": target, "windows": len(windows)}
    for name in CONVERSIONS:
        points = curve(Path(args.out) / name, windows, args)
        reached = next((p for p in points if p["nats_per_token"] <= target), None)
        out[name] = {"curve": points, "steps_to_target": None if reached is None else reached["step"],
                     "scratch_steps": scratch[-1]["step"]}
    return out


def cost(args) -> dict:
    """`cost_at` for each of --cost-presets."""
    return {preset: cost_at(args, preset) for preset in args.cost_presets}


def cost_at(args, preset: str) -> dict:
    """Alternating rounds of optimizer steps of every objective on identical batches."""
    torch.manual_seed(0)
    docs = read_corpus(args.data)
    tok = corpus_tokenizer(args.data, docs, kind="char", vocab_size=CorpusData().vocab_size)
    rows = training_rows(prepare_tokens(args.data, docs, tok).train, args.seq_len, "concat", bos_id=tok.bos_id,
                         eos_id=tok.eos_id)
    packed = PackedBatches(rows, args.batch_size, seed=0)
    base = ModelSection(preset=preset).build(tok.special_ids, tok.vocab_size)
    runs = {}
    for name, (objective, block) in SCRATCH.items():
        model = build_model(base.replace(**run_layout(objective, block, base)), seed=0)
        runs[name] = (objective, model, build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95)))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, (objective, model, opt) in runs.items():
            noise = Noise(tok.mask_id, block_length=model.config.block_length)
            for i in range(4):
                step = round_ * 4 + i
                start = time.perf_counter()
                inputs = OBJECTIVES[("pretrain", objective)].make_inputs(
                    TextBatch(packed.batch(step)), noise, step_generator(0, step, Stream.MASKS))
                OBJECTIVES[("pretrain", objective)].loss(model, inputs).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times[name].append(time.perf_counter() - start)
    tokens = args.batch_size * args.seq_len
    out = {name: {"median_step_s": sorted(ts)[len(ts) // 2], "tokens_per_s": tokens / sorted(ts)[len(ts) // 2]}
           for name, ts in times.items()}
    for name in out:
        out[name]["cost_per_token_over_mdm"] = out[name]["median_step_s"] / out["mdm"]["median_step_s"]
    return out


PARTS = {"train": train, "nelbo": nelbo, "convert": convert, "cost": cost, "twins": twins, "clip": clip}


def main() -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=["train", "nelbo", "convert", "cost"])
    parser.add_argument("--out", default="runs/block", help="where the runs live")
    add_training_arguments(parser, data="builtin:shakespeare", preset="tiny")
    parser.add_argument("--steps", type=positive_int, default=2000, help="pretraining steps of every scratch run")
    parser.add_argument("--convert-steps", type=positive_int, default=600)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--windows", type=positive_int, default=64, help="held-out windows scored")
    parser.add_argument("--mc-num", type=positive_int, default=64, help="Monte-Carlo draws per window")
    parser.add_argument("--clip-range", type=float, nargs=2, default=[0.3, 0.8], metavar=("T_MIN", "T_MAX"),
                        help="clip: the range of t the clipped runs train on")
    parser.add_argument("--clip-runs", nargs="+", choices=CLIP_BASES, default=list(CLIP_BASES),
                        help="clip: the scratch runs trained again with the clipped range")
    parser.add_argument("--rounds", type=positive_int, default=5, help="cost: rounds of 4 steps per objective")
    parser.add_argument("--cost-presets", nargs="+", default=["tiny", "demo"], help="cost: the model sizes timed")
    parser.add_argument("--twins", default="runs/reversal", help="twins: the reversal benchmark's runs")
    parser.add_argument("--twin-steps", type=positive_int, default=1200, help="twins: conversion steps")
    parser.add_argument("--twin-blocks", type=positive_int, nargs="+", default=list(BLOCKS))
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--result", type=Path, default=None, help="result file (default benchmarks/results/block.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = previous_results("block", args.result)
    settings = {k: v for k, v in vars(args).items() if k not in ("result", "progress")}
    for part in args.parts:
        out = PARTS[part](args)
        key = f"{part}_info" if part == "nelbo" else part
        if part == "nelbo":  # the interface's list of rows, and what the table's rows share
            results["nelbo"] = out["nelbo"]
            out = out["nelbo_info"]
        results[key] = out | {"measured": stamp() | {"settings": settings}}
    write_result("block", settings, results, args.result)
    return 0


if __name__ == "__main__":
    run_main(main)
