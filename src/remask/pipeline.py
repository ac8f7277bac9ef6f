"""The one door to generation: a loaded model directory (weights, tokenizer, training note) and
text in, text out.

Load (model directory -> model, tokenizer, special ids, training note), encode (text or chat turns
-> ids, checked against the model's context), sample (the fast engine, or the AR twin's KV
decoding) and cut and decode answers (one cutter, for end-of-text ids and stop strings). generate,
chat, eval, serve, the demo and the benchmarks all go through here, so they format prompts and read
answers the same way. An answer ends at the first end-of-text (or end-of-turn) token the model
predicts: `gen_length` is a limit, not a canvas to fill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from remask.checkpoint.model_dir import load_model_dir, read_training_note
from remask.config import SEED_LIMIT
from remask.errors import ConfigError, RemaskError, check_fits
from remask.model import Transformer
from remask.sampling import SamplerConfig, StepInfo, fill_masks
from remask.sampling.autoregressive import ar_generate_cached
from remask.sampling.engine import Engine, fill_masks_fast
from remask.tokenizer import Tokenizer


@dataclass
class Generation:
    text: str  # the answer, before its end-of-text
    ids: list[int]  # answer ids up to and including the end-of-text (all gen_length if none came)
    reveal_step: list[int]  # per id, the global step at which it was revealed
    ended: bool  # an end-of-text came within gen_length (under anchor_eos, the last may be the anchor: reveal step -1)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(ids, attention_mask), both (B, longest): rows aligned to the right, padding marked 0."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention[r, width - len(row):] = 1
    return ids.to(device), attention.to(device)


def cut_text(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the earliest of the stop strings, whether one occurred)."""
    cut = min((text.index(s) for s in stops if s and s in text), default=None)
    return (text, False) if cut is None else (text[:cut], True)


def check_seed(seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"must be an integer in [0, 2**63), got {seed!r}", field="seed")
    return seed


