"""The AR twin's decoding: one token at a time, left to right, for the side-by-side comparisons
(the reversal benchmark, evaluation). Greedy at temperature 0, else Gumbel-max sampling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from remask.diffusion.guidance import ModelFn
from remask.errors import RemaskError
from remask.model import KV
from remask.sampling.remasking import gumbel_argmax


@torch.no_grad()
def ar_generate(model_fn: ModelFn, prompt: Tensor, max_new_tokens: int, *, eos_ids: Sequence[int] = (),
                attention_mask: Tensor | None = None, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
    """prompt (B, P) -> (B, P + n), n <= max_new_tokens: stops once every row has produced an end-of-text
    (rows that ended early are padded with their end-of-text token). Left-padded rows are marked 0
    in `attention_mask` (B, P)."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise RemaskError(f"prompt must be a non-empty 2-D (batch, length) tensor, got shape {tuple(prompt.shape)}")
    stop = torch.tensor(list(eos_ids), dtype=torch.long, device=prompt.device)
    x, done = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    attn = attention_mask
    for _ in range(max_new_tokens):
        nxt = gumbel_argmax(model_fn(x, attn)[:, -1:], temperature, generator)[:, 0]  # (B,)
        if attn is not None:
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
        if stop.numel():
            nxt = torch.where(done, stop[0], nxt)
            done = done | torch.isin(nxt, stop)
        x = torch.cat([x, nxt[:, None]], dim=1)
        if done.all():
            break
    return x


def next_tokens(logits: Tensor, temperature: float, generator: torch.Generator | Sequence[torch.Generator] | None,
                rows: Tensor) -> Tensor:
    """The next token of each row from its last logits (b, 1, V): one shared generator, or with a
    sequence of generators, row `rows[i]`'s own (so a row's draws do not depend on its batch)."""
    if generator is None or isinstance(generator, torch.Generator) or temperature == 0:
        return gumbel_argmax(logits, temperature, generator if isinstance(generator, torch.Generator) else None)[:, 0]
    return torch.cat([gumbel_argmax(logits[i:i + 1], temperature, generator[int(r)])[:, 0] for i, r in enumerate(rows)])


@torch.no_grad()
def ar_generate_cached(model, prompt: Tensor, max_new_tokens: int, *, vocab_size: int, eos_ids: Sequence[int] = (),
                       attention_mask: Tensor | None = None, temperature: float = 0.0,
                       generator: torch.Generator | Sequence[torch.Generator] | None = None) -> tuple[Tensor, int]:
    """`ar_generate` with a KV cache (the AR twin's own fast path): one prefill pass over the prompt,
    then one pass per token over that token alone; rows that have ended leave the batch. Returns
    (B, P + n) and the number of forward passes. The model is a `Transformer` (see `remask.model`).
    `generator`: one for the batch, or one per row."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise RemaskError(f"prompt must be a non-empty 2-D (batch, length) tensor, got shape {tuple(prompt.shape)}")
    B, P = prompt.shape
    stop = torch.tensor(list(eos_ids), dtype=torch.long, device=prompt.device)
    fill = stop[0] if stop.numel() else torch.tensor(0, device=prompt.device)
    out = torch.full((B, P + max_new_tokens), int(fill), dtype=torch.long, device=prompt.device)
    out[:, :P] = prompt
    logits, cache = model(prompt, attention_mask, return_kv=True, logits_at=slice(P - 1, P))
    cache = KV.allocate(cache, P + max_new_tokens)  # each token's keys/values written in place, nothing copied
    passes, alive, length = 1, torch.arange(B, device=prompt.device), 0
    for t in range(max_new_tokens):
        nxt = next_tokens(logits[:, -1:, :vocab_size], temperature, generator, alive)  # (b,)
        out[alive, P + t] = nxt
        length = t + 1
        keep = ~torch.isin(nxt, stop) if stop.numel() else torch.ones_like(nxt, dtype=torch.bool)
        if not keep.all():
            alive, nxt, cache = alive[keep], nxt[keep], cache.rows(keep)
        if alive.numel() == 0 or t == max_new_tokens - 1:
            break
        positions = torch.tensor([P + t], device=prompt.device)
        logits = model(nxt[:, None], None, positions, past=cache)
        passes += 1
    return out[:, :P + length], passes
