"""The commands of `remask`: typed functions over the library, one per command.

tyro turns each function's parameters into options (nested configs included), so a setting is
declared once, where it lives: every `SamplerConfig` field is an option of every command that
samples. The training commands (pretrain, sft, demo, plot) live in `train_commands.py`; COMMANDS
below lists them all. Nothing here parses argv; `cli.py` does.
"""

from __future__ import annotations

import json as jsonlib
import sys
from pathlib import Path
from typing import Annotated, Literal

import tyro

from remask.app.command import Command, Flat, Positional
from remask.app.train_commands import PretrainCommand, SFTCommand, demo, plot, pretrain, sft
from remask.errors import RemaskError
from remask.eval.scoring import ScoringConfig
from remask.sampling import SamplerConfig
from remask.train.config import PretrainConfig, SFTConfig


def info(directory: Annotated[Path, Positional], json: bool = False) -> None:
    """Show a model directory: parameters, configuration and special tokens.

    Args:
        directory: A model directory (LLaDA Hugging Face layout).
        json: Print one JSON object instead of text.
    """
    from remask.checkpoint import checkpoint_bytes
    from remask.pipeline import Pipeline

    pipe = Pipeline.load(directory)  # validates every tensor's name and shape (weights stay mapped)
    cfg, tok = pipe.model.config, pipe.tokenizer
    special = {name: (tid, tok.decode([tid], skip_special=False) if tid is not None else None)
               for name, tid in tok.special_ids.items()}
    report = {
        "directory": str(directory),
        "parameters": cfg.num_parameters(),
        "non_embedding_parameters": cfg.num_parameters(embeddings=False),
        "checkpoint_bytes": checkpoint_bytes(directory),
        "kind": {"causal": "autoregressive twin (causal)", "full": "masked diffusion (bidirectional)",
                 "block": f"block diffusion (blocks of {cfg.block_length})"}[cfg.attention],
        "config": cfg.to_dict(),
        "tokenizer": {"vocab_size": tok.vocab_size, "special_tokens": special},
    }
    if json:
        print(jsonlib.dumps(report, allow_nan=False))
        return
    print(f"{report['directory']}: {report['kind']}")
    print(f"  parameters      {report['parameters']:,} ({report['non_embedding_parameters']:,} non-embedding)")
    print(f"  checkpoint      {report['checkpoint_bytes']:,} bytes")
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                "max_sequence_length", "rope_theta", "weight_tying"):
        print(f"  {key:<15} {report['config'][key]}")
    print(f"  tokenizer       {tok.vocab_size} tokens")
    for name, (tid, text) in special.items():
        print(f"    {name:<13} {tid!s:>7}  {text!r}" if tid is not None else f"    {name:<13}    none")


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt text from exactly one of --prompt and --prompt-file, checked to be UTF-8."""
    from remask.data.corpora import decode_text
    from remask.tokenizer import check_text

    if (prompt is None) == (prompt_file is None):
        raise RemaskError("give exactly one of --prompt TEXT and --prompt-file FILE")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise RemaskError(f"prompt file {prompt_file} does not exist" if not prompt_file.exists()
                              else f"prompt file {prompt_file} is not a file")
        return decode_text(prompt_file)
    return check_text(prompt, "--prompt")


GENERATE_SAMPLER = SamplerConfig(gen_length=64, steps=64)


def generate(model: Path, prompt: str | None = None, prompt_file: Path | None = None,
             sampler: Annotated[SamplerConfig, Flat] = GENERATE_SAMPLER,
             chat: bool = False, seed: int = 0, device: str = "cpu", json: bool = False, show: bool = False) -> None:
    """Generate text from a prompt with the reverse (unmasking) process.

    Args:
        model: A model directory.
        prompt: The prompt text (raw; see --chat).
        prompt_file: Read the prompt from this UTF-8 file instead.
        sampler: Sampler settings.
        chat: Render the prompt as a user turn of the chat template.
        seed: Random seed (temperature > 0, random remasking).
        device: cpu, cuda or cuda:N.
        json: Print {"text", "ids", "reveal_step"} as one JSON object.
        show: Show the denoising live in the terminal (tokens coloured by reveal step).
    """
    from remask.app.display import DenoisingView
    from remask.pipeline import Pipeline, check_seed

    text = read_prompt(prompt, prompt_file)
    check_seed(seed)
    pipe = Pipeline.load(model, device=device)
    live = show and not json and not pipe.causal  # the AR twin writes left to right: no denoising to show
    view = DenoisingView(pipe.tokenizer, pipe.stop_ids(), sampler) if live else None
    result = pipe.generate(text, sampler, chat=chat, seed=seed, on_step=view)
    if json:
        print(jsonlib.dumps({"text": result.text, "ids": result.ids, "reveal_step": result.reveal_step,
                             "ended": result.ended}, ensure_ascii=False))
    elif view is None:
        print(result.text)


CHAT_SAMPLER = SamplerConfig(gen_length=128, steps=128, block_length=32)


def chat(model: Path, sampler: Annotated[SamplerConfig, Flat] = CHAT_SAMPLER, seed: int = 0,
         device: str = "cpu") -> None:
    """Chat in the terminal (multi-turn, through the chat template), watching each answer unmask.

    Args:
        model: A model directory.
        sampler: Sampler settings.
        seed: Random seed of the first turn (turn k uses seed + k).
        device: cpu, cuda or cuda:N.
    """
    from remask.app.chat import ChatSession, terminal_chat
    from remask.pipeline import Pipeline, check_seed

    check_seed(seed)
    terminal_chat(ChatSession(Pipeline.load(model, device=device), sampler, seed=seed))


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True, leave=False)


def _print_report(report: dict, json: bool) -> None:
    if json:
        print(jsonlib.dumps(report, ensure_ascii=False, allow_nan=False))
        return
    for key, value in report.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key:<24} {shown}")


SCORING = ScoringConfig()


def eval_ppl(model: Path, data: str, scoring: Annotated[ScoringConfig, Flat] = SCORING,
             split: Literal["val", "all"] = "val", val_fraction: float = 0.05, stride: int | None = None,
             device: str = "cpu", json: bool = False, progress: bool = True) -> None:
    """Perplexity on held-out text: the diffusion model's NLL bound or the AR twin's exact NLL.

    Args:
        model: A model directory (diffusion model or AR twin: chosen from its config).
        data: A corpus: builtin:NAME, a .txt/.jsonl file or a directory.
        scoring: How log-likelihoods are computed.
        split: val: the documents pretraining held out (at --val-fraction); all: every document.
        val_fraction: The held-out fraction pretraining used (data.val_fraction).
        stride: Tokens scored per window (default: half the model's context); each window conditions on
            the tokens before it, up to the context.
        device: cpu, cuda or cuda:N.
        json: Print one JSON object.
        progress: Show a progress bar.
    """
    from remask.eval.common import held_out_documents, open_scorer
    from remask.eval.perplexity import perplexity, rolling_windows

    scorer, tok = open_scorer(model, scoring, device=device)
    docs = held_out_documents(data, split, val_fraction)
    window = scorer.max_len // 2 if stride is None else stride  # 0 is refused by rolling_windows, not defaulted
    prefix = [tok.bos_id] if tok.bos_id is not None else []
    total = sum(len(rolling_windows(tok.encode(d), prefix, scorer.max_len, window)) for d in docs)
    bar = _progress(total, progress and not json, "windows")
    result = perplexity(scorer, tok, docs, stride=window, progress=bar.update if bar else None)
    if bar:
        bar.close()
    _print_report({"model": str(model), "data": data, "split": split, "stride": window} | result.report()
                  | {"scoring": scoring.to_dict()}, json)


def eval_choice(model: Path, task: Path, scoring: Annotated[ScoringConfig, Flat] = SCORING,
                normalize: Literal["none", "tokens", "bytes"] = "bytes", device: str = "cpu", json: bool = False,
                progress: bool = True) -> None:
    """Multiple-choice accuracy (with a 95% confidence interval) by each option's log-likelihood.

    Args:
        model: A model directory (diffusion model or AR twin).
        task: A JSONL file of {"context", "choices", "answer"} items.
        scoring: How log-likelihoods are computed.
        normalize: The unit of accuracy_norm's length normalisation.
        device: cpu, cuda or cuda:N.
        json: Print one JSON object.
        progress: Show a progress bar.
    """
    from remask.eval.choice import evaluate_choice, load_task
    from remask.eval.common import open_scorer

    items = load_task(task)
    scorer, tok = open_scorer(model, scoring, device=device)
    bar = _progress(len(items), progress and not json, "items")
    result = evaluate_choice(scorer, tok, items, normalize=normalize, progress=bar.update if bar else None)
    if bar:
        bar.close()
    _print_report({"model": str(model), "task": str(task)} | result.report() | {"scoring": scoring.to_dict()}, json)


REVERSAL_SAMPLER = SamplerConfig(gen_length=16, steps=16)


def eval_reversal(model: Annotated[list[Path], tyro.conf.UseAppendAction], test: Path,
                  sampler: Annotated[SamplerConfig, Flat] = REVERSAL_SAMPLER,
                  kind: Literal["poem", "capital", "person"] = "poem", mode: Literal["qa", "infill", "statement"] = "qa",
                  statement_style: Literal["plain", "qa"] = "plain", window: int | None = None, seed: int = 0,
                  batch_size: int = 32, device: str = "cpu", json: bool = False) -> None:
    """Reversal-curse accuracy of trained models: the next and the previous line of each test pair.

    Args:
        model: Model directories (fine-tuned diffusion models or AR twins); give --model once per model.
        test: JSONL of {"first": str, "second": str} pairs (two halves of a couplet, a country and its
            capital, or a person's name and description).
        sampler: Sampler settings of a diffusion model's answers (the AR twin decodes greedily, or samples
            at --temperature).
        kind: Which questions to ask: poem (X的下一句是什么？/ X的上一句是什么？), capital, or person
            ("Who is X?" / "Who is the Y?").
        mode: qa: ask the questions through the chat template; infill: a base diffusion model fills
            the masked half next to the known one (no SFT needed); statement: a base model of either
            kind completes the pair's statement as plain text, the form in which
            benchmarks/reversal.py's pretraining states its SFT pairs (--statement-style).
        statement_style: The statement of --mode statement: plain, "X的下一句是Y。" / "Y的上一句是X。";
            qa, the question followed by its answer ("X的下一句是什么？只回答这一句。Y。").
        window: --mode infill and statement, diffusion models: the text is followed by masks up to this
            many tokens, never revealed (the unknown text after it), so the model reads a sequence of
            the length it was pretrained on. Default: that length, from the model's
            remask_training.json (none recorded: no padding); 0: no padding.
        seed: Random seed.
        batch_size: Questions answered together (the answers do not depend on it: each question has its
            own random generator).
        device: cpu, cuda or cuda:N.
        json: Print one JSON object.
    """
    from remask.eval.reversal import evaluate

    report = evaluate(model, test, sampler=sampler, kind=kind, mode=mode, statement_style=statement_style,
                      window=window, seed=seed, batch_size=batch_size, device=device)
    if json:
        print(jsonlib.dumps(report, ensure_ascii=False))
        return
    print(f"{'model':<40} {'kind':<15} {'forward':>8} {'backward':>9} {'n':>5}")
    for name, row in report["models"].items():
        print(f"{name:<40} {row['kind']:<15} {row['forward']:>8.3f} {row['backward']:>9.3f} {row['n']:>5}")


def eval_harness(argv: list[str]) -> None:
    """lm-evaluation-harness's own CLI with the `remask` model registered (pip install 'remask[eval]').

    Its arguments pass through unchanged (`remask eval harness --model remask --model_args
    pretrained=DIR --tasks remask_capitals`); remask's local tasks are on the include path, and
    without CUDA the device defaults to the CPU.
    """
    import os

    try:
        import remask.eval.harness as harness
    except ImportError:
        raise RemaskError("remask eval harness needs lm-eval: pip install 'remask[eval]'") from None
    import torch
    from lm_eval.__main__ import cli_evaluate

    args = list(argv)
    listing = bool(args) and args[0] in ("ls", "validate")
    if not any(a.startswith("--include_path") for a in args):
        args += ["--include_path", harness.tasks_dir()]
    if not listing and not any(a.startswith("--device") for a in args) and not torch.cuda.is_available():
        args += ["--device", "cpu"]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local tasks need no hub; a hub task fails fast offline
    sys.argv = ["remask eval harness", *args]
    cli_evaluate()


SERVE_SAMPLER = SamplerConfig(gen_length=128, steps=128, block_length=32, cache="dual", parallel="threshold",
                              threshold=0.9)


def serve(model: Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          sampler: Annotated[SamplerConfig, Flat] = SERVE_SAMPLER, max_tokens_limit: int = 512, max_batch: int = 16,
          max_queue: int = 64, batching: bool = True, name: str | None = None, device: str = "cpu") -> None:
    """Serve the model over an OpenAI-compatible HTTP API, with a page that shows the denoising live.

    Args:
        model: A model directory (a diffusion model).
        host: Address to bind (loopback by default; 0.0.0.0 exposes the server to the network).
        port: TCP port.
        api_key: Require `Authorization: Bearer KEY` on /v1/ (default: $REMASK_API_KEY; unset: no key).
        sampler: The default sampler settings (a request may override each); gen_length is the default
            max_tokens.
        max_tokens_limit: The largest max_tokens a request may ask for.
        max_batch: Requests denoised together at most.
        max_queue: Requests waiting at most; beyond it the server answers 503 with Retry-After.
        batching: Denoise concurrent requests together (off: one at a time).
        name: The model id clients use (default: the directory's name).
        device: cpu, cuda or cuda:N.
    """
    import os

    try:
        from remask.serve.app import bind, create_app, run
    except ImportError:
        raise RemaskError("remask serve needs FastAPI and uvicorn: pip install 'remask[serve]'") from None
    from remask.pipeline import Pipeline

    for label, value in (("--max-tokens-limit", max_tokens_limit), ("--max-batch", max_batch), ("--max-queue", max_queue)):
        if value < 1:
            raise RemaskError(f"{label} is out of range: {value}")
    sock = bind(host, port)  # a bad address or a taken port is one error line, before anything else
    try:
        pipe = Pipeline.load(model, device=device)
        if pipe.model.config.causal:
            raise RemaskError(f"{model} is an AR twin; remask serve denoises with a diffusion model")
        key = api_key or os.environ.get("REMASK_API_KEY") or None
        directory = Path(model).resolve()
        default_name = directory.parent.name if directory.name == "final" else directory.name  # runs/demo/final: demo
        app = create_app(pipe, model_name=name or default_name, sampler=sampler, api_key=key,
                         max_tokens_limit=max_tokens_limit, max_batch=max_batch, max_queue=max_queue, batching=batching)
        shown = f"[{host}]" if ":" in host else host
        print(f"serving {model} on http://{shown}:{sock.getsockname()[1]}/ (OpenAI API under /v1/)", file=sys.stderr)
        run(app, sock)
    finally:
        sock.close()


COMMANDS: dict[str, Command] = {
    "demo": Command(demo),
    "info": Command(info),
    "generate": Command(generate),
    "chat": Command(chat),
    "pretrain": Command(PretrainCommand, pretrain, recipe=PretrainConfig),
    "sft": Command(SFTCommand, sft, recipe=SFTConfig),
    "plot": Command(plot),
    "serve": Command(serve),
    "eval ppl": Command(eval_ppl),
    "eval choice": Command(eval_choice),
    "eval reversal": Command(eval_reversal),
    "eval harness": Command(eval_harness, raw=True),
}
