"""Peak memory and time of one MTT iteration vs the number of unrolled steps, per backward mode.

    python bench/unroll_memory.py [--steps 10,20,40,80] [--ipc 1] [--width 128] [--device auto]

CIFAR-10-shaped problem (3x32x32, 10 classes, ConvNet, DSA on, whole set per step). Each
(mode, steps) runs in a fresh subprocess so peaks do not mix: on CUDA the peak is
torch.cuda.max_memory_allocated, on CPU the growth of the process's peak RSS during the
iteration (ru_maxrss), which includes allocator slack, so read it as an upper bound.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from mtt.augment import DEFAULT_STRATEGY
from mtt.device import resolve_device
from mtt.networks import get_network
from mtt.unroll import Student, plan_steps, unroll


def measure(mode: str, steps: int, ipc: int, width: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    net = get_network("ConvNet", 3, 10, (32, 32), width=width).to(device)
    student = Student(net)
    theta = torch.cat([p.detach().flatten() for p in net.parameters()])
    target = theta + 0.01 * torch.randn_like(theta)
    images = torch.randn(10 * ipc, 3, 32, 32, device=device)
    labels = torch.arange(10, device=device).repeat_interleave(ipc)
    syn_lr = torch.tensor(0.01, device=device)
    plans = plan_steps(len(images), steps, None, (3, 32, 32), DEFAULT_STRATEGY, torch.Generator().manual_seed(0), device)
    unroll(student, theta, target, images, syn_lr, plans[:2], labels=labels, mode=mode)  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    unroll(student, theta, target, images, syn_lr, plans, labels=labels, mode=mode)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return {"mode": mode, "steps": steps, "peak_mb": round(peak_mb, 1), "seconds": round(time.perf_counter() - start, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="10,20,40,80")
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "STEPS"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.ipc, args.width, device)))
        return
    rows = []
    for mode in ("full", "checkpointed"):
        for steps in map(int, args.steps.split(",")):
            cmd = [sys.executable, __file__, "--one", mode, str(steps), "--ipc", str(args.ipc),
                   "--width", str(args.width), "--device", str(device)]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
            print(f"{mode:>12} steps={steps:3d} peak={rows[-1]['peak_mb']:8.1f} MB  {rows[-1]['seconds']:.2f} s",
                  file=sys.stderr)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\nConvNet-{args.width}, CIFAR-10 shape, IPC {args.ipc}, device {name}\n")
    print("| mode | syn_steps | peak memory (MB) | seconds / iteration |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['steps']} | {r['peak_mb']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
