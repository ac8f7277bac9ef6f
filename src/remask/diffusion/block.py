"""Block diffusion's forward process and its training layout (BD3-LM, Arriola et al., ICLR 2025).

The sequence is cut into blocks of L' positions: position p (a rotary position) is in block
p // L'. Blocks are generated left to right, the tokens of a block by masked diffusion given the
clean blocks before it, so the negative ELBO is a sum over blocks of the masked-diffusion bound of
each block conditioned on the clean prefix (BD3-LM eq. 7):
    -log p(x) <= sum_b E_t [ 1/t * sum over masked i in block b of -log p(x_i | x_t^b, x^{<b}) ]
for the linear schedule (alpha_t = 1 - t, weight -alpha'_t / (1 - alpha_t) = 1/t). Each block has
its own t; training may draw it from a clipped range [t_min, t_max] (BD3-LM section 4: clipping
away the near-empty and near-full masks lowers the variance of the gradient), which estimates a
reweighted objective; the bound itself uses [0, 1].

One forward pass serves all blocks (BD3-LM section 3.2): the noisy sequence and the clean one side
by side (2L positions, the same rotary positions twice), under a mask that lets a noisy block see
itself and the clean blocks before it, and a clean block see itself and the clean blocks before
it. The noisy half's logits then equal, block by block, a block-causal pass over
(clean blocks before b, noisy block b) -- the loop this replaces (tests check it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from remask.diffusion.likelihood import (
    LikelihoodEstimate,
    check_mc,
    estimate,
    exact_log_likelihood_bound,
    stratified_mask_counts,
    token_log_probs,
)
from remask.diffusion.masking import MaskedBatch, draw_t, mask_exactly, mask_probability
from remask.errors import RemaskError


def row_positions(length: int, offsets: Tensor) -> Tensor:
    """(B, L) rotary positions of rows that start at `offsets` (B,): the block grid is shifted so
    that a row's position `offsets + k` lands where its own text needs a block boundary."""
    return offsets[:, None] + torch.arange(length, device=offsets.device)[None, :]


def answer_offsets(prompt_lengths: Tensor, block_length: int) -> Tensor:
    """(B,) the position shift that starts each answer on a block boundary: the prompt then fills
    whole blocks (the first one shorter), and the answer's blocks are whole blocks of L'. SFT
    trains with it and the sampler decodes with it, so both see the same grid."""
    return (-prompt_lengths) % block_length


def block_forward_mask(ids: Tensor, positions: Tensor, block_length: int, *, mask_id: int, eps: float = 1e-3,
                       t_range: tuple[float, float] = (0.0, 1.0), maskable: Tensor | None = None,
                       stratified: bool = False, generator: torch.Generator | None = None) -> MaskedBatch:
    """Mask each maskable token of `ids` (B, L) with the probability p = (1 - eps) t + eps of its
    block, t ~ U[t_range] drawn per (row, block) (`stratified`: one per stratum over all of them).
    `positions` (B, L) give the blocks. Returns noisy ids, the mask and p per position (B, L)."""
    B, L = ids.shape
    blocks = torch.div(positions, block_length, rounding_mode="floor")  # (B, L)
    first = blocks[:, :1]
    n_blocks = int((blocks[:, -1:] - first).max()) + 1
    gen_device = generator.device if generator is not None else ids.device
    t = draw_t(B * n_blocks, t_range=t_range, stratified=stratified, generator=generator, device=gen_device)
    p_block = mask_probability(t.float().view(B, n_blocks), eps).to(ids.device)  # (B, n_blocks)
    p = p_block.gather(1, blocks - first)  # (B, L)
    u = torch.rand(B, L, generator=generator, device=gen_device).to(ids.device)
    masked = u < p
    if maskable is not None:
        masked &= maskable.to(ids.device)
    return MaskedBatch(ids.masked_fill(masked, mask_id), masked, p)


def two_stream_mask(positions: Tensor, block_length: int) -> Tensor:
    """(B, 1, 2L, 2L) boolean attention mask (True = may attend) for the pass over the noisy
    sequence (first L) and the clean one (last L) with the same `positions` (B, L):
      noisy block b -> noisy block b (block-diagonal) and clean blocks < b (offset block-causal);
      clean block b -> clean blocks <= b (block-causal); never a noisy position."""
    blocks = torch.div(positions, block_length, rounding_mode="floor")  # (B, L)
    q, k = blocks[:, :, None], blocks[:, None, :]  # (B, L, 1), (B, 1, L)
    noisy_noisy = q == k
    noisy_clean = k < q
    clean_clean = k <= q
    top = torch.cat([noisy_noisy, noisy_clean], dim=2)  # (B, L, 2L)
    bottom = torch.cat([torch.zeros_like(clean_clean), clean_clean], dim=2)
    return torch.cat([top, bottom], dim=1)[:, None]  # (B, 1, 2L, 2L)


