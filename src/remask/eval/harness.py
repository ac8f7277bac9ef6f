"""The lm-evaluation-harness model `remask` (lm-eval 0.4.x, the `eval` extra).

Importing this module registers it: `import remask.eval.harness` then
`lm_eval.simple_evaluate(model="remask", model_args={"pretrained": DIR}, tasks=[...])`; from the
shell, `remask eval harness <lm_eval arguments>` (lm-eval's own command has no plugin discovery).
The shipped local tasks live in `remask/eval/tasks/` (`tasks_dir()`; pass it as `include_path`).

- `loglikelihood`: the likelihood bound of a diffusion model (exact for short continuations) or the
  AR twin's exact log-likelihood; `is_greedy` checks that greedy unmasking of the continuation
  positions reproduces it, as the LLaDA paper does (the AR twin: teacher-forced argmax).
- `loglikelihood_rolling`: the same over windows covering a whole document (perplexity tasks).
- `generate_until`: the sampler, batched with left padding; the answer ends at the model's
  end-of-text, is cut at the first `until` string and is at most `max_gen_toks` tokens long.

Model arguments (`--model_args pretrained=DIR,mc_num=64,...`): `pretrained`, `mc_num`,
`cfg_scale`, `seed`, `greedy_check`, `rolling_stride`, `tokens_per_step`, and any sampler setting
under its `SamplerConfig` name (`block_length`, `temperature`, `remasking`, `cache`, `parallel`,
...; read by `remask.sampling.requests`, as serve and chat read them). lm-eval passes `batch_size`
and `device` itself. Every request has its own generator (seed + its index), so an answer does not
depend on its batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401 -- fills lm-eval's registry first, or its own models vanish from it
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from remask.errors import RemaskError
from remask.eval.perplexity import rolling_windows
from remask.eval.scoring import Scorer, ScoringConfig
from remask.pipeline import Pipeline
from remask.sampling import SamplerConfig, generate
from remask.sampling.engine import generate_fast
from remask.sampling.requests import SETTINGS, answer_positions, check_names, sampler_from_fields

TASKS_DIR = Path(__file__).parent / "tasks"


def tasks_dir() -> str:
    """The folder of remask's local lm-eval task YAMLs (`include_path` for lm-eval)."""
    return str(TASKS_DIR)


