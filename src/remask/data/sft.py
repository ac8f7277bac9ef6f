"""SFT data (LLaDA section 2.3, appendix B.1): JSONL dialogues rendered with the chat template;
an n-turn dialogue becomes n single-turn examples; answers padded with EOS in each batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from remask.data.corpora import parse_jsonl_file
from remask.data.packing import Stream, step_seed
from remask.errors import RemaskError
from remask.tokenizer import check_text


@dataclass(frozen=True)
class SFTExample:
    ids: list[int]  # prompt + answer (the assistant's content + its end-of-turn token)
    prompt_len: int


def parse_record(record: object, where: str) -> list[dict]:
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        ok = isinstance(messages, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
        if not ok:
            raise RemaskError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise RemaskError(f"{where}: the dialogue has no assistant turn to learn from")
        for i, m in enumerate(messages):
            check_text(m["content"], f"{where}: message {i} 'content'")
        return messages
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return [{"role": "user", "content": check_text(record["prompt"], f"{where}: 'prompt'")},
                {"role": "assistant", "content": check_text(record["response"], f"{where}: 'response'")}]
    raise RemaskError(f"{where}: expected {{'messages': [...]}} or {{'prompt': str, 'response': str}}")


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Dialogues from JSONL; a bad line is a one-line error naming file:line."""
    return parse_jsonl_file(path, "SFT data", parse_record)


def conversation_examples(messages: list[dict], tokenizer) -> list[SFTExample]:
    """One example per assistant turn: everything rendered before it is the prompt (earlier
    turns included), the turn itself is the answer (appendix B.1's multi-turn treatment)."""
    examples, prefix = [], []
    for segment, is_answer in tokenizer.chat_turns(messages):
        if is_answer:
            examples.append(SFTExample(prefix + segment, len(prefix)))
        prefix = prefix + segment
    return examples


def build_sft_examples(path: str | Path, tokenizer, *, max_len: int) -> list[SFTExample]:
    """All examples of a JSONL file that fit: an answer running past max_len is cut there (at
    least one answer token must fit); an example whose prompt fills max_len is dropped."""
    out = []
    for messages in load_conversations(path):
        for ex in conversation_examples(messages, tokenizer):
            if ex.prompt_len < max_len:
                out.append(SFTExample(ex.ids[:max_len], ex.prompt_len))
    return out


def sft_batch(examples: list[SFTExample], *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, L), prompt_lengths (B,), pad_mask (B, L)): right-padded with pad_id (EOS) to the
    longest example. For the MDM the padding is answer (section 2.3); the AR twin skips it."""
    L = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    pad_mask = torch.ones(len(examples), L, dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, :len(e.ids)] = torch.tensor(e.ids)
        pad_mask[row, :len(e.ids)] = False
    return ids, torch.tensor([e.prompt_len for e in examples]), pad_mask


class SFTBatches:
    """Batches of examples, each epoch in an order drawn from (seed, epoch); a function of step."""

    def __init__(self, examples: list[SFTExample], batch_size: int, *, seed: int, pad_id: int) -> None:
        if not examples:
            raise RemaskError("no SFT examples to train on")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(step_seed(self.seed, epoch, Stream.SFT_ORDER)).permutation(len(self.examples))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, first = len(self.examples), step * self.batch_size
        picks = [int(self.order(i // n)[i % n]) for i in range(first, first + self.batch_size)]
        return sft_batch([self.examples[i] for i in picks], pad_id=self.pad_id)
