"""One rule for picking a device, used everywhere a `device` argument is taken."""
from __future__ import annotations

import ctypes
import sys
import time
from typing import Callable

import torch

DeviceLike = str | torch.device


def resolve_device(device: DeviceLike = "auto", keep_cpu_memory: bool = True) -> torch.device:
    """Turn "auto" into cuda, else mps, else cpu; pass anything else through torch.device.

    An explicit device that this machine lacks ("cuda" on a CPU box) is refused here with a
    clear message instead of failing later inside the first kernel launch. When the result is the
    CPU, freed memory is kept for reuse (`keep_freed_cpu_memory`) unless keep_cpu_memory=False.
    """
    resolved = _resolve(device)
    if resolved.type == "cpu" and keep_cpu_memory:
        keep_freed_cpu_memory()
    return resolved


def _resolve(device: DeviceLike) -> torch.device:
    if isinstance(device, torch.device):
        requested = device
    elif device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    else:
        try:
            requested = torch.device(device)
        except RuntimeError as err:
            raise ValueError(
                f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
            ) from err
    if requested.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available here; use 'auto' or 'cpu'")
    if requested.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} was requested but MPS is not available here; use 'auto' or 'cpu'")
    return requested


# glibc's malloc serves every block above its mmap threshold (at most 32 MB) with a fresh mmap and
# unmaps it when freed, and returns the top of the heap to the OS past its trim threshold. An unrolled
# step on the CPU allocates and frees tensors of tens to hundreds of MB, so each step paid page faults
# (and the kernel's zeroing) on all of that memory again: up to 2.1x slower (BENCHMARKS.md, "The CPU
# allocator decides these timings"). Raising both thresholds makes freed memory stay in the heap and be
# reused, which is what PyTorch's caching allocator does on a GPU. The cost: the process keeps its peak
# memory until it exits.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters, glibc's malloc.h
_MALLOPT_SETTINGS = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 1 << 28))
_kept = False


def keep_freed_cpu_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of giving it back to the OS at once (for the whole
    process, for good). Returns whether it is in effect: False off Linux/glibc, where nothing is changed."""
    global _kept
    if not _kept and sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):  # not glibc (e.g. musl): leave its allocator alone
            return False
        _kept = all(mallopt(param, value) == 1 for param, value in _MALLOPT_SETTINGS)
    return _kept


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor onto `device` without the host waiting for the device. A plain .to("cuda") from pageable
    memory synchronises the stream: the host, which draws every step's augmentation and minibatch order on the
    CPU, would wait for all the kernels queued so far before it could queue the next step's. From pinned memory
    the copy is queued like a kernel (PyTorch's pinned-memory cache holds the staging buffer until it has run)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on `device` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seconds(run: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of run(); GPU kernels are asynchronous, so the device is waited for before each clock read."""
    synchronize(device)
    started = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - started


def out_of_memory_reason(err: torch.OutOfMemoryError) -> str:
    """The first line of an out-of-memory error (what ran out, and how much was asked): the rest is advice on the
    allocator's settings, not on the run."""
    return str(err).splitlines()[0] if str(err) else "out of memory"
