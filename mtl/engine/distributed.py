"""Data parallelism across processes (``torchrun``): the process group, and the collectives
the trainer and the gradient methods need.

Every process draws the same batch order and takes its own slice of each batch. Its task losses
are rescaled so that the mean over processes of their gradients is the gradient of the whole
batch's losses (each a mean over the batch's labelled rows, wherever they are), and they take
the whole batch's values, so that every process logs, checks and weighs the same numbers.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device_type: str) -> torch.device | None:
    """Join the process group ``torchrun`` describes (NCCL on CUDA, gloo on CPU); returns this
    process's CUDA device (``LOCAL_RANK``) or None."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return None


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(number of processes, this one's rank); (1, 0) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def barrier() -> None:
    if world()[0] > 1:
        dist.barrier()


def mean_over_processes(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its mean over the processes (one all-reduce of the
    tensors flattened together). Every process must pass tensors of the same shapes."""
    processes = world()[0]
    if processes == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= processes
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def whole_batch_losses(losses: list[torch.Tensor], labelled: torch.Tensor) -> list[torch.Tensor]:
    """This process's task losses (each a mean over its ``labelled`` rows of the task) -> losses
    whose gradients, averaged over the processes, are those of the whole batch's mean losses,
    and whose values are the whole batch's mean losses."""
    processes = world()[0]
    counts = labelled.to(losses[0].dtype)
    sums = torch.stack([counts, torch.stack([loss.detach() for loss in losses]) * counts])
    dist.all_reduce(sums)  # [labelled rows of the whole batch, sums of their losses], per task
    totals = sums[0].clamp(min=1)
    factors, means = (processes * counts / totals).tolist(), (sums[1] / totals).tolist()
    return [loss * f + (m - loss.detach() * f) for loss, f, m in zip(losses, factors, means)]


def from_main(value):
    """Rank 0's ``value``, in every process."""
    if world()[0] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
