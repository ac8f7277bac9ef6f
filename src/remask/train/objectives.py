"""The training objectives: a table keyed by (task, objective) of (make_inputs, loss) pairs over
typed batch records. Training and validation both go through it, so they cannot drift apart.

`make_inputs` draws all randomness for a whole global batch at once (so every distributed rank
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

Task = Literal["pretrain", "sft"]
ObjectiveName = Literal["mdm", "ar"]


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


Inputs = MaskedInputs | NextTokenInputs


def pretrain_mdm_inputs(batch: TextBatch, *, mask_id: int, eps: float, stratified: bool = False,
                        generator: torch.Generator | None) -> MaskedInputs:
    noisy, masked, p = forward_mask(batch.ids, mask_id=mask_id, eps=eps, stratified=stratified,
                                    generator=generator)  # eq. (3)
    return MaskedInputs(batch.ids, noisy, masked, p)


def sft_mdm_inputs(batch: DialogueBatch, *, mask_id: int, eps: float, stratified: bool = False,
                   generator: torch.Generator | None) -> MaskedInputs:
    # Section 2.3: the prompt is never masked; EOS padding counts as answer.
    L = batch.ids.shape[1]
    prompt = torch.arange(L, device=batch.ids.device)[None, :] < batch.prompt_lengths[:, None]  # (B, L)
    noisy, masked, p = forward_mask(batch.ids, mask_id=mask_id, eps=eps, maskable=~prompt, stratified=stratified,
                                    generator=generator)
    return MaskedInputs(batch.ids, noisy, masked, p, L - batch.prompt_lengths)


def pretrain_ar_inputs(batch: TextBatch, *, mask_id: int, eps: float, stratified: bool = False,
                       generator: torch.Generator | None) -> NextTokenInputs:
    return NextTokenInputs(batch.ids)


def sft_ar_inputs(batch: DialogueBatch, *, mask_id: int, eps: float, stratified: bool = False,
                  generator: torch.Generator | None) -> NextTokenInputs:
    L = batch.ids.shape[1]
    prompt = torch.arange(L, device=batch.ids.device)[None, :] < batch.prompt_lengths[:, None]
    return NextTokenInputs(batch.ids, ~prompt & ~batch.pad_mask)  # the AR twin does not learn the padding


def pretrain_mdm_loss(model: nn.Module, inputs: MaskedInputs) -> Tensor:
    return mdm_loss(model(inputs.noisy), inputs.ids, inputs.masked, inputs.p)


def sft_mdm_loss(model: nn.Module, inputs: MaskedInputs) -> Tensor:
    return sft_loss(model(inputs.noisy), inputs.ids, inputs.masked, inputs.p, inputs.answer_lengths)


def next_token_loss(model: nn.Module, inputs: NextTokenInputs) -> Tensor:
    return ar_loss(model(inputs.ids), inputs.ids, inputs.loss_mask)


@dataclass(frozen=True)
class Objective:
    make_inputs: Callable[..., Inputs]  # (batch, *, mask_id, eps, stratified, generator) -> inputs
    loss: Callable[[nn.Module, Inputs], Tensor]
    validation_draws: int  # mask draws per held-out batch when validating (1: nothing is random)


OBJECTIVES: dict[tuple[Task, ObjectiveName], Objective] = {
    ("pretrain", "mdm"): Objective(pretrain_mdm_inputs, pretrain_mdm_loss, validation_draws=4),
    ("pretrain", "ar"): Objective(pretrain_ar_inputs, next_token_loss, validation_draws=1),
    ("sft", "mdm"): Objective(sft_mdm_inputs, sft_mdm_loss, validation_draws=4),
    ("sft", "ar"): Objective(sft_ar_inputs, next_token_loss, validation_draws=1),
}
