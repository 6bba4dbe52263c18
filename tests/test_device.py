"""Device resolution, and the CPU allocator setting it applies (counted in page faults, not timed)."""
import ctypes.util
import json
import os
import subprocess
import sys

import pytest
import torch

from mtt.device import resolve_device, to_device

GLIBC = sys.platform.startswith("linux") and "libc.so.6" in (ctypes.util.find_library("c") or "")

# Three steps that each allocate, fill and free 64 MB tensors, after eight warm-up ones: the minor page faults
# they cost. Memory reused from the heap faults nothing; memory unmapped at free and mapped again faults on
# every 4 KB page. 64 MB is above glibc's largest mmap threshold (32 MB), so by default such blocks are always
# mapped afresh; smaller ones may come from the heap once glibc's dynamic threshold has risen (a version of
# this test with 10 MB activations saw 0 faults on one run).
FAULTS_OF_THREE_STEPS = """
import json, resource, sys, torch
from mtt.device import resolve_device
resolve_device("cpu", keep_cpu_memory=sys.argv[1] == "keep")
x = torch.randn(16 * 2**20)
def steps(n):
    for _ in range(n):
        (x * 2).exp().sum()
steps(8)  # the heap reaches its steady layout within 4 steps (1 to 4 measured)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps(3)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def faults_of_three_steps(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_THREE_STEPS, mode], capture_output=True, text=True,
                         check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's (Linux); elsewhere nothing is changed")
def test_cpu_keeps_freed_memory_for_reuse():
    default, kept = faults_of_three_steps("default"), faults_of_three_steps("keep")
    # glibc's default: each 64 MB temporary is mapped and faulted in anew (16k faults each)
    assert default > 10_000
    assert kept * 4 < default, (kept, default)


def test_auto_and_explicit_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_to_device_copies_a_cpu_tensor_as_it_is():
    t = torch.arange(6).view(2, 3)
    moved = to_device(t, "cpu")
    assert moved.device.type == "cpu" and torch.equal(moved, t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_queues_the_copy_without_synchronising():
    t = torch.randn(1000)
    torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises
    try:
        moved = to_device(t, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(moved.cpu(), t)
