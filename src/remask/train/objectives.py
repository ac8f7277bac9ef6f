"""The training objectives: a table keyed by (task, objective) of (make_inputs, loss) pairs over
typed batch records. Training and validation both go through it, so they cannot drift apart.

Three objectives: LLaDA's masked diffusion (mdm), the AR twin's next-token loss (ar) and block
diffusion (bd, BD3-LM). `make_inputs` draws all randomness for a whole global batch at once (so every distributed rank
and every micro-batch split sees the masks a single process would); `loss` computes the loss of
any row slice of those inputs (`inputs.rows(slice)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Self

import torch
from torch import Tensor, nn

from remask.diffusion import ar_loss, forward_mask, mdm_loss, sft_loss
from remask.diffusion.block import answer_offsets, block_forward_mask, row_positions, two_stream_logits

Task = Literal["pretrain", "sft"]
ObjectiveName = Literal["mdm", "ar", "bd"]


class Rows:
    """A record of tensors that share their first (batch) dimension; None fields stay None."""

    def rows(self, index: slice) -> Self:
        return dataclasses.replace(self, **{f.name: v[index] for f in dataclasses.fields(self)
                                            if isinstance(v := getattr(self, f.name), Tensor)})

    def to(self, device: torch.device) -> Self:
        return dataclasses.replace(self, **{f.name: v.to(device, non_blocking=True) for f in dataclasses.fields(self)
                                            if isinstance(v := getattr(self, f.name), Tensor)})

    def __len__(self) -> int:
        return next(v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), Tensor)).shape[0]


# --- batches (what the data pipelines produce) ---------------------------------------------------


@dataclass(frozen=True)
class TextBatch(Rows):
    """Pretraining: fixed-length chunks of the packed token stream."""

    ids: Tensor  # (B, L)


@dataclass(frozen=True)
class DialogueBatch(Rows):
    """SFT: prompt + answer per row, right-padded with EOS (LLaDA section 2.3)."""

    ids: Tensor  # (B, L)
    prompt_lengths: Tensor  # (B,)
    pad_mask: Tensor  # (B, L) True on the EOS padding


Batch = TextBatch | DialogueBatch


def batch_tokens(batch: Batch) -> int:
    return int(batch.ids.numel())


# --- inputs (what a loss consumes) -------------------------------------------------------------------


@dataclass(frozen=True)
class MaskedInputs(Rows):
    """The forward process applied: noisy ids, which positions were masked, at what rate."""

    ids: Tensor  # (B, L) clean targets
    noisy: Tensor  # (B, L)
    masked: Tensor  # (B, L) bool
    p: Tensor  # (B, 1) each row's mask probability
    answer_lengths: Tensor | None = None  # (B,) SFT: answer length, EOS padding included


@dataclass(frozen=True)
class NextTokenInputs(Rows):
    ids: Tensor  # (B, L)
    loss_mask: Tensor | None = None  # (B, L) target positions that count (SFT: the answers)


@dataclass(frozen=True)
class BlockInputs(MaskedInputs):
    """Block diffusion's forward process applied: p per position (its block's rate), and the rotary
    positions that place each row on the block grid."""

    positions: Tensor | None = None  # (B, L)
    block_length: int = 1  # L'
    kernel: str = "sdpa"  # the two-stream pass's attention (diffusion.block.KERNELS)


Inputs = MaskedInputs | NextTokenInputs | BlockInputs


@dataclass(frozen=True)
class Noise:
    """How the forward process corrupts a batch (the objective ignores what it does not use)."""

    mask_id: int
    eps: float = 1e-3  # p = (1 - eps) t + eps
    stratified: bool = False  # t one per stratum of the range (an unbiased, lower-variance draw)
    t_range: tuple[float, float] = (0.0, 1.0)  # t ~ U[t_range]; narrower: BD3-LM's clipped schedule
    block_length: int | None = None  # block diffusion's L'
    kernel: str = "sdpa"  # block diffusion's two-stream attention: sdpa or flex

    def full_range(self) -> Noise:
        """The same noise with t on all of [0, 1]: the likelihood bound (validation reports it)."""
        return dataclasses.replace(self, t_range=(0.0, 1.0))


def prompt_mask(batch: DialogueBatch) -> Tensor:
    """(B, L) True on each row's prompt positions."""
    return torch.arange(batch.ids.shape[1], device=batch.ids.device)[None, :] < batch.prompt_lengths[:, None]


def pretrain_mdm_inputs(batch: TextBatch, noise: Noise, generator: torch.Generator | None) -> MaskedInputs:
    noisy, masked, p = forward_mask(batch.ids, mask_id=noise.mask_id, eps=noise.eps, stratified=noise.stratified,
                                    t_range=noise.t_range, generator=generator)  # eq. (3)
    return MaskedInputs(batch.ids, noisy, masked, p)