def two_stream_block_mask(positions: Tensor, block_length: int):
    """`two_stream_mask` as a FlexAttention `BlockMask` (the same pattern, as a rule over query and
    key indices), for FlexAttention's block-sparse kernel: tiles the pattern masks whole (such as a
    clean query tile against the noisy half) are skipped. `positions` (1, L) shared by every row, or (B, L)."""
    from torch.nn.attention.flex_attention import create_block_mask

    blocks = torch.div(positions, block_length, rounding_mode="floor")  # (B or 1, L)
    B, L = blocks.shape

    def rule(b, h, q, k):
        row = b if B > 1 else 0  # one grid: every row reads it
        qb, kb = blocks[row, q % L], blocks[row, k % L]
        q_noisy, k_noisy = q < L, k < L
        return (q_noisy & k_noisy & (qb == kb)) | (q_noisy & ~k_noisy & (kb < qb)) | (~q_noisy & ~k_noisy & (kb <= qb))

    return create_block_mask(rule, B=B if B > 1 else None, H=None, Q_LEN=2 * L, KV_LEN=2 * L, device=positions.device)


def two_stream_inputs(noisy: Tensor, clean: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """(ids (B, 2L), positions (B, 2L)) of the side-by-side pass: noisy first, then clean."""
    return torch.cat([noisy, clean], dim=1), torch.cat([positions, positions], dim=1)


# --- likelihood: the NELBO, a sum of per-block bounds -------------------------------------------------


def block_spans(start: int, stop: int, block_length: int) -> list[slice]:
    """The answer's blocks: [start, stop) cut every block_length positions (the last may be shorter)."""
    return [slice(a, min(a + block_length, stop)) for a in range(start, stop, block_length)]


KERNELS = ("sdpa", "flex")  # how the two-stream pass attends: a boolean mask, or FlexAttention's BlockMask


def two_stream_logits(model: Callable[..., Tensor], noisy: Tensor, clean: Tensor, positions: Tensor,
                      block_length: int, kernel: str = "sdpa") -> Tensor:
    """(B, L, V) the noisy half's logits of the one pass over noisy + clean (`model` a Transformer),
    its mask a boolean one (`sdpa`) or FlexAttention's (`flex`)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    ids, pos = two_stream_inputs(noisy, clean, positions)
    grid = positions[:1] if bool((positions == positions[:1]).all()) else positions  # one mask for all rows when it can
    mask = two_stream_block_mask(grid, block_length) if kernel == "flex" else two_stream_mask(grid, block_length)
    return model(ids, None, pos, mask=mask, logits_at=slice(0, noisy.shape[1]))


@torch.no_grad()
def block_log_likelihood(model: Callable[..., Tensor], prompt: Tensor, answer: Tensor, block_length: int, *,
                         mask_id: int, mc_num: int = 128, batch_size: int = 16, vocab_size: int | None = None,
                         generator: torch.Generator | None = None) -> LikelihoodEstimate:
    """Monte-Carlo lower bound on log p(answer | prompt) under a block model: the sum over the
    answer's blocks (the answer starting on a block boundary) of each block's bound given the clean
    blocks before it (BD3-LM eq. 7), every block estimated at once from one two-stream pass per
    draw. Each block b of n_b positions masks exactly l_b ~ U{1..n_b} of them (stratified over the
    batch) with weight n_b / l_b (LLaDA eq. 14, block by block). prompt (P,), answer (A,)."""
    check_mc(mc_num, batch_size)
    P, A = prompt.numel(), answer.numel()
    if A == 0:
        raise RemaskError("the answer is empty")
    seq = torch.cat([prompt, answer]).to(answer.device)[None].expand(batch_size, -1)  # (b, P + A)
    grid = answer_offsets(torch.tensor([P], device=seq.device), block_length)
    positions = row_positions(P + A, grid).expand(batch_size, -1)
    spans = block_spans(P, P + A, block_length)
    terms = []
    for _ in range(mc_num // batch_size):
        masked = torch.zeros_like(seq, dtype=torch.bool)
        weight = torch.zeros(seq.shape, dtype=torch.float64, device=seq.device)
        for span in spans:  # each block: exactly l of its n positions, weight n / l
            n = span.stop - span.start
            counts = stratified_mask_counts(batch_size, n, generator=generator).to(seq.device)
            _, m = mask_exactly(seq[:, span], counts, mask_id=mask_id, generator=generator)
            masked[:, span] = m
            weight[:, span] = (n / counts.double())[:, None]
        logits = two_stream_logits(model, seq.masked_fill(masked, mask_id), seq, positions, block_length)
        logits = logits if vocab_size is None else logits[..., :vocab_size]
        terms.append((token_log_probs(logits, seq).double() * masked * weight).sum(1))
    return estimate(terms)


@torch.no_grad()
def exact_block_bound(model: Callable[..., Tensor], prompt: Tensor, answer: Tensor, block_length: int, *,
                      mask_id: int, vocab_size: int | None = None) -> float:
    """The exact expectation of `block_log_likelihood`'s term: for every block, every mask subset
    of it enumerated (`exact_log_likelihood_bound`) with the prompt and the clean blocks before it
    as the context, through the block model's own single-stream pass. Refuses a block over 16."""
    P = prompt.numel()
    seq = torch.cat([prompt, answer]).to(answer.device)
    grid = int(answer_offsets(torch.tensor(P), block_length))

    def model_fn(ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        logits = model(ids, attention_mask, grid + torch.arange(ids.shape[1], device=ids.device))
        return logits if vocab_size is None else logits[..., :vocab_size]

    return sum(exact_log_likelihood_bound(model_fn, seq[:span.start], seq[span], mask_id=mask_id)
               for span in block_spans(P, P + answer.numel(), block_length))
