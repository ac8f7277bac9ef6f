"""Training benchmarks: the diffusion objective's cost against the AR twin's, validation after
equal tokens, 1-process vs 2-process DDP throughput, and uniform vs stratified diffusion times.

    python benchmarks/training.py [--parts cost validation ddp t_sampling] [--preset demo] [--steps 600]

- cost: the same model size and batches, full optimizer steps (masking + forward + backward +
  AdamW), MDM and AR timed in alternating rounds in one process; FLOP/s from the matmul count
  (3 x forward) against the matmul peak measured in the same run.
- validation: `remask pretrain` of both objectives on the Tang poems for the same number of
  steps (equal tokens); the MDM's figure is its likelihood bound, the AR's its exact NLL.
- ddp: tokens/s of the same run as 1 process and as 2 processes (torchrun, gloo).
- t_sampling: the MDM run of `validation` with t drawn per sequence (the paper) and stratified over
  the batch (`t_sampling: stratified`): step-to-step spread of the training loss, validation bound.
Writes benchmarks/results/training.json: the parts that ran are merged into an existing file, and
`results.measured` names each part's commit, date and settings (parts measured at different
commits keep their own). Method and discussion: docs/training.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS_DIR, ArgumentParser, add_training_arguments, positive_int, previous_results, run_main, stamp, write_result
from throughput import matmul_peak

from remask.app.plot import plot_runs
from remask.data.corpora import read_corpus
from remask.data.packing import PackedBatches, Stream, step_generator, training_rows
from remask.data.tokenize import corpus_tokenizer, prepare_tokens
from remask.model import build_model
from remask.train.config import CorpusData, ModelSection, OptimConfig, PretrainConfig, RunConfig
from remask.train.objectives import OBJECTIVES, Noise, TextBatch
from remask.train.optim import build_optimizer
from remask.train.pretrain import pretrain

SRC = Path(__file__).resolve().parents[1] / "src"


def cost(args) -> dict:
    """Alternate rounds of MDM and AR optimizer steps on identical batches."""
    data = CorpusData(source=args.data, seq_len=args.seq_len)
    docs = read_corpus(data.source)
    tok = corpus_tokenizer(data.source, docs, kind="char", vocab_size=data.vocab_size)
    splits = prepare_tokens(data.source, docs, tok)
    packed = PackedBatches(training_rows(splits.train, data.seq_len, "concat", bos_id=tok.bos_id, eos_id=tok.eos_id),
                           args.batch_size, seed=0)
    model_cfg = ModelSection(preset=args.preset).build(tok.special_ids, tok.vocab_size)
    runs = {}
    for objective in ("mdm", "ar"):
        model = build_model(model_cfg.replace(attention="causal" if objective == "ar" else "full"), seed=0)
        opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
        runs[objective] = (model, opt)
    times = {"mdm": [], "ar": []}
    for round_ in range(args.rounds):
        for objective in ("mdm", "ar") if round_ % 2 == 0 else ("ar", "mdm"):
            model, opt = runs[objective]
            for i in range(args.steps_per_round):
                step = round_ * args.steps_per_round + i
                start = time.perf_counter()
                loss_fn = OBJECTIVES[("pretrain", objective)]
                inputs = loss_fn.make_inputs(TextBatch(packed.batch(step)), Noise(tok.mask_id),
                                             step_generator(0, step, Stream.MASKS))
                loss_fn.loss(model, inputs).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if round_ > 0:  # round 0 is warm-up
                    times[objective].append(time.perf_counter() - start)
    tokens = args.batch_size * data.seq_len
    flops_per_step = 3 * model_cfg.flops_per_token(data.seq_len) * tokens
    peak = matmul_peak("cpu", torch.float32, 1024)
    out = {"matmul_peak_flops_per_s": peak, "parameters": model_cfg.num_parameters()}
    for objective, ts in times.items():
        median = sorted(ts)[len(ts) // 2]
        out[objective] = {"tokens_per_s": tokens / median, "flops_per_s": flops_per_step / median,
                          "fraction_of_peak": flops_per_step / median / peak, "median_step_s": median}
    out["mdm_over_ar_cost"] = out["mdm"]["median_step_s"] / out["ar"]["median_step_s"]
    return out


def validation(args, root: Path) -> dict:
    out = {}
    for objective in ("mdm", "ar"):
        cfg = PretrainConfig(
            objective=objective, model=ModelSection(preset=args.preset),
            data=CorpusData(source=args.data, seq_len=args.seq_len),
            optim=OptimConfig(batch_size=args.batch_size, max_steps=args.steps, lr=2e-3, warmup_steps=50,
                              decay_fraction=0.3),
            run=RunConfig(out=root / objective, val_every=max(1, args.steps // 4), save_every=args.steps, log_every=25,
                          progress=False))
        start = time.perf_counter()
        pretrain(cfg)
        rows = [json.loads(ln) for ln in (cfg.run.out / "metrics.jsonl").read_text().splitlines()]
        val = [r for r in rows if "val_loss" in r]
        out[objective] = {"val_loss": val[-1]["val_loss"], "val_ppl": val[-1]["val_ppl"], "tokens": val[-1]["tokens"],
                          "curve": [[r["tokens"], r["val_loss"]] for r in val],
                          "wall_s": time.perf_counter() - start}
    out["plot"] = str(plot_runs([root / "mdm", root / "ar"], RESULTS_DIR / "training_loss.png").relative_to(RESULTS_DIR.parent.parent))
    out["note"] = ("val_loss in nats per token on the held-out poems: for the MDM an upper bound on the NLL "
                   "(fixed-mask Monte-Carlo estimate of eq. 3), for the AR twin its exact NLL")
    return out


def t_sampling(args, root: Path) -> dict:
    """The same MDM run with each sequence's t drawn independently (the paper) and stratified over the
    batch (config t_sampling): the training loss's spread from step to step and the validation bound."""
    out = {}
    for mode in ("uniform", "stratified"):
        cfg = PretrainConfig(
            objective="mdm", t_sampling=mode, model=ModelSection(preset=args.preset),
            data=CorpusData(source=args.data, seq_len=args.seq_len),
            optim=OptimConfig(batch_size=args.batch_size, max_steps=args.steps, lr=2e-3, warmup_steps=50,
                              decay_fraction=0.3),
            run=RunConfig(out=root / mode, val_every=max(1, args.steps // 4), save_every=args.steps, log_every=1,
                          progress=False))
        pretrain(cfg)
        rows = [json.loads(ln) for ln in (cfg.run.out / "metrics.jsonl").read_text().splitlines()]
        val = [r for r in rows if "val_loss" in r]
        losses = torch.tensor([r["loss"] for r in rows])
        # spread around a running mean (21 steps), so that the downward trend does not count as noise
        smooth = torch.nn.functional.avg_pool1d(losses[None, None], 21, stride=1, padding=10,
                                                count_include_pad=False)[0, 0]
        out[mode] = {"val_loss": val[-1]["val_loss"], "curve": [[r["tokens"], r["val_loss"]] for r in val],
                     "train_loss_last_quarter": losses[-len(losses) // 4:].mean().item(),
                     "train_loss_spread": (losses - smooth).std().item()}
    out["val_loss_stratified_minus_uniform"] = out["stratified"]["val_loss"] - out["uniform"]["val_loss"]
    out["spread_ratio"] = out["stratified"]["train_loss_spread"] / out["uniform"]["train_loss_spread"]
    out["note"] = ("same seed, data, batches and masks' uniform numbers; only the diffusion times differ. val_loss: "
                   "the MDM's bound in nats/token on the held-out poems (each run's own estimator, both unbiased)")
    return out


DDP_RUN = """
import sys
from pathlib import Path
from remask.train.config import CorpusData, ModelSection, OptimConfig, PretrainConfig, RunConfig
from remask.train.pretrain import pretrain
pretrain(PretrainConfig(model=ModelSection(preset=sys.argv[3]), data=CorpusData(source=sys.argv[1], seq_len=int(sys.argv[4])),
                        optim=OptimConfig(batch_size=int(sys.argv[5]), max_steps=int(sys.argv[6])),
                        run=RunConfig(out=Path(sys.argv[2]), log_every=5, val_every=10**6, save_every=10**6,
                                      progress=False, device="cpu")))
"""


def ddp(args, root: Path) -> dict:
    out = {}
    for procs in (1, 2):
        run = root / f"ddp{procs}"
        script = [args.data, str(run), args.preset, str(args.seq_len), str(args.batch_size), str(args.ddp_steps)]
        env = os.environ | {"PYTHONPATH": str(SRC)}
        if procs == 1:
            cmd = [sys.executable, "-c", DDP_RUN, *script]
        else:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // procs))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                   "--no-python", sys.executable, "-c", DDP_RUN, *script]
        subprocess.run(cmd, env=env, check=True)
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()][1:]  # skip warm-up
        out[f"{procs}_process"] = {"tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows)}
    out["speedup_2_over_1"] = out["2_process"]["tokens_per_s"] / out["1_process"]["tokens_per_s"]
    out["cores"] = os.cpu_count()
    return out


PART_SETTINGS = {"cost": ("rounds", "steps_per_round"), "validation": ("steps",), "ddp": ("ddp_steps",),
                 "t_sampling": ("steps",)}  # beside data, preset, seq_len and batch_size, which every part reads


def run_part(part: str, args, tmp: Path) -> dict:
    """The results a part adds (cost's figures sit at the top level, as the interface has them)."""
    if part == "cost":
        return cost(args)
    return {part: {"validation": validation, "ddp": ddp, "t_sampling": t_sampling}[part](args, tmp / part)}


def main() -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=list(PART_SETTINGS), choices=list(PART_SETTINGS))
    add_training_arguments(ap, data="builtin:tang300", preset="demo")
    ap.add_argument("--steps", type=positive_int, default=600, help="training steps per objective for validation")
    ap.add_argument("--rounds", type=positive_int, default=7)
    ap.add_argument("--steps-per-round", type=positive_int, default=4)
    ap.add_argument("--ddp-steps", type=positive_int, default=40)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = previous_results("training")
    measured = results.pop("measured", {})
    settings = dict(vars(args)) | {"threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        for part in [p for p in PART_SETTINGS if p in args.parts]:
            results |= run_part(part, args, Path(tmp))
            keys = ("data", "preset", "seq_len", "batch_size", *PART_SETTINGS[part], "threads")
            measured[part] = stamp() | {"settings": {k: settings[k] for k in keys}}
    write_result("training", settings, results | {"measured": measured})


if __name__ == "__main__":
    run_main(main)
