"""Seconds per MTT iteration: the original code's inner loop, re-implemented, vs our unroll in every backward mode.

    python bench/reference_unroll.py [--configs all|NAME,...] [--repeats 5] [--device auto] [--json OUT.json]
                                     [--cpu-allocator keep|default] [--smoke]

The reference is the inner loop of GeorgeCazenavette/mtt-distillation (distill.py with
reparam_module.ReparamModule) written again here: the network's parameters replaced by views
of one flat vector, the student kept as a Python list of flat tensors, one create_graph
autograd.grad per step, and ONE backward() of the matching loss at the end. Both sides use
our networks (mtt.networks) and our DSA (apply_params on the same plan_steps plans, built
once per config and not timed), so the times differ only by how the unroll is written.

Per config (DSA on, whole synthetic set per step, 10 classes, random images, theta_start a
random network, target = theta_start + small noise): first a check that the reference's
gradients (images, syn_lr) match ours `full`, then one warm-up run of each method, then
--repeats rounds timing every method once per round (interleaved, so that a machine that
slows down or speeds up part-way hits every method alike); the median is reported, with
ratio = reference time / ours (above 1: ours is faster). On the CPU both sides run under the
allocator setting that mtt applies (`keep`: freed memory is reused, mtt.device.keep_freed_cpu_memory)
or both under glibc's default (`--cpu-allocator default`, as the original code runs). --smoke
shrinks every config to 8x8 images, width 8, 3 steps and 1 repeat, to check the script in seconds.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtt.augment import DEFAULT_STRATEGY, apply_params
from mtt.device import resolve_device, seconds
from mtt.io import atomic_write_json
from mtt.networks import get_network
from mtt.unroll import BACKWARD_MODES, EXACT_MODES, StepPlan, Student, choose_backward, plan_steps, unroll

CLASSES = 10
SYN_LR = 0.01  # the original's default lr_teacher, which initialises syn_lr
TARGET_NOISE = 0.01
CHECK_RTOL, CHECK_ATOL = 1e-3, 1e-6  # float32 gradients after tens of steps; atol is relative to max |reference|


@dataclass(frozen=True)
class Config:
    name: str
    channels: int
    size: int
    width: int
    ipc: int
    steps: int

    def describe(self) -> str:
        return f"{self.channels}x{self.size}x{self.size}, ConvNet-{self.width}, IPC {self.ipc}, {self.steps} steps"


CONFIGS = (
    Config("mnist-w32-ipc1", 1, 28, 32, 1, 20),
    Config("mnist-w128-ipc1", 1, 28, 128, 1, 20),
    Config("mnist-w128-ipc10", 1, 28, 128, 10, 20),
    Config("cifar-w128-ipc1", 3, 32, 128, 1, 50),
)


def smoke(config: Config) -> Config:
    return replace(config, size=8, width=8, steps=3)


# -----------------------------------------------------------------------------
# the reference: the original inner loop

class ReparamModule(nn.Module):
    """The original's ReparamModule, reduced to what its distill.py uses: forward(x, flat_param=theta).

    The wrapped network's parameters are deregistered and, for each call, set as plain
    attributes that are views (split + view) of `flat_param`, then the previous views are
    put back, looking modules up by name on every call as the original does. Our networks
    share no parameters and ConvNet's default instance norm has no buffers, so the
    original's shared-parameter and buffer handling is left out.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self._param_infos = [(mn, n) for mn, m in self.named_modules() for n, _ in m.named_parameters(recurse=False)]
        params = [p.detach() for p in self.parameters()]  # same order as _param_infos
        self._param_numels = [p.numel() for p in params]
        self._param_shapes = [p.shape for p in params]
        self.flat_param = nn.Parameter(torch.cat([p.reshape(-1) for p in params]))
        for mn, n in self._param_infos:
            delattr(self._get_module_from_name(mn), n)
        self._unflatten_param(self.flat_param)

    def _get_module_from_name(self, mn: str) -> nn.Module:
        m = self
        for p in mn.split(".") if mn else ():
            m = getattr(m, p)
        return m

    def _unflatten_param(self, flat_param: Tensor) -> None:
        views = (t.view(s) for t, s in zip(flat_param.split(self._param_numels), self._param_shapes))
        for (mn, n), p in zip(self._param_infos, views):
            setattr(self._get_module_from_name(mn), n, p)

    @contextmanager
    def unflattened_param(self, flat_param: Tensor) -> Iterator[None]:
        saved_views = [getattr(self._get_module_from_name(mn), n) for mn, n in self._param_infos]
        self._unflatten_param(flat_param)
        yield
        # Restoring the saved views (not the last step's) keeps no student graph alive between iterations.
        for (mn, n), p in zip(self._param_infos, saved_views):
            setattr(self._get_module_from_name(mn), n, p)

    def forward(self, x: Tensor, flat_param: Tensor) -> Tensor:
        with self.unflattened_param(torch.squeeze(flat_param)):
            return self.module(x)


