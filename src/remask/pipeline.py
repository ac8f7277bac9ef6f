"""A loaded model directory (weights + tokenizer) and text-in, text-out generation.

The CLI, the demo, chat and the server all go through `Pipeline`, so they format prompts and
read results the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from remask.checkpoint import load_model
from remask.errors import RemaskError
from remask.model import Transformer
from remask.sampling import SamplerConfig, StepInfo, generate
from remask.tokenizer import Tokenizer


@dataclass
class Generation:
    text: str  # the answer, cut at the first end-of-text / end-of-turn token
    ids: list[int]  # all gen_length answer ids (EOS padding included)
    reveal_step: list[int]  # per answer position, the global step at which it was revealed


@dataclass
class Pipeline:
    model: Transformer
    tokenizer: Tokenizer

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None) -> Pipeline:
        model = load_model(directory, device=device, dtype=dtype)
        return cls(model, Tokenizer.from_dir(directory))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def model_fn(self, ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.model(ids, attention_mask)[..., : self.model.config.vocab_size]  # drop padded rows

    def stop_ids(self) -> list[int]:
        return [i for i in (self.tokenizer.eos_id, self.tokenizer.eot_id) if i is not None]

    def encode_prompt(self, prompt: str | list[dict], *, chat: bool = False) -> list[int]:
        """Prompt ids: a dialogue (a list of messages, or one user turn with `chat`) rendered with
        the chat template and the assistant header, or raw text after the BOS token (pretraining
        puts BOS at the start of every document)."""
        if isinstance(prompt, list):
            return self.tokenizer.render_chat(prompt, add_generation_prompt=True)
        if chat:
            return self.tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        bos = self.tokenizer.bos_id
        return ([bos] if bos is not None else []) + self.tokenizer.encode(prompt)

    def answer_text(self, ids: list[int]) -> str:
        stops = set(self.stop_ids())
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return self.tokenizer.decode(ids[:cut])

    def generate(self, prompt: str | list[dict], cfg: SamplerConfig, *, chat: bool = False, seed: int = 0,
                 on_step: Callable[[StepInfo], None] | None = None) -> Generation:
        """Sample an answer to one prompt (text, or a dialogue's messages); `on_step` sees every
        denoising step."""
        prompt_ids = self.encode_prompt(prompt, chat=chat)
        limit = self.model.config.max_sequence_length
        if len(prompt_ids) + cfg.gen_length > limit:
            raise RemaskError(
                f"prompt ({len(prompt_ids)} tokens) + gen_length ({cfg.gen_length}) exceeds the model's "
                f"context of {limit} tokens"
            )
        P = len(prompt_ids)
        reveal = torch.full((cfg.gen_length,), -1, dtype=torch.long)

        def record(info: StepInfo) -> None:
            reveal[info.revealed[0, P:]] = info.step
            if on_step is not None:
                on_step(info)

        generator = torch.Generator(device=self.device).manual_seed(seed)
        x = generate(self.model_fn, torch.tensor([prompt_ids], device=self.device), cfg,
                     mask_id=self.tokenizer.mask_id, eos_ids=self.stop_ids(), generator=generator, on_step=record)
        answer = x[0, P:].tolist()
        return Generation(self.answer_text(answer), answer, reveal.tolist())
