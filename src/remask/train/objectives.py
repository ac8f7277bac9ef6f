"""The four training objectives as (inputs, loss) pairs over the diffusion library's functions.

`make_inputs` draws all randomness for a whole global batch at once (so every distributed rank
and every micro-batch split sees the same masks a single process would); `batch_loss` computes
the loss of any row slice of those inputs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from remask.diffusion import ar_loss, forward_mask, mdm_loss, sft_loss

Task = Literal["pretrain", "sft"]
Objective = Literal["mdm", "ar"]
# A pretraining batch is ids (B, L); an SFT batch is (ids, prompt_lengths (B,), pad_mask (B, L)).
Batch = Tensor | tuple[Tensor, Tensor, Tensor]


def make_inputs(task: Task, objective: Objective, batch: Batch, *, mask_id: int, eps: float,
                generator: torch.Generator | None) -> dict[str, Tensor]:
    """Every tensor in the result has the batch as its first dimension."""
    if task == "pretrain":
        ids = batch
        if objective == "ar":
            return {"ids": ids}
        noisy, masked, p = forward_mask(ids, mask_id=mask_id, eps=eps, generator=generator)  # eq. (3)
        return {"ids": ids, "noisy": noisy, "masked": masked, "p": p}
    ids, prompt_lengths, pad_mask = batch
    L = ids.shape[1]
    prompt = torch.arange(L, device=ids.device)[None, :] < prompt_lengths[:, None]  # (B, L)
    if objective == "ar":  # answers only; the EOS padding is not a target for the AR twin
        return {"ids": ids, "loss_mask": ~prompt & ~pad_mask}
    # SFT (section 2.3): the prompt is never masked; EOS padding counts as answer.
    noisy, masked, p = forward_mask(ids, mask_id=mask_id, eps=eps, maskable=~prompt, generator=generator)
    return {"ids": ids, "noisy": noisy, "masked": masked, "p": p, "answer_lengths": L - prompt_lengths}


def batch_loss(model: nn.Module, task: Task, objective: Objective, inputs: dict[str, Tensor]) -> Tensor:
    if objective == "ar":
        return ar_loss(model(inputs["ids"]), inputs["ids"], inputs.get("loss_mask"))
    logits = model(inputs["noisy"])  # (B, L, V)
    if task == "pretrain":
        return mdm_loss(logits, inputs["ids"], inputs["masked"], inputs["p"])
    return sft_loss(logits, inputs["ids"], inputs["masked"], inputs["p"], inputs["answer_lengths"])


def rows(inputs: dict[str, Tensor], index: slice) -> dict[str, Tensor]:
    return {k: v[index] for k, v in inputs.items()}


def to_device(inputs: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
