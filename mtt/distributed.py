"""torchrun support shared by expert training and distillation: ranks, the process group, collectives.

Under `torchrun` (WORLD_SIZE > 1) each process learns its rank from the environment; on CUDA
rank r takes cuda:LOCAL_RANK. The process group (nccl on CUDA, gloo otherwise) is started only
then, so a plain `python -m mtt ...` never touches torch.distributed.
"""
from __future__ import annotations

import importlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from mtt.io import atomic_write_json


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 reports and writes the files every rank shares."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()

    def sum_(self, *tensors: Tensor) -> None:
        """Sum each tensor over the ranks, in place."""
        if self.world > 1:
            for t in tensors:
                dist.all_reduce(t)

    def gather(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def from_main(self, obj: object) -> object:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# How long a rank waits at a collective for the others. Legitimately long at times: for the ranks that train more of
# an evaluation's networks (5 x 1000 epochs on the whole synthetic set, split over the ranks: 20,000 SGD steps per
# network at CIFAR-100 IPC 50), for rank 0 alone running an evaluator given to distill(), and at the end of expert
# training for the rank with one expert more.
# torch's defaults (10 minutes for nccl, 30 for gloo) would end such a run with a timeout. A rank that dies ends
# the others at once anyway (torchrun stops them), so this only bounds a rank that hangs alive.
COLLECTIVE_TIMEOUT = timedelta(hours=24)


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or the only process: the one that reports (before any process group)."""
    return int(os.environ.get("RANK", 0)) == 0


def world_size() -> int:
    """The processes torchrun launched (1 without torchrun), read before any process group."""
    return int(os.environ.get("WORLD_SIZE", 1))


def local_world_size() -> int:
    """The processes torchrun launched on this machine (1 without torchrun): they share its RAM."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


class RankWarning(UserWarning):
    """A warning about this process alone (its GPU ran out of memory). Under torchrun each rank that has one says it;
    the other warnings hold for every rank alike (they read the same flags and files), and rank 0 alone says them."""


def tell_torchrun(error: str) -> None:
    """Give the line that ends this process to torchrun, whose failure summary shows it for this rank (in place of
    "To enable traceback see ..."): one place for every rank's error, where printing them repeats one line per
    process. Nothing to do without torchrun, which names the file in TORCHELASTIC_ERROR_FILE (its format is
    torch.distributed.elastic's ErrorHandler.record_exception's)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        atomic_write_json(path, {"message": {"message": error, "extraInfo": {"py_callstack": error,
                                                                           "timestamp": str(int(time.time()))}}})


@contextmanager
def ranks(device: torch.device) -> Iterator[Ranks]:
    """This process's Ranks for the duration of a run; starts (and ends) the process group if needed."""
    world = world_size()
    rank = int(os.environ.get("RANK", 0))
    if world == 1:
        yield Ranks(0, 1, device)
        return
    if device.type == "cuda":
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= gpus:  # else CUDA's "invalid device ordinal", deep in a traceback
            raise ValueError(f"torchrun started {local_world_size()} processes on this machine, which has {gpus} "
                             f"GPU(s), and each process takes a GPU of its own: pass --nproc_per_node={gpus} "
                             f"(or fewer)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        _bind_no_group_by_default()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield Ranks(rank, world, device)
    finally:
        if started:
            dist.destroy_process_group()


def _bind_no_group_by_default() -> None:
    """Import torch.distributed.nn.functional while no process group exists.

    Its functions take `group=group.WORLD` as a default argument, bound when the module is first
    imported, and torch._dynamo imports it (the first torch.func.vjp of the backward walk does).
    Imported after the group started, it holds the group past destroy_process_group, with its
    worker threads; at exit one of them could then release the last collective's tensors while
    the interpreter shuts down, and abort the process ("terminate called without an active
    exception", SIGABRT): a finished torchrun run reported as failed, in about 1 run in 15.
    """
    importlib.import_module("torch.distributed.nn.functional")