def reference_gradients(net: ReparamModule, problem: Problem) -> tuple[Tensor, Tensor]:
    """One iteration of the original's inner loop: (dL/dimages, dL/dsyn_lr), from one backward()."""
    image_syn = problem.images.detach().requires_grad_()
    syn_lr = problem.syn_lr.detach().requires_grad_()
    starting_params = problem.theta_start
    target_params = problem.theta_target
    student_params = [starting_params.clone().requires_grad_()]
    for plan in problem.plans:
        x = apply_params(image_syn[plan.indices], plan.augment)
        x = net(x, flat_param=student_params[-1])
        ce_loss = F.cross_entropy(x, problem.labels[plan.indices])
        grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    num_params = starting_params.numel()
    param_loss = F.mse_loss(student_params[-1], target_params, reduction="sum") / num_params
    param_dist = F.mse_loss(starting_params, target_params, reduction="sum") / num_params
    grand_loss = param_loss / param_dist
    grand_loss.backward()
    return image_syn.grad, syn_lr.grad


# -----------------------------------------------------------------------------
# the problem, ours, and the check that both compute the same thing

@dataclass
class Problem:
    net: nn.Module
    theta_start: Tensor
    theta_target: Tensor
    images: Tensor
    labels: Tensor
    syn_lr: Tensor
    plans: list[StepPlan]


def make_problem(config: Config, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    shape = (config.channels, config.size, config.size)
    net = get_network("ConvNet", config.channels, CLASSES, shape[1:], width=config.width).to(device, dtype)
    theta_start = torch.cat([p.detach().flatten() for p in net.parameters()])
    theta_target = theta_start + TARGET_NOISE * torch.randn_like(theta_start)
    images = torch.randn(CLASSES * config.ipc, *shape, device=device, dtype=dtype)
    labels = torch.arange(CLASSES, device=device).repeat_interleave(config.ipc)
    syn_lr = torch.tensor(SYN_LR, device=device, dtype=dtype)
    plans = plan_steps(len(images), config.steps, None, shape, DEFAULT_STRATEGY,
                       torch.Generator().manual_seed(seed), device)
    return Problem(net, theta_start, theta_target, images, labels, syn_lr, plans)


def our_gradients(student: Student, problem: Problem, mode: str) -> tuple[Tensor, Tensor]:
    p = problem
    result = unroll(student, p.theta_start, p.theta_target, p.images, p.syn_lr, p.plans, labels=p.labels, mode=mode)
    return result.grad_images, result.grad_lr


def relative_error(ours: Tensor, reference: Tensor) -> float:
    """max |ours - reference| / max |reference|."""
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def check_same_gradients(ours: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor], rtol: float,
                         atol: float) -> dict[str, float]:
    """Raise unless ours matches the reference elementwise (atol relative to max |reference|); return the errors."""
    errors = {}
    for name, a, b in zip(("images", "syn_lr"), ours, reference):
        errors[name] = relative_error(a, b)
        if not torch.allclose(a, b, rtol=rtol, atol=atol * b.abs().max().item()):
            raise AssertionError(f"gradient wrt {name}: ours (full) differs from the reference by "
                                 f"{errors[name]:.2e} of its largest entry; the timings would not compare "
                                 f"the same computation")
    return errors


