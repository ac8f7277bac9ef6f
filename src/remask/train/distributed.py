"""torch.distributed plumbing: process group from torchrun's environment, DDP or FSDP2 wrapping,
and gathering a full state dict for checkpoints. A single process needs none of it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from remask.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(preference: str) -> DistInfo:
    """One process, or the group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK
    (gloo on CPU, nccl on CUDA)."""
    device = resolve_device(preference)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def wrap_model(model: nn.Module, info: DistInfo, *, fsdp: bool) -> nn.Module:
    """DDP replicas (gradients all-reduced to their mean), or FSDP2 sharding of every block
    and the root."""
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain Transformer inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def full_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Every parameter as a full CPU tensor (all ranks must call it under FSDP)."""
    inner = unwrap(model)
    if info.enabled and any(type(p).__name__ == "DTensor" for p in inner.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict:
    """The optimizer's state in a form that can be saved by rank 0 and loaded by any world size
    with the same wrapping (FSDP: gathered to full tensors)."""
    inner = unwrap(model)
    if info.enabled and any(type(p).__name__ == "DTensor" for p in inner.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(inner, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, info: DistInfo) -> None:
    inner = unwrap(model)
    if info.enabled and any(type(p).__name__ == "DTensor" for p in inner.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(inner, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def mean_across(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.item() / info.world


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
