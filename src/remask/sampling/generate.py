"""LLaDA's reverse-process sampler (section 2.4; appendix B.2 Algorithms 4-5; B.3 blocks and CFG).

Start from the prompt followed by `gen_length` mask tokens. Blocks are filled left to right;
inside a block, each step predicts every masked token at once, commits the `k` most confident
predictions (k from the linear schedule) and leaves the rest masked. Committed tokens are never
masked again, and nothing after the current block is revealed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from remask.diffusion.guidance import ModelFn, guided_logits
from remask.errors import RemaskError
from remask.sampling.config import SamplerConfig
from remask.sampling.remasking import REMASKING, gumbel_argmax
from remask.sampling.schedule import block_slices, num_transfer_tokens


@dataclass
class StepInfo:
    """What an `on_step` callback sees after each reverse step."""

    step: int  # global step index, 0-based
    block: int
    x: Tensor  # (B, P + gen_length) state after this step
    revealed: Tensor  # (B, P + gen_length) bool: positions committed at this step
    reveal_step: Tensor  # (B, P + gen_length) long: the step that revealed each position, -1 if none yet
    prompt_len: int  # P: answer positions start here
    done: bool  # the last step: the schedule is complete, or every answer has ended

    def answer(self, row: int = 0) -> tuple[list[int], list[int]]:
        """(ids, reveal steps) of one row's answer positions."""
        return self.x[row, self.prompt_len:].tolist(), self.reveal_step[row, self.prompt_len:].tolist()


def check_prompt(prompt: Tensor, attention_mask: Tensor | None, mask_id: int) -> None:
    """Raise RemaskError unless `prompt` is a non-empty (B, P) integer batch whose real positions
    (attention_mask 1; all when None) hold no mask token."""
    if prompt.dim() != 2 or prompt.shape[0] == 0:
        raise RemaskError(f"prompt must be a non-empty 2-D (batch, length) tensor, got shape {tuple(prompt.shape)}")
    if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
        raise RemaskError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    if attention_mask is not None and attention_mask.shape != prompt.shape:
        raise RemaskError(f"attention_mask shape {tuple(attention_mask.shape)} does not match prompt shape "
                          f"{tuple(prompt.shape)}")
    real = prompt == mask_id if attention_mask is None else (prompt == mask_id) & attention_mask.bool()
    if real.any():
        raise RemaskError(f"prompt contains the mask token (id {mask_id}) at a real position")


def anchor_id(sampler: SamplerConfig, eos_ids: Sequence[int]) -> int | None:
    """The end-of-text id fixed at the answer's last position under sampler.anchor_eos, else None."""
    if not sampler.anchor_eos:
        return None
    if not eos_ids:
        raise RemaskError("anchor_eos needs an end-of-text token, and this tokenizer has none")
    return int(eos_ids[0])


def append_masks(prompt: Tensor, attention_mask: Tensor | None, gen_length: int,
                 mask_id: int, end_id: int | None = None) -> tuple[Tensor, Tensor | None]:
    """x_1 of the reverse process: prompt (B, P) + gen_length masks -> (B, P + gen_length), the
    last of them `end_id` when given (an answer that must end within gen_length); the attention
    mask, if any, is extended with ones (the answer is always attended)."""
    B = prompt.shape[0]
    x = torch.cat([prompt, prompt.new_full((B, gen_length), mask_id)], dim=1)
    if end_id is not None:
        x[:, -1] = end_id
    if attention_mask is None:
        return x, None
    return x, torch.cat([attention_mask, attention_mask.new_ones((B, gen_length))], dim=1)


def ban_tokens(logits: Tensor, ids: Tensor) -> Tensor:
    """`logits` (..., V) with the columns `ids` set to -inf, so they are never sampled."""
    V = logits.shape[-1]
    if ids.numel() and (ids.min() < 0 or ids.max() >= V):
        raise RemaskError(f"token ids {ids.tolist()} must lie in the model's vocabulary [0, {V})")
    return logits.index_fill(-1, ids, float("-inf"))


def select_top_k(score: Tensor, tier: Tensor, k: Tensor) -> Tensor:
    """(B, N) bool: per row the k[b] positions first in the order (tier ascending, score
    descending, position ascending). Lexicographic, so no sentinel value can collide."""
    order = score.sort(dim=-1, descending=True, stable=True).indices  # (B, N)
    order = order.gather(-1, tier.gather(-1, order).sort(dim=-1, stable=True).indices)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                           .expand_as(order))
    return rank < k[:, None]


