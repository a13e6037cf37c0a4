"""Distributed helpers on top of torch.distributed (launched by ``torchrun``): DDP, FSDP2, reductions.

Nothing here implements a distributed algorithm; it picks the backend (gloo on CPU, nccl on GPU), wraps the
model in :class:`~torch.nn.parallel.DistributedDataParallel` or shards it with FSDP2's ``fully_shard`` per block,
and gathers/reduces what rank 0 logs and saves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

#: class-name endings treated as "blocks" when sharding with FSDP2 (timm and hybridvision block classes)
BLOCK_SUFFIXES = ("Block", "Bottleneck", "MBConv", "MbConv", "Stage")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``; ``enabled`` under torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1), else a single process.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but no CUDA device is available; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(device=dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, True)


def cleanup(info: DistInfo) -> None:
    """Tear the process group down (if this process set one up)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def restart_count() -> int:
    """How many times torchrun's elastic agent restarted this job (0 on the first attempt or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def block_modules(model: nn.Module) -> list[nn.Module]:
    """Modules FSDP2 shards one by one: those whose class name ends in a :data:`BLOCK_SUFFIXES` entry and that
    hold parameters, innermost first; falls back to the model's direct children with parameters."""
    blocks = [m for m in model.modules() if m is not model and type(m).__name__.endswith(BLOCK_SUFFIXES)
              and any(True for _ in m.parameters())]
    if not blocks:
        blocks = [m for m in model.children() if any(True for _ in m.parameters())]
    return blocks[::-1]


def wrap_model(model: nn.Module, info: DistInfo, fsdp: bool = False) -> nn.Module:
    """DDP (or FSDP2 per block + root with ``fsdp=True``) for a distributed run; the model itself otherwise.

    The model must already be on ``info.device``. With FSDP the parameters become sharded DTensors: build the
    optimizer after this call, and use :func:`full_state_dict` / :func:`load_full_state_dict` for checkpoints.
    """
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in block_modules(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda"
                                               else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` was sharded with FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """Unsharded CPU state dicts of the model (and optimizer); collective under FSDP (call on every rank)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        m = unwrap(model)
        msd = get_model_state_dict(m, options=opts)
        osd = get_optimizer_state_dict(m, optimizer, options=opts) if optimizer is not None else None
        return msd, osd
    return unwrap(model).state_dict(), optimizer.state_dict() if optimizer is not None else None


def load_full_state_dict(model: nn.Module, model_state: dict, optimizer: torch.optim.Optimizer | None = None,
                         optim_state: dict | None = None) -> None:
    """Load unsharded state dicts into a (possibly FSDP-sharded) model and optimizer (every rank calls it)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True)
        m = unwrap(model)
        set_model_state_dict(m, model_state, options=opts)
        if optimizer is not None and optim_state is not None:
            set_optimizer_state_dict(m, optimizer, optim_state, options=opts)
        return
    unwrap(model).load_state_dict(model_state)
    if optimizer is not None and optim_state is not None:
        optimizer.load_state_dict(optim_state)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a list of numbers over ranks (identity for one process)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (rank order); ``[obj]`` for one process."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if info.enabled:
        dist.barrier()
