"""The main job: pretrain a small masked diffusion LM on the 300 Tang poems (about eight minutes on
two CPU cores), then let it write poems, showing the denoising as it happens."""

from __future__ import annotations

import sys
from pathlib import Path

from remask.atomic import remove_dir
from remask.errors import RemaskError
from remask.sampling import SamplerConfig
from remask.train.config import CorpusData, ModelSection, OptimConfig, PretrainConfig, RunConfig, config_replace

# Kept equal to recipes/demo.yaml (a test checks it).
DEMO_TRAINING = PretrainConfig(
    objective="mdm",
    model=ModelSection(preset="demo"),
    data=CorpusData(source="builtin:tang300", tokenizer="char", seq_len=128, packing="pad"),
    optim=OptimConfig(batch_size=16, max_steps=800, lr=2e-3, warmup_steps=100, decay_fraction=0.3),
    run=RunConfig(out=Path("runs/demo"), val_every=100, save_every=200, log_every=25, seed=0, final="last"),
)
# Chosen by benchmarks/demo.py (results/demo_sampler_grid.json, demo.json): an end-of-text fixed at the
# last position (anchor_eos) asks the EOS-padded model for a poem that ends within the 96 positions,
# so none is cut off at the limit; random remasking inside blocks of 4, left to right, at
# temperature 0.7 keeps low-confidence remasking's repetition away and reads best to the AR twin
# of the settings that meet the demo's targets.
DEMO_SAMPLING = SamplerConfig(gen_length=96, steps=96, block_length=4, temperature=0.7, remasking="random",
                              anchor_eos=True)
# New titles in the corpus's style, each with a poet of the collection.
DEMO_PROMPTS = ["《春夜思故人》\n作者：李白\n", "《秋日登高》\n作者：杜甫\n", "《山中送别》\n作者：王维\n",
                "《江上月夜》\n作者：孟浩然\n", "《边塞行》\n作者：王昌龄\n"]


def sampler_flags(sampler: SamplerConfig) -> list[str]:
    """The command-line options that give `sampler` (those that differ from the defaults)."""
    default, flags = SamplerConfig(), []
    for name, value in sampler.to_dict().items():
        if value == getattr(default, name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.jsonl").exists() or (path / "checkpoints").is_dir() or (path / "final").is_dir()


def demo(*, out: Path = DEMO_TRAINING.run.out, retrain: bool = False, samples: int = 3, seed: int = 0) -> Path:
    """Train (or reuse) the demo model, then generate `samples` poems with a live view."""
    if not isinstance(samples, int) or samples < 0:
        raise RemaskError(f"--samples must be an integer >= 0, got {samples!r}")
    final = out / "final"
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if out.exists() and not out.is_dir():
        raise RemaskError(f"run directory {out} exists and is not a directory")
    if retrain and out.exists():
        if not is_run_dir(out):
            raise RemaskError(f"{out} exists and is not a remask run directory; refusing to delete it")
        remove_dir(out)
    if final.is_dir():
        say(f"Reusing the trained demo model in {final} (pass --retrain to train it again).")
    else:
        from remask.train.pretrain import pretrain

        cfg = config_replace(DEMO_TRAINING, **{"run.out": out, "run.resume": True})
        say("Pretraining a masked diffusion LM on the 300 Tang poems (LLaDA objective, "
            f"{cfg.optim.max_steps} steps of {cfg.optim.batch_size}x{cfg.data.seq_len} characters).")
        say("An interrupted run resumes from its last checkpoint when you run the demo again.\n")
        pretrain(cfg)
    say(kept_message(final))
    show_samples(final, samples, seed)
    say(f"\nThe model is in {final}. Try (with the demo's sampler settings):\n"
        f"  remask generate --model {final} --prompt '《春晓》' {' '.join(sampler_flags(DEMO_SAMPLING))} --show\n"
        f"  remask info {final}")
    return final


def kept_message(final: Path) -> str:
    """Which training step final/ holds (run.final: the last step, or the best validation bound)."""
    from remask.checkpoint.model_dir import read_training_note

    note = read_training_note(final)
    if "step" not in note:
        return f"Using the model in {final}."
    step, val, last = note["step"], note.get("val_loss"), note.get("max_steps")
    if note.get("kept") == "last" or val is None:
        bound = f", validation bound {val:.3f} nats/token" if val is not None else ""
        return f"Using the model of step {step} (the last step{bound})."
    if step == last:
        return f"Using the model of the last step, {step}: it has the lowest validation bound, {val:.3f} nats/token."
    return (f"Using the model of step {step} of {last}: the lowest validation bound, "
            f"{val:.3f} nats/token (later steps fit the training poems more but new text less).")


def show_samples(model_dir: Path, samples: int, seed: int) -> None:
    from remask.app.display import DenoisingView
    from remask.pipeline import Pipeline

    pipe = Pipeline.load(model_dir)
    sampler = DEMO_SAMPLING
    for i, prompt in enumerate(DEMO_PROMPTS[:samples]):
        view = DenoisingView(pipe.tokenizer, pipe.stop_ids(), sampler)
        if i == 0:
            order = ("anywhere in the poem" if sampler.block_length is None
                     else f"{sampler.block_length} positions at a time from left to right")
            ending = ("the last of them is an end-of-text from the start, so the poem ends within them, "
                      "where the model puts its own end-of-text" if sampler.anchor_eos
                      else "it ends where the model puts an end-of-text")
            print(f"\nEach poem starts as {sampler.gen_length} masks and is revealed over at most {sampler.steps} steps, "
                  f"{order}; {ending}.\n{view.legend()}")
        print(f"\n\x1b[1m{prompt.rstrip()}\x1b[0m" if view.colour else f"\n{prompt.rstrip()}")
        pipe.generate(prompt, sampler, seed=seed + i, on_step=view)