def sft_mdm_inputs(batch: DialogueBatch, noise: Noise, generator: torch.Generator | None) -> MaskedInputs:
    # Section 2.3: the prompt is never masked; EOS padding counts as answer.
    noisy, masked, p = forward_mask(batch.ids, mask_id=noise.mask_id, eps=noise.eps, maskable=~prompt_mask(batch),
                                    stratified=noise.stratified, t_range=noise.t_range, generator=generator)
    return MaskedInputs(batch.ids, noisy, masked, p, batch.ids.shape[1] - batch.prompt_lengths)


def pretrain_ar_inputs(batch: TextBatch, noise: Noise, generator: torch.Generator | None) -> NextTokenInputs:
    return NextTokenInputs(batch.ids)


def sft_ar_inputs(batch: DialogueBatch, noise: Noise, generator: torch.Generator | None) -> NextTokenInputs:
    return NextTokenInputs(batch.ids, ~prompt_mask(batch) & ~batch.pad_mask)  # the AR twin does not learn the padding


def pretrain_bd_inputs(batch: TextBatch, noise: Noise, generator: torch.Generator | None) -> BlockInputs:
    # Packed text: documents start anywhere in a row, so the grid starting at 0 covers every alignment.
    positions = row_positions(batch.ids.shape[1], torch.zeros(len(batch), dtype=torch.long, device=batch.ids.device))
    noisy, masked, p = block_forward_mask(batch.ids, positions, noise.block_length, mask_id=noise.mask_id, eps=noise.eps,
                                          t_range=noise.t_range, stratified=noise.stratified, generator=generator)
    return BlockInputs(batch.ids, noisy, masked, p, positions=positions, block_length=noise.block_length,
                       kernel=noise.kernel)


def sft_bd_inputs(batch: DialogueBatch, noise: Noise, generator: torch.Generator | None) -> BlockInputs:
    # The answer starts on a block boundary (as the sampler decodes it); the prompt is never masked.
    positions = row_positions(batch.ids.shape[1], answer_offsets(batch.prompt_lengths, noise.block_length))
    noisy, masked, p = block_forward_mask(batch.ids, positions, noise.block_length, mask_id=noise.mask_id, eps=noise.eps,
                                          t_range=noise.t_range, maskable=~prompt_mask(batch),
                                          stratified=noise.stratified, generator=generator)
    return BlockInputs(batch.ids, noisy, masked, p, batch.ids.shape[1] - batch.prompt_lengths, positions,
                       noise.block_length, noise.kernel)


def pretrain_mdm_loss(model: nn.Module, inputs: MaskedInputs) -> Tensor:
    return mdm_loss(model(inputs.noisy), inputs.ids, inputs.masked, inputs.p)


def sft_mdm_loss(model: nn.Module, inputs: MaskedInputs) -> Tensor:
    return sft_loss(model(inputs.noisy), inputs.ids, inputs.masked, inputs.p, inputs.answer_lengths)


def next_token_loss(model: nn.Module, inputs: NextTokenInputs) -> Tensor:
    return ar_loss(model(inputs.ids), inputs.ids, inputs.loss_mask)


def block_logits(model: nn.Module, inputs: BlockInputs) -> Tensor:
    return two_stream_logits(model, inputs.noisy, inputs.ids, inputs.positions, inputs.block_length, inputs.kernel)


def pretrain_bd_loss(model: nn.Module, inputs: BlockInputs) -> Tensor:
    return mdm_loss(block_logits(model, inputs), inputs.ids, inputs.masked, inputs.p)  # BD3-LM eq. (7)


def sft_bd_loss(model: nn.Module, inputs: BlockInputs) -> Tensor:
    return sft_loss(block_logits(model, inputs), inputs.ids, inputs.masked, inputs.p, inputs.answer_lengths)


@dataclass(frozen=True)
class Objective:
    make_inputs: Callable[[Batch, Noise, torch.Generator | None], Inputs]
    loss: Callable[[nn.Module, Inputs], Tensor]
    validation_draws: int  # mask draws per held-out batch when validating (1: nothing is random)


OBJECTIVES: dict[tuple[Task, ObjectiveName], Objective] = {
    ("pretrain", "mdm"): Objective(pretrain_mdm_inputs, pretrain_mdm_loss, validation_draws=4),
    ("pretrain", "ar"): Objective(pretrain_ar_inputs, next_token_loss, validation_draws=1),
    ("sft", "mdm"): Objective(sft_mdm_inputs, sft_mdm_loss, validation_draws=4),
    ("sft", "ar"): Objective(sft_ar_inputs, next_token_loss, validation_draws=1),
    ("pretrain", "bd"): Objective(pretrain_bd_inputs, pretrain_bd_loss, validation_draws=4),
    ("sft", "bd"): Objective(sft_bd_inputs, sft_bd_loss, validation_draws=4),
}
