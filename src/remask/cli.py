"""`remask <command>`: one CLI over the library.

Each command is a dataclass of typed options (parsed by tyro: `--gen-length`, `--json`) and a
`run_*` function that calls the library. Bad input -> one `error:` line on stderr, exit 2;
an internal failure -> traceback, exit 1.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from remask.errors import RemaskError
from remask.train.config import TrainConfig, load_recipe

# --------------------------------------------------------------------------------------------
# Commands


@dataclass
class InfoArgs:
    """Show a model directory: parameters, configuration and special tokens."""

    directory: Annotated[Path, tyro.conf.Positional]
    """A model directory (LLaDA Hugging Face layout)."""
    json: bool = False
    """Print one JSON object instead of text."""


def run_info(args: InfoArgs) -> None:
    from remask.checkpoint import checkpoint_bytes, load_model
    from remask.tokenizer import Tokenizer

    cfg = load_model(args.directory).config  # validates every tensor's name and shape (weights stay mapped)
    tok = Tokenizer.from_dir(args.directory)
    special = {name: (tid, tok.decode([tid], skip_special=False) if tid is not None else None) for name, tid in tok.special_ids.items()}
    info = {
        "directory": str(args.directory),
        "parameters": cfg.num_parameters(),
        "non_embedding_parameters": cfg.num_parameters(embeddings=False),
        "checkpoint_bytes": checkpoint_bytes(args.directory),
        "kind": "autoregressive twin (causal)" if cfg.causal else "masked diffusion (bidirectional)",
        "config": cfg.to_dict(),
        "tokenizer": {"vocab_size": tok.vocab_size, "special_tokens": special},
    }
    if args.json:
        print(json.dumps(info))
        return
    print(f"{info['directory']}: {info['kind']}")
    print(f"  parameters      {info['parameters']:,} ({info['non_embedding_parameters']:,} non-embedding)")
    print(f"  checkpoint      {info['checkpoint_bytes']:,} bytes")
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                "max_sequence_length", "rope_theta", "weight_tying"):
        print(f"  {key:<15} {info['config'][key]}")
    print(f"  tokenizer       {tok.vocab_size} tokens")
    for name, (tid, text) in special.items():
        print(f"    {name:<13} {tid!s:>7}  {text!r}" if tid is not None else f"    {name:<13}    none")


@dataclass
class GenerateArgs:
    """Generate text from a prompt with the reverse (unmasking) process."""

    model: Path
    """A model directory."""
    prompt: str
    """The prompt text (raw; see --chat)."""
    gen_length: int = 64
    """Number of masked positions to fill."""
    steps: int = 64
    """Sampling steps in total (divided evenly among blocks)."""
    block_length: int | None = None
    """Semi-autoregressive block length (default: gen_length, one block)."""
    temperature: float = 0.0
    """Gumbel-max temperature; 0 = greedy."""
    remasking: Literal["low_confidence", "random", "margin", "entropy"] = "low_confidence"
    """Which predictions to keep at each step."""
    cfg_scale: float = 0.0
    """Classifier-free guidance weight (unconditional branch: prompt fully masked)."""
    eos: Literal["allow", "forbid", "delay"] = "allow"
    """End-of-text tokens: allowed, never produced, or revealed last."""
    chat: bool = False
    """Render the prompt as a user turn of the chat template."""
    seed: int = 0
    """Random seed (temperature > 0, random remasking)."""
    device: str = "cpu"
    """cpu or cuda."""
    json: bool = False
    """Print {"text", "ids", "reveal_step"} as one JSON object."""
    show: bool = False
    """Show the denoising live in the terminal (tokens coloured by reveal step)."""


def run_generate(args: GenerateArgs) -> None:
    from remask.pipeline import Pipeline
    from remask.sampling import SamplerConfig

    cfg = SamplerConfig(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                        temperature=args.temperature, remasking=args.remasking, cfg_scale=args.cfg_scale, eos=args.eos)
    pipe = Pipeline.load(args.model, device=args.device)
    on_step = None
    if args.show and not args.json:
        from remask.display import DenoisingView

        on_step = DenoisingView(pipe, cfg, prompt_len=len(pipe.encode_prompt(args.prompt, chat=args.chat)))
    result = pipe.generate(args.prompt, cfg, chat=args.chat, seed=args.seed, on_step=on_step)
    if args.json:
        print(json.dumps({"text": result.text, "ids": result.ids, "reveal_step": result.reveal_step},
                         ensure_ascii=False))
    elif on_step is None:
        print(result.text)


def run_pretrain(cfg: TrainConfig) -> None:
    from remask.train.pretrain import pretrain

    final = pretrain(cfg)
    print(f"saved {final}", file=sys.stderr)


def run_sft(cfg: TrainConfig) -> None:
    from remask.train.sft import sft

    final = sft(cfg)
    print(f"saved {final}", file=sys.stderr)


@dataclass
class DemoArgs:
    """The main job: pretrain a small diffusion LM on the 300 Tang poems, then watch it write."""

    retrain: bool = False
    """Train again even if a finished demo run exists."""
    out: Path = Path("runs/demo")
    """Run directory of the demo model."""
    samples: int = 3
    """How many poems to generate after training."""
    seed: int = 0


def run_demo(args: DemoArgs) -> None:
    from remask.demo import demo

    demo(out=args.out, retrain=args.retrain, samples=args.samples, seed=args.seed)


@dataclass
class PlotArgs:
    """Plot training and validation loss curves of one or more runs into a PNG."""

    runs: Annotated[list[Path], tyro.conf.Positional]
    """Run directories (each with metrics.jsonl)."""
    out: Path = Path("loss.png")
    """Output PNG file."""


def run_plot(args: PlotArgs) -> None:
    from remask.plot import plot_runs

    print(plot_runs(args.runs, args.out))


@dataclass
class ChatArgs:
    """Chat in the terminal (multi-turn, through the chat template), watching each answer unmask."""

    model: Path
    """A model directory."""
    gen_length: int = 128
    steps: int = 128
    block_length: int | None = 32
    temperature: float = 0.0
    remasking: Literal["low_confidence", "random", "margin", "entropy"] = "low_confidence"
    cfg_scale: float = 0.0
    seed: int = 0
    device: str = "cpu"


def run_chat(args: ChatArgs) -> None:
    from remask.display import DenoisingView
    from remask.pipeline import Pipeline
    from remask.sampling import SamplerConfig

    cfg = SamplerConfig(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                        temperature=args.temperature, remasking=args.remasking, cfg_scale=args.cfg_scale)
    pipe = Pipeline.load(args.model, device=args.device)
    history: list[dict] = []
    print("remask chat -- an empty line or Ctrl-D ends, /reset forgets the dialogue.", file=sys.stderr)
    for turn in range(10**9):
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        limit = pipe.model.config.max_sequence_length - cfg.gen_length
        while len(history) > 1 and len(pipe.encode_prompt(history)) > limit:
            history = history[2:]  # forget the oldest exchange to stay within the context
        if len(pipe.encode_prompt(history)) > limit:
            print(f"error: this message does not fit the model's context with gen_length {cfg.gen_length}",
                  file=sys.stderr)
            history.pop()
            continue
        view = DenoisingView(pipe, cfg, prompt_len=len(pipe.encode_prompt(history)))
        result = pipe.generate(history, cfg, seed=args.seed + turn, on_step=view)
        history.append({"role": "assistant", "content": result.text})


COMMANDS: dict[str, tuple[type, Callable]] = {
    "info": (InfoArgs, run_info),
    "generate": (GenerateArgs, run_generate),
    "pretrain": (TrainConfig, run_pretrain),
    "sft": (TrainConfig, run_sft),
    "demo": (DemoArgs, run_demo),
    "plot": (PlotArgs, run_plot),
    "chat": (ChatArgs, run_chat),
}
DOCS = {"pretrain": "Pretrain a masked diffusion LM (or, with --objective ar, its autoregressive twin).",
        "sft": "Supervised fine-tuning of a model directory on JSONL dialogues (--model DIR --data FILE.jsonl)."}

# --------------------------------------------------------------------------------------------
# Dispatch


def _one_line(tyro_output: str) -> str:
    """tyro's boxed usage error as one line, e.g. "Required options: --prompt STR"."""
    lines = [ln.strip(" \t│╭╰╮╯") for ln in tyro_output.splitlines()]
    lines = [ln for ln in lines if ln and set(ln) - set("─-")]
    stop = next((i for i, ln in enumerate(lines) if ln.startswith(("Argument helptext", "For full helptext"))), len(lines))
    lines = lines[:stop]
    if not lines:
        return "invalid arguments"
    title, details = lines[0], [ln for ln in lines[1:] if not ln.startswith("Missing from")]
    details = [ln.removesuffix("(required)").strip() for ln in details if not ln.endswith(")") or "(required)" in ln]
    detail = " ".join(details)
    if detail.lower().startswith(title.lower()):
        return detail
    return f"{title}: {detail}" if detail else title