@register_model("remask")
class RemaskLM(LM):
    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str | None = 32,
                 max_batch_size: int | None = None, mc_num: int = 128, cfg_scale: float = 0.0, seed: int = 0,
                 greedy_check: bool = True, rolling_stride: int | None = None, tokens_per_step: int = 1,
                 **settings: Any) -> None:
        super().__init__()
        check_names(settings, allowed=[n for n in SETTINGS if n not in ("gen_length", "steps", "cfg_scale")])
        rows = 32 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.pipe = Pipeline.load(str(pretrained), device=device or "cpu")
        self.model, self.tokenizer = self.pipe.model, self.pipe.tokenizer
        self._device = self.pipe.device
        scoring = ScoringConfig(mc_num=mc_num, batch_size=rows, cfg_scale=cfg_scale, seed=seed)
        self.scorer = Scorer(self.model, mask_id=self.tokenizer.mask_id, bos_id=self.tokenizer.bos_id,
                             scoring=scoring)
        self.batch_size, self.seed, self.greedy_check = rows, int(seed), bool(greedy_check)
        self.max_len = self.pipe.context
        self.rolling_stride = rolling_stride or self.max_len // 2
        block = settings.pop("block_length", 32)
        self.base = sampler_from_fields(SamplerConfig(gen_length=block, steps=block, block_length=block,
                                                      cfg_scale=cfg_scale), settings)  # checked now, not at a request
        self.tokens_per_step = int(tokens_per_step)
        self.pretrained = str(pretrained)
        self._rendered: dict[str, list[int]] = {}  # chat-template strings we produced -> their ids

    # --- text -> ids ---------------------------------------------------------------------------
    def encode_context(self, text: str) -> list[int]:
        """BOS + text as plain text; a chat-template string this model rendered keeps its control ids."""
        for rendered, ids in self._rendered.items():
            if text.startswith(rendered):
                rest = text[len(rendered):]
                return ids + (self.tokenizer.encode(rest, where="harness context") if rest else [])
        bos = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
        return bos + (self.tokenizer.encode(text, where="harness context") if text else [])

    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        ctx = self.encode_context(context)
        whole = self.encode_context(context + continuation)
        if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.tokenizer.encode(continuation, where="harness continuation")

    @property
    def tokenizer_name(self) -> str:
        return f"remask:{self.pretrained}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "llada" if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        ids = self.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)
        text = self.tokenizer.decode(ids, skip_special=False)
        self._rendered[text] = ids
        return text

    # --- the three request types -------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self.split(*r.args) for r in requests]
        scores = self.scorer.score(pairs)
        greedy = self.is_greedy(pairs) if self.greedy_check else [False] * len(pairs)
        return [(s.log_likelihood, g) for s, g in zip(scores, greedy)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        prefix = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
        out = []
        for r in requests:
            ids = self.tokenizer.encode(r.args[0], where="harness document")
            if not ids:
                out.append(0.0)
                continue
            windows = rolling_windows(ids, prefix, self.max_len, min(self.rolling_stride, self.max_len - 1))
            out.append(sum(s.log_likelihood for s in self.scorer.score(windows)))
        return out

    def generate_until(self, requests) -> list[str]:
        if self.model.config.causal:
            raise RemaskError("generate_until samples by unmasking: it needs a diffusion model, not the AR twin")
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._sampler_key(dict(r.args[1] or {})), []).append(i)
        for (gen_length, temperature), members in groups.items():
            sampler = self._sampler(gen_length, temperature)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                contexts = [self.encode_context(requests[i].args[0])[-(self.max_len - gen_length):] for i in chunk]
                seeds = [self.seed + i for i in chunk]  # a request's answer does not depend on its batch
                for i, generation in zip(chunk, self.pipe.sample(contexts, sampler, seeds)):
                    kwargs = dict(requests[i].args[1] or {})
                    until = kwargs.get("until") or []
                    # the canvas is whole blocks: cut again at this request's token limit and stop strings
                    out[i] = self.pipe.answer(generation.ids, stops=[until] if isinstance(until, str) else until,
                                              limit=int(kwargs.get("max_gen_toks", 256))).text
        return out  # type: ignore[return-value]

    # --- helpers ------------------------------------------------------------------------------------
    def _sampler_key(self, kwargs: dict) -> tuple[int, float]:
        max_tokens = int(kwargs.get("max_gen_toks", 256))
        block = min(self.base.effective_block_length, max_tokens)
        gen_length = min(answer_positions(max_tokens, block), self.max_len - 1)
        gen_length -= gen_length % block
        temperature = float(kwargs.get("temperature", self.base.temperature)) if kwargs.get("do_sample") \
            else self.base.temperature
        return gen_length, temperature

    def _sampler(self, gen_length: int, temperature: float) -> SamplerConfig:
        block = min(self.base.effective_block_length, gen_length)
        blocks = gen_length // block
        steps = max(blocks, (gen_length // max(1, self.tokens_per_step)) // blocks * blocks)
        return self.base.replace(gen_length=gen_length, steps=steps, block_length=block, temperature=temperature)

    def is_greedy(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
        """Whether greedy decoding reproduces each continuation: the AR twin's argmax at every
        position; the diffusion model unmasking the continuation's positions one at a time."""
        out = []
        for context, continuation in (self.scorer.fit(c, x) for c, x in pairs):
            ids = torch.tensor([context + continuation], device=self._device)
            if self.model.config.causal:
                with torch.no_grad():
                    pred = self.scorer.model_fn(ids, None)[0, len(context) - 1:-1].argmax(-1)
                out.append(pred.tolist() == continuation)
                continue
            L = len(continuation)
            sampler = SamplerConfig(gen_length=L, steps=L, remasking="low_confidence", stop_at_eos=False)
            if self.model.config.attention == "block":  # its own blocks, on its grid (the engine's block path)
                x, _ = generate_fast(self.model, ids[:, :len(context)], sampler, mask_id=self.tokenizer.mask_id,
                                     vocab_size=self.model.config.vocab_size)
            else:
                x = generate(self.scorer.model_fn, ids[:, :len(context)], sampler, mask_id=self.tokenizer.mask_id)
            out.append(x[0, len(context):].tolist() == continuation)
        return out
