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
    """Batches of examples, each epoch in an order drawn from (seed, epoch); a function of step.

    With `group_by_length`, each epoch's order is cut into pools of `GROUP_POOL` batches, a pool
    sorted by length and its batches shuffled: a batch holds examples of about one length. The
    objective is unchanged (an answer's EOS pads are still trained, LLaDA section 2.3), but a short
    answer batched with a long one no longer carries the long one's pads: with the loss normalised
    by answer length, 8 answer tokens padded to 98 get 1/98 of their example's weight each."""

    GROUP_POOL = 16

    def __init__(self, examples: list[SFTExample], batch_size: int, *, seed: int, pad_id: int,
                 group_by_length: bool = False) -> None:
        if not examples:
            raise RemaskError("no SFT examples to train on")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.group_by_length = group_by_length
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            rng = np.random.default_rng(step_seed(self.seed, epoch, Stream.SFT_ORDER))
            order = rng.permutation(len(self.examples))
            if self.group_by_length:
                order = self._grouped(order, rng)
            self._orders[epoch] = order
        return self._orders[epoch]

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size, out = self.batch_size * self.GROUP_POOL, []
        for start in range(0, len(order), size):
            pool = sorted(order[start:start + size].tolist(), key=lambda i: len(self.examples[i].ids))
            batches = [pool[j:j + self.batch_size] for j in range(0, len(pool), self.batch_size)]
            out += [i for b in rng.permutation(len(batches)) for i in batches[b]]
        return np.array(out)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, first = len(self.examples), step * self.batch_size
        picks = [int(self.order(i // n)[i % n]) for i in range(first, first + self.batch_size)]
        return sft_batch([self.examples[i] for i in picks], pad_id=self.pad_id)