# -----------------------------------------------------------------------------
# timing

def bench_config(config: Config, repeats: int, device: torch.device) -> dict:
    problem = make_problem(config, device)
    reference_net = ReparamModule(copy.deepcopy(problem.net))  # the wrapper deregisters the copy's parameters
    student = Student(problem.net)
    errors = check_same_gradients(our_gradients(student, problem, "full"),
                                  reference_gradients(reference_net, problem), CHECK_RTOL, CHECK_ATOL)
    # `auto` chooses once per run (on its first iteration); after that an iteration costs what the chosen mode does.
    p = problem
    choice = choose_backward(student, p.theta_start, p.theta_target, p.images, p.syn_lr, p.plans, labels=p.labels)
    chosen = {mode: mode for mode in EXACT_MODES} | {"auto": choice.mode}
    methods: dict[str, Callable[[], object]] = {"reference": lambda: reference_gradients(reference_net, problem)}
    methods |= {mode: (lambda mode=mode: our_gradients(student, problem, chosen[mode])) for mode in BACKWARD_MODES}
    for run in methods.values():
        run()  # warm-up: kernel selection, allocator caches
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, run in methods.items():
            times[name].append(seconds(run, device))
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"config": asdict(config), "description": config.describe(), "seconds": median,
            "ratio": {mode: median["reference"] / median[mode] for mode in BACKWARD_MODES},
            "relative_error": errors, "auto_chose": choice.mode}


# -----------------------------------------------------------------------------
# command line

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{device.type} ({models[0] if models else 'unknown model'})"


def select(names: str) -> list[Config]:
    if names == "all":
        return list(CONFIGS)
    by_name = {c.name: c for c in CONFIGS}
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}: use 'all' or some of {', '.join(by_name)}")
    return [by_name[n] for n in names.split(",")]


def table(rows: list[dict]) -> str:
    header = "| config | reference s/it | " + " | ".join(f"{m} s/it (ratio)" for m in BACKWARD_MODES) + " |"
    lines = [header, "|---" * (2 + len(BACKWARD_MODES)) + "|"]
    for r in rows:
        ours = " | ".join(f"{r['seconds'][m]:.4f} ({r['ratio'][m]:.2f}x)" + (f", {r['auto_chose']}" if m == "auto" else "")
                          for m in BACKWARD_MODES)
        lines.append(f"| {r['config']['name']} ({r['description']}) | {r['seconds']['reference']:.4f} | {ours} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="all", help=f"'all' or a comma-separated subset of "
                                                         f"{', '.join(c.name for c in CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up (median reported)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cpu-allocator", choices=("keep", "default"), default="keep",
                        help="keep: reuse freed memory, as mtt does (both sides); default: glibc's own behaviour")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 1 repeat: checks the script runs")
    args = parser.parse_args()
    device = resolve_device(args.device, keep_cpu_memory=args.cpu_allocator == "keep")
    configs = select(args.configs)
    repeats = 1 if args.smoke else args.repeats
    rows = []
    for config in map(smoke, configs) if args.smoke else configs:
        rows.append(bench_config(config, repeats, device))
        print(f"{config.name}: " + ", ".join(f"{k} {v:.4f} s" for k, v in rows[-1]["seconds"].items()),
              file=sys.stderr, flush=True)
    meta = {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "repeats": repeats, "smoke": args.smoke, "cpu_allocator": args.cpu_allocator}
    print(f"\ndevice {meta['device']}, torch {meta['torch']}, {meta['threads']} threads, "
          f"CPU allocator {args.cpu_allocator}, median of {repeats}"
          f"{' (smoke sizes)' if args.smoke else ''}; ratio = reference / ours, above 1 = ours faster\n")
    print(table(rows))
    if args.json:
        atomic_write_json(args.json, {**meta, "rows": rows})


if __name__ == "__main__":
    main()
