"""Peak memory and time of one MTT iteration vs the number of unrolled steps, per backward mode.

    python bench/unroll_memory.py [--steps 10,20,40,80] [--kept 0,0.5] [--ipc 1] [--width 128] [--repeats 1]
                                  [--device auto]

CIFAR-10-shaped problem (3x32x32, 10 classes, ConvNet, DSA on, whole set per step). Each
(mode, steps) runs in a fresh subprocess so peaks do not mix: on CUDA the peak is
torch.cuda.max_memory_allocated, on CPU the growth of the process's peak RSS during the
iteration (ru_maxrss), which includes allocator slack, so read it as an upper bound.
`checkpointed` runs once per --kept fraction f, its walk keeping the graphs of the last
round(f * steps) steps (what `auto` does where `full` does not fit); the time is the median
of --repeats iterations after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from mtt.augment import DEFAULT_STRATEGY
from mtt.device import resolve_device
from mtt.networks import get_network
from mtt.unroll import Student, plan_steps, unroll


def measure(mode: str, steps: int, kept: int, ipc: int, width: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    net = get_network("ConvNet", 3, 10, (32, 32), width=width).to(device)
    student = Student(net)
    theta = torch.cat([p.detach().flatten() for p in net.parameters()])
    target = theta + 0.01 * torch.randn_like(theta)
    images = torch.randn(10 * ipc, 3, 32, 32, device=device)
    labels = torch.arange(10, device=device).repeat_interleave(ipc)
    syn_lr = torch.tensor(0.01, device=device)
    plans = plan_steps(len(images), steps, None, (3, 32, 32), DEFAULT_STRATEGY, torch.Generator().manual_seed(0), device)
    def run(plans: list) -> None:
        unroll(student, theta, target, images, syn_lr, plans, labels=labels, mode=mode, kept_graphs=kept)

    run(plans[:2])  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(plans)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return {"mode": mode, "steps": steps, "kept_graphs": kept, "peak_mb": round(peak_mb, 1),
            "seconds": round(statistics.median(times), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="10,20,40,80")
    parser.add_argument("--kept", default="0", help="checkpointed: fractions of the steps whose graphs the walk keeps")
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed iterations per row (median reported)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--one", nargs=3, metavar=("MODE", "STEPS", "KEPT"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.one:
        mode, steps, kept = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(measure(mode, steps, kept, args.ipc, args.width, args.repeats, device)))
        return
    rows = []
    for steps in map(int, args.steps.split(",")):
        kept = sorted({round(float(f) * steps) for f in args.kept.split(",")})
        for mode, keep in [("full", 0)] + [("checkpointed", k) for k in kept]:
            cmd = [sys.executable, __file__, "--one", mode, str(steps), str(keep), "--ipc", str(args.ipc),
                   "--width", str(args.width), "--repeats", str(args.repeats), "--device", str(device)]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
            print(f"{mode:>12} steps={steps:3d} kept={keep:3d} peak={rows[-1]['peak_mb']:8.1f} MB  "
                  f"{rows[-1]['seconds']:.2f} s", file=sys.stderr)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\nConvNet-{args.width}, CIFAR-10 shape, IPC {args.ipc}, device {name}, median of {args.repeats}\n")
    print("| mode | syn_steps | graphs kept | peak memory (MB) | seconds / iteration |\n|---|---|---|---|---|")
    for r in rows:
        kept = "all" if r["mode"] == "full" else r["kept_graphs"]
        print(f"| {r['mode']} | {r['steps']} | {kept} | {r['peak_mb']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