def denoise_step(logits: Tensor, x_block: Tensor, k: Tensor, sampler: SamplerConfig, *, mask_id: int,
                 eos: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One reverse step on a block: logits (B, N, V), x_block (B, N), k (B,) -> (new block, committed).

    Only masked positions are candidates (tier 0; EOS predictions tier 1 under eos="delay");
    unmasked positions (tier 2) are never chosen, as sum(k) never exceeds the masks left.
    """
    mask_col = torch.tensor([mask_id], device=logits.device)
    # x0 is a clean token: [M] is not in the data distribution that p_theta predicts (eq. 4).
    banned = torch.cat([mask_col, eos]) if sampler.eos == "forbid" else mask_col
    logits = ban_tokens(logits, banned)
    x0 = gumbel_argmax(logits, sampler.temperature, generator)  # (B, N)
    score = REMASKING[sampler.remasking](logits, x0, generator)  # (B, N) float64
    late = torch.isin(x0, eos) if sampler.eos == "delay" else torch.zeros_like(x0, dtype=torch.bool)
    tier = torch.where(x_block == mask_id, late.long(), 2)
    chosen = select_top_k(score, tier, k) & (x_block == mask_id)
    return torch.where(chosen, x0, x_block), chosen


def answers_ended(x: Tensor, prompt_len: int, stop: Tensor, mask_id: int) -> Tensor:
    """(B,) bool: the answer holds a stop token with every position before it revealed -- nothing
    later can change the answer text any more (committed tokens are final)."""
    answer = x[:, prompt_len:]  # (B, N)
    is_stop = torch.isin(answer, stop)
    first = torch.where(is_stop.any(1), is_stop.int().argmax(1), answer.shape[1])  # (B,)
    masked_before = ((answer == mask_id) & (torch.arange(answer.shape[1], device=x.device) < first[:, None])).any(1)
    return is_stop.any(1) & ~masked_before


def commit(x: Tensor, block: slice, new_block: Tensor, chosen: Tensor) -> tuple[Tensor, Tensor]:
    """A new state (B, L) with `new_block` written into `block`, and the (B, L) revealed mask."""
    x = x.clone()
    x[:, block] = new_block
    revealed = torch.zeros_like(x, dtype=torch.bool)
    revealed[:, block] = chosen
    return x, revealed


@torch.no_grad()
def generate(model_fn: ModelFn, prompt: Tensor, sampler: SamplerConfig, *, mask_id: int,
             attention_mask: Tensor | None = None, eos_ids: Sequence[int] = (),
             generator: torch.Generator | None = None,
             on_step: Callable[[StepInfo], None] | None = None) -> Tensor:
    """Fill sampler.gen_length masked positions after `prompt` (B, P); returns (B, P + gen_length).

    Left-padded rows are marked 0 in `attention_mask` (B, P); the prompt is never changed.
    `eos_ids` are the end-of-text ids: sampler.eos forbids or delays them, and with
    sampler.stop_at_eos sampling stops once every row's answer has ended (positions after the
    end-of-text may then still hold the mask id). `on_step` sees each step.
    """
    check_prompt(prompt, attention_mask, mask_id)
    P = prompt.shape[1]
    x, attn = append_masks(prompt, attention_mask, sampler.gen_length, mask_id, anchor_id(sampler, eos_ids))
    is_prompt = torch.arange(x.shape[1], device=x.device) < P  # (L,) masked in CFG's unconditional branch
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=x.device)
    reveal_step = torch.full_like(x, -1)
    blocks = block_slices(P, sampler.gen_length, sampler.effective_block_length)
    for b, block in enumerate(blocks):
        counts = num_transfer_tokens(x[:, block] == mask_id, sampler.steps_per_block)  # (B, S)
        for s, k in enumerate(counts.unbind(1)):
            logits = guided_logits(model_fn, x, is_prompt, sampler.cfg_scale, mask_id, attn)[:, block]  # (B, N, V)
            new_block, chosen = denoise_step(logits, x[:, block], k, sampler, mask_id=mask_id, eos=eos,
                                             generator=generator)
            x, revealed = commit(x, block, new_block, chosen)
            step = b * sampler.steps_per_block + s
            reveal_step = reveal_step.masked_fill(revealed, step)
            ended = sampler.stop_at_eos and eos.numel() > 0 and bool(answers_ended(x, P, eos, mask_id).all())
            last = ended or (b == len(blocks) - 1 and s == sampler.steps_per_block - 1)
            if on_step is not None:
                on_step(StepInfo(step, b, x, revealed, reveal_step, P, last))
            if ended:
                return x
    return x


@torch.no_grad()
def fill_masks(model_fn: ModelFn, x: Tensor, sampler: SamplerConfig, *, mask_id: int,
               generator: torch.Generator | None = None, region: slice | None = None) -> Tensor:
    """Infilling: reveal every mask token of `x` (B, L) inside `region` (all positions when None),
    wherever it stands, over sampler.steps steps (the linear schedule over each row's masks there;
    remasking and temperature as configured; gen_length and blocks do not apply). The other
    positions are context and never change: masks outside `region` stay masks, text the model
    is told nothing about."""
    if x.dim() != 2:
        raise RemaskError(f"x must be a 2-D (batch, length) tensor, got shape {tuple(x.shape)}")
    region = slice(0, x.shape[1]) if region is None else region
    counts = num_transfer_tokens(x[:, region] == mask_id, sampler.steps)  # (B, S)
    eos = torch.empty(0, dtype=torch.long, device=x.device)
    for k in counts.unbind(1):
        logits = guided_logits(model_fn, x, torch.zeros(x.shape[1], dtype=torch.bool, device=x.device),
                               0.0, mask_id)[:, region]
        new, chosen = denoise_step(logits, x[:, region], k, sampler.replace(eos="allow"), mask_id=mask_id, eos=eos,
                                   generator=generator)
        x, _ = commit(x, region, new, chosen)
    return x