def parse(schema: type, argv: list[str], prog: str, default=None):
    """Parse argv into `schema`; a usage error becomes one `error:` line and exit code 2."""
    err = io.StringIO()
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            return tyro.cli(schema, args=argv, prog=prog, default=default)
    except SystemExit as e:
        if e.code in (0, None):  # --help
            sys.stdout.write(out.getvalue() + err.getvalue())
            raise
        print(f"error: {_one_line(err.getvalue() or out.getvalue())}", file=sys.stderr)
        raise SystemExit(2) from None


def training_argv(name: str, argv: list[str]) -> tuple[list[str], TrainConfig]:
    """Pull `--config RECIPE.yaml` out of argv (it supplies the defaults that the other options
    override) and map `sft --model DIR` to the init_from field."""
    argv, recipe = list(argv), None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            recipe = argv[i + 1]
            del argv[i:i + 2]
            break
        if arg.startswith("--config="):
            recipe = arg.split("=", 1)[1]
            del argv[i]
            break
    base = load_recipe(recipe) if recipe else TrainConfig(out=Path(f"runs/{name}"))
    if name == "sft":
        argv = ["--init-from" if a == "--model" else a.replace("--model=", "--init-from=", 1) for a in argv]
    return argv, base


def usage() -> str:
    lines = ["usage: remask <command> [options]   (remask <command> --help for its options)", "", "commands:"]
    for name, (schema, _) in COMMANDS.items():
        doc = DOCS.get(name) or (schema.__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {name:<10} {doc}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    schema, run = COMMANDS[name]
    try:
        default = None
        if schema is TrainConfig:
            rest, default = training_argv(name, rest)
        args = parse(schema, rest, prog=f"remask {name}", default=default)
        run(args)
    except SystemExit as e:
        return 0 if e.code is None else int(e.code)
    except RemaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader (e.g. `| head`) went away: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
