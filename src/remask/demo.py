"""The main job: pretrain a small masked diffusion LM on the 300 Tang poems (about eight minutes on
two CPU cores), then let it write poems, showing the denoising as it happens."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from remask.errors import RemaskError
from remask.sampling import SamplerConfig
from remask.train.config import TrainConfig

# Kept equal to recipes/demo.yaml (a test checks it).
DEMO_TRAINING = TrainConfig(
    data="builtin:tang300", out=Path("runs/demo"), objective="mdm", preset="demo", tokenizer="char",
    seq_len=128, batch_size=16, max_steps=1200, lr=2e-3, warmup_steps=100, decay_fraction=0.3,
    val_every=250, save_every=250, log_every=25, seed=0,
)
DEMO_SAMPLING = SamplerConfig(gen_length=96, steps=96, block_length=16, temperature=0.5,
                              remasking="low_confidence")
# New titles in the corpus's style, each with a poet of the collection.
DEMO_PROMPTS = ["《春夜思故人》\n作者：李白\n", "《秋日登高》\n作者：杜甫\n", "《山中送别》\n作者：王维\n",
                "《江上月夜》\n作者：孟浩然\n", "《边塞行》\n作者：王昌龄\n"]


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.jsonl").exists() or (path / "checkpoints").is_dir() or (path / "final").is_dir()


def demo(*, out: Path = DEMO_TRAINING.out, retrain: bool = False, samples: int = 3, seed: int = 0) -> Path:
    """Train (or reuse) the demo model, then generate `samples` poems with a live view."""
    if samples < 0:
        raise RemaskError("--samples must be >= 0")
    final = out / "final"
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if retrain and out.exists():
        if not is_run_dir(out):
            raise RemaskError(f"{out} exists and is not a remask run directory; refusing to delete it")
        shutil.rmtree(out)
    if final.is_dir():
        say(f"Reusing the trained demo model in {final} (pass --retrain to train it again).")
    else:
        from remask.train.pretrain import pretrain

        cfg = DEMO_TRAINING.replace(out=out, resume=True)
        say("Pretraining a masked diffusion LM on the 300 Tang poems (LLaDA objective, "
            f"{cfg.max_steps} steps of {cfg.batch_size}x{cfg.seq_len} characters).")
        say("An interrupted run resumes from its last checkpoint when you run the demo again.\n")
        pretrain(cfg)
    show_samples(final, samples, seed)
    say(f"\nThe model is in {final}. Try:\n"
        f"  remask generate --model {final} --prompt '《春晓》' --show\n"
        f"  remask info {final}")
    return final


def show_samples(model_dir: Path, samples: int, seed: int) -> None:
    from remask.display import DenoisingView
    from remask.pipeline import Pipeline

    pipe = Pipeline.load(model_dir)
    cfg = DEMO_SAMPLING
    for i, prompt in enumerate(DEMO_PROMPTS[:samples]):
        view = DenoisingView(pipe, cfg, prompt_len=len(pipe.encode_prompt(prompt)))
        if i == 0:
            print(f"\nEach poem starts as {cfg.gen_length} masks and is revealed over {cfg.steps} steps, "
                  f"{cfg.block_length} positions at a time from left to right.\n{view.legend()}")
        print(f"\n\x1b[1m{prompt.rstrip()}\x1b[0m" if view.colour else f"\n{prompt.rstrip()}")
        pipe.generate(prompt, cfg, seed=seed + i, on_step=view)