@dataclass
class Pipeline:
    model: Transformer
    tokenizer: Tokenizer
    note: dict = field(default_factory=dict)  # the training note (remask_training.json), {} if none

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None) -> Pipeline:
        model, tokenizer = load_model_dir(directory, device=device, dtype=dtype)
        return cls(model, tokenizer, read_training_note(directory))

    @property
    def context(self) -> int:
        """The longest sequence (prompt + answer) the model accepts."""
        return self.model.config.max_sequence_length

    @property
    def causal(self) -> bool:
        return bool(self.model.config.causal)

    def check_context(self, prompt_tokens: int, new_tokens: int, *, what: str = "prompt") -> None:
        """RemaskError unless `prompt_tokens + new_tokens` fit the model's context."""
        check_fits(prompt_tokens, new_tokens, self.context, what=what)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def model_fn(self, ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.model(ids, attention_mask)[..., : self.model.config.vocab_size]  # drop padded rows

    def block_offset(self) -> int:
        """The position shift that starts text after a BOS token on a block boundary (the BOS the
        last token of the block before): a block model then reads a pair of halves of up to
        block_length tokens inside one block, both ways round. 0 for other layouts."""
        return self.model.config.block_length - 1 if self.layout == "block" else 0

    @property
    def layout(self) -> str:
        """The model's attention layout: full, causal or block."""
        return getattr(self.model.config, "attention", "causal" if self.causal else "full")

    def stop_ids(self) -> list[int]:
        return [i for i in (self.tokenizer.eos_id, self.tokenizer.eot_id) if i is not None]

    def encode_prompt(self, prompt: str | list[dict], *, chat: bool = False) -> list[int]:
        """Prompt ids: a dialogue (a list of messages, or one user turn with `chat`) rendered with
        the chat template and the assistant header, or raw text after the BOS token (pretraining
        puts BOS at the start of every document). Text is encoded as plain text."""
        if isinstance(prompt, list):
            return self.tokenizer.render_chat(prompt, add_generation_prompt=True)
        if chat:
            return self.tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        bos = self.tokenizer.bos_id
        return ([bos] if bos is not None else []) + self.tokenizer.encode(prompt, where="prompt")

    def answer(self, ids: list[int], reveal_step: list[int] | None = None, stops: Sequence[str] = (), *,
               limit: int | None = None) -> Generation:
        """Cut a sampled answer at its first `limit` ids (a max_tokens shorter than the canvas),
        then at its first stop token, then its text at the first stop string (`ended` for either)."""
        reveal_step = [0] * len(ids) if reveal_step is None else reveal_step
        ids, reveal_step = ids[:limit], reveal_step[:limit]
        ends = set(self.stop_ids())
        end = next((i for i, t in enumerate(ids) if t in ends), None)
        cut = len(ids) if end is None else end
        keep = len(ids) if end is None else end + 1
        text, stopped = cut_text(self.tokenizer.decode(ids[:cut]), stops)
        return Generation(text, ids[:keep], reveal_step[:keep], end is not None or stopped)

    def generate(self, prompt: str | list[dict], sampler: SamplerConfig, *, chat: bool = False, seed: int = 0,
                 stops: Sequence[str] = (), on_step: Callable[[StepInfo], None] | None = None) -> Generation:
        """Sample an answer to one prompt (text, or a dialogue's messages); `on_step` sees every
        denoising step."""
        return self.sample([self.encode_prompt(prompt, chat=chat)], sampler, [seed], stops=stops, on_step=on_step)[0]

    def generate_many(self, prompts: list[str], sampler: SamplerConfig, seeds: list[int]) -> list[Generation]:
        """One answer per (prompt, seed), sampled together as one batch; each equals
        `generate(prompt, sampler, seed=seed)` (every row has its own generator)."""
        return self.sample([self.encode_prompt(p) for p in prompts], sampler, seeds)

    def generate_ids(self, prompt_ids: list[int], sampler: SamplerConfig, *, seed: int = 0,
                     on_step: Callable[[StepInfo], None] | None = None) -> Generation:
        """Sample an answer after already-encoded prompt ids."""
        return self.sample([prompt_ids], sampler, [seed], on_step=on_step)[0]

    def sample(self, prompts: list[list[int]], sampler: SamplerConfig, seeds: Sequence[int], *,
               stops: Sequence[str] = (), on_step: Callable[[StepInfo], None] | None = None) -> list[Generation]:
        """One answer per prompt's ids, each row with its own generator from its seed, so an answer
        does not depend on its batch. A diffusion model denoises `sampler.gen_length` positions
        through the fast engine; the AR twin decodes up to `gen_length` tokens left to right with its
        KV cache (greedy at temperature 0; no denoising steps to show, so `on_step` is not called).
        Answers end at the first end-of-text, then at the first of `stops`."""
        if len(prompts) != len(seeds):
            raise RemaskError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return []
        run = self._decode if self.causal else self._denoise  # each checks the context
        return [self.answer(ids, steps, stops) for ids, steps in run(prompts, sampler, seeds, on_step)]

    def generator(self, seed: int) -> torch.Generator:
        """A generator on the model's device seeded with `seed` (checked): one per row or request."""
        return torch.Generator(device=self.device).manual_seed(check_seed(seed))

    def _denoise(self, prompts: list[list[int]], sampler: SamplerConfig, seeds: Sequence[int],
                 on_step: Callable[[StepInfo], None] | None) -> list[tuple[list[int], list[int]]]:
        """The fast sampler's engine, a row per prompt: (answer ids, reveal steps) per row."""
        engine = Engine(self.model, mask_id=self.tokenizer.mask_id, vocab_size=self.model.config.vocab_size,
                        eos_ids=self.stop_ids())
        rows = [engine.add(ids, sampler, generator=self.generator(s), on_step=on_step) for ids, s in zip(prompts, seeds)]
        with torch.no_grad():
            engine.run()
        return [(r.answer, r.answer_reveal_step) for r in (row.result() for row in rows)]

    def _decode(self, prompts: list[list[int]], sampler: SamplerConfig, seeds: Sequence[int],
                on_step: Callable[[StepInfo], None] | None) -> list[tuple[list[int], list[int]]]:
        """The AR twin's answers: (answer ids, the step that wrote each)."""
        answers = self.decode(prompts, sampler.gen_length, temperature=sampler.temperature, seeds=seeds)
        return [(row, list(range(len(row)))) for row in answers]

    def decode(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
               seeds: Sequence[int] | None = None, stop: bool = True) -> list[list[int]]:
        """The AR twin's next ids after each prompt: KV-cached decoding of the left-padded batch, row i
        drawing from its own generator seeded `seeds[i]` (greedy at temperature 0); rows end at an
        end-of-text with `stop`, else each gets `max_new_tokens` ids."""
        generators = None if seeds is None else [self.generator(s) for s in seeds]
        for ids in prompts:
            self.check_context(len(ids), max_new_tokens)
        ids, attention = left_pad(prompts, self.tokenizer.pad_id, self.device)
        x, _ = ar_generate_cached(self.model, ids, max_new_tokens, vocab_size=self.model.config.vocab_size,
                                  eos_ids=self.stop_ids() if stop else (), attention_mask=attention,
                                  temperature=temperature, generator=generators)
        return x[:, ids.shape[1]:].tolist()

    def infill(self, ids: list[int], region: slice, sampler: SamplerConfig, *, seed: int = 0,
               offset: int = 0) -> list[int]:
        """Reveal the masks of `ids` inside `region` (sampler.gen_length long) and nothing else: text
        on either side and masks outside it are context. The reference `fill_masks` with no cache and
        the schedule rule; the fast engine's `fill_masks_fast` for a cache or a parallel rule. The
        region's ids. `offset` shifts the rotary positions to offset, offset + 1, ...: the same
        attention for a full or causal model (rotary attention is relative), but for a block model
        it places the block grid (`block_offset`). A block model fills by the reference rule on the
        whole canvas under its block mask, exact at every step; RemaskError for a cache or a
        parallel rule there (the engine's infilling caches assume full attention)."""
        self.check_context(offset + len(ids), 0, what="the text to infill")
        x, generator = torch.tensor([ids], device=self.device), self.generator(seed)
        mask_id = self.tokenizer.mask_id
        fast = sampler.cache != "none" or sampler.parallel != "schedule"
        if self.layout == "block" and fast:
            raise RemaskError("a block model infills with no cache and the schedule rule (--cache none --parallel schedule)")
        positions = torch.arange(offset, offset + len(ids), device=self.device)

        def shifted(ids: Tensor, attention_mask: Tensor | None) -> Tensor:
            return self.model(ids, attention_mask, positions)[..., : self.model.config.vocab_size]

        with torch.no_grad():
            if fast:
                x, _ = fill_masks_fast(self.model, x, region, sampler, mask_id=mask_id,
                                       vocab_size=self.model.config.vocab_size, generator=generator)
            else:
                x = fill_masks(shifted if offset else self.model_fn, x, sampler, mask_id=mask_id, generator=generator,
                               region=region)
        return x[0, region].tolist()
