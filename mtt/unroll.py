"""Differentiable student training: the inner loop of MTT and its two exact backward modes.

The student starts at an expert checkpoint theta_0 and takes N plain SGD steps on the
synthetic set,

    theta_{i+1} = theta_i - alpha * g_i,   g_i = grad_theta CE(f(theta_i; DSA_i(X[b_i])), y[b_i]),

and the matching loss is ||theta_N - theta_target||^2 / ||theta_0 - theta_target||^2.
We need its gradient with respect to X (and soft labels, if learned) and alpha.

- `full`: autograd through all N steps (create_graph). Memory grows with N.
- `checkpointed`: run forward without a graph, keep only theta_0..theta_N (N x P floats),
  then walk backwards re-running one step at a time with a graph, carrying the adjoint
  lambda_i = dL/dtheta_i:
      lambda_i = lambda_{i+1} - alpha * H_i lambda_{i+1}        (Hessian-vector product)
      dX      += -alpha * (dg_i/dX)^T lambda_{i+1}
      dalpha  += -g_i . lambda_{i+1}
  Exact: the same gradient as `full` up to float round-off, one step's graph alive at a time.

Both modes draw the minibatches and DSA parameters of all N steps up front (`plan_steps`)
from one generator, so they see the very same randomness and the backward walk replays it.

`auto` is not a third computation but a choice between the two (`choose_backward`): which
is faster depends on the device and the problem's size (on a CPU `full` wins at IPC 1 and
`checkpointed` at IPC 10, whose large graph costs more than the recomputation), and `full`
is only a candidate where its graph fits in memory.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from mtt.augment import DSAParams, apply_params, sample_params

BackwardMode = Literal["full", "checkpointed"]
EXACT_MODES = ("full", "checkpointed")
BACKWARD_MODES = ("auto", *EXACT_MODES)


PRECISIONS = ("fp32", "bf16")


class Student:
    """A network evaluated at a flat parameter vector theta [P] (in .parameters() order), or at K of
    them at once, theta [K, P] on inputs [K, B, ...] (K segments, one vmapped call).

    precision "bf16" runs the network under bf16 autocast (convolutions and matmuls in bf16,
    theta, logits, the loss, the adjoint and every update in fp32).
    """

    def __init__(self, net: nn.Module, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.net = net
        self.precision = precision
        self.names = [name for name, _ in net.named_parameters()]
        self.shapes = [p.shape for p in net.parameters()]
        self.numels = [p.numel() for p in net.parameters()]
        self.num_params = sum(self.numels)

    def __call__(self, theta: Tensor, x: Tensor) -> Tensor:
        if theta.shape[-1:] != (self.num_params,) or theta.dim() > 2:
            raise ValueError(f"theta has shape {tuple(theta.shape)}, the network has {self.num_params} parameters")
        device_type = theta.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self._forward(theta, x) if theta.dim() == 1 else vmap(self._forward)(theta, x)
        return logits.to(theta.dtype)  # fp32 out of bf16 autocast; float64 stays float64

    def _forward(self, theta: Tensor, x: Tensor) -> Tensor:
        views = [t.view(s) for t, s in zip(torch.split(theta, self.numels), self.shapes)]
        return functional_call(self.net, dict(zip(self.names, views)), (x,))


@dataclass
class StepPlan:
    """The randomness of one student step: which synthetic images, and which augmentation."""

    indices: Tensor   # [b] into the synthetic set; [K, b] for K segments
    augment: DSAParams  # for all the step's images: K * b of them, one op, per-sample parameters

    def select(self, segments: slice) -> StepPlan:
        """The plan of some of the K segments only (the share of one rank under torchrun)."""
        b = self.indices.shape[1]
        return StepPlan(self.indices[segments], self.augment.rows(segments.start * b, segments.stop * b))


def plan_steps(num_images: int, syn_steps: int, batch_syn: int | None, image_shape: tuple[int, int, int],
               dsa: str, generator: torch.Generator, device: torch.device, segments: int = 1) -> list[StepPlan]:
    """Minibatches as the original: cycle through random permutations split into chunks.

    With K segments each cycles through its own permutations; a step's K minibatches share one
    DSA op (so they are augmented in one call) with independently drawn per-sample parameters.
    """
    batch = num_images if batch_syn is None else min(batch_syn, num_images)
    channels, h, w = image_shape
    plans, chunks = [], [[] for _ in range(segments)]
    for _ in range(syn_steps):
        picks = []
        for mine in chunks:
            if not mine:
                mine.extend(torch.randperm(num_images, generator=generator).split(batch))
            picks.append(mine.pop())
        indices = picks[0] if segments == 1 else torch.stack(picks)
        augment = sample_params(dsa, indices.numel(), channels, (h, w), generator, device)
        plans.append(StepPlan(indices.to(device), augment))
    return plans


@dataclass
class UnrollResult:
    loss: float                      # the matching loss
    grad_images: Tensor              # dL/dX
    grad_lr: Tensor                  # dL/dalpha (0-d)
    grad_label_logits: Tensor | None # dL/d(label logits), when soft labels are on
    final_params: Tensor             # theta_N, detached (for plots of the student's path)


def _step_loss(student: Student, theta: Tensor, images: Tensor, targets: Tensor, plan: StepPlan) -> Tensor:
    """The step's cross-entropy; with K segments the sum of theirs, so that d/dtheta[k] is segment k's gradient."""
    x = apply_params(images[plan.indices.flatten()], plan.augment).view(*plan.indices.shape, *images.shape[1:])
    logits = student(theta, x)
    y = targets[plan.indices]
    if targets.dtype != torch.long:
        y = y.softmax(-1)  # soft labels: targets are logits
    if plan.indices.dim() == 1:
        return F.cross_entropy(logits, y)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(0, 1), reduction="none").view(plan.indices.shape) \
        .mean(1).sum()


def unroll(student: Student, theta_start: Tensor, theta_target: Tensor, images: Tensor, syn_lr: Tensor,
           plans: list[StepPlan], labels: Tensor | None = None, label_logits: Tensor | None = None,
           mode: BackwardMode = "checkpointed") -> UnrollResult:
    """Matching loss and its gradients; images/syn_lr/label_logits are leaves.

    One expert segment: theta_start/theta_target [P]. K segments at once: [K, P] each, with plans
    from plan_steps(..., segments=K); the loss is the mean of the K segments' losses.
    """
    if (labels is None) == (label_logits is None):
        raise ValueError("give exactly one of labels (hard) or label_logits (soft)")
    if mode not in EXACT_MODES:
        raise ValueError(f"unknown backward mode {mode!r}: use one of {EXACT_MODES} (resolve 'auto' with "
                         "choose_backward)")
    theta_start, theta_target = theta_start.detach(), theta_target.detach()
    if theta_start.shape != theta_target.shape or plans and plans[0].indices.dim() != theta_start.dim():
        raise ValueError(f"theta_start {tuple(theta_start.shape)}, theta_target {tuple(theta_target.shape)} and plans "
                         f"for {plans[0].indices.dim() if plans else '?'}-d indices do not describe the same segments")
    start_distance = (theta_start - theta_target).pow(2).sum(-1)  # [K] for K segments
    run = _unroll_full if mode == "full" else _unroll_checkpointed
    return run(student, theta_start, theta_target, start_distance, images, syn_lr, plans, labels, label_logits)


def _unroll_full(student, theta_start, theta_target, start_distance, images, syn_lr, plans, labels, label_logits):
    images = images.detach().requires_grad_()
    syn_lr = syn_lr.detach().requires_grad_()
    targets = labels if label_logits is None else label_logits.detach().requires_grad_()
    theta = theta_start.requires_grad_()
    for plan in plans:
        grad = torch.autograd.grad(_step_loss(student, theta, images, targets, plan), theta, create_graph=True)[0]
        theta = theta - syn_lr * grad
    loss = ((theta - theta_target).pow(2).sum(-1) / start_distance).mean()
    leaves = [images, syn_lr] + ([targets] if label_logits is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    return UnrollResult(loss.item(), grads[0], grads[1], grads[2] if label_logits is not None else None,
                        theta.detach())


def _forward_path(student: Student, theta_start: Tensor, images: Tensor, targets: Tensor, alpha: Tensor,
                  plans: list[StepPlan]) -> list[Tensor]:
    """theta_0..theta_N of the student, with no graph kept across steps."""
    thetas = [theta_start.detach()]
    for plan in plans:
        theta = thetas[-1].requires_grad_()
        grad = torch.autograd.grad(_step_loss(student, theta, images, targets, plan), theta)[0]
        thetas.append((theta - alpha * grad).detach())
        theta.requires_grad_(False)
    return thetas


def student_path(student: Student, theta_start: Tensor, images: Tensor, syn_lr: Tensor | float,
                 plans: list[StepPlan], labels: Tensor | None = None,
                 label_logits: Tensor | None = None) -> Tensor:
    """The student's parameters after each of its steps, [N + 1, P] (for plots of its path)."""
    targets = labels if label_logits is None else label_logits.detach()
    alpha = torch.as_tensor(syn_lr, dtype=theta_start.dtype, device=theta_start.device)
    return torch.stack(_forward_path(student, theta_start, images.detach(), targets, alpha, plans))


def _unroll_checkpointed(student, theta_start, theta_target, start_distance, images, syn_lr, plans, labels,
                         label_logits):
    images = images.detach()
    alpha = syn_lr.detach()
    soft = label_logits is not None
    targets = label_logits.detach() if soft else labels

    thetas = _forward_path(student, theta_start, images, targets, alpha, plans)
    theta_final = thetas[-1]
    loss = ((theta_final - theta_target).pow(2).sum(-1) / start_distance).mean()

    # Backward: adjoint walk, one step's graph at a time.
    segments = 1 if theta_final.dim() == 1 else len(theta_final)
    adjoint = 2 * (theta_final - theta_target) / (start_distance.unsqueeze(-1) * segments)
    grad_images = torch.zeros_like(images)
    grad_lr = torch.zeros_like(alpha)
    grad_logits = torch.zeros_like(targets) if soft else None
    for i in reversed(range(len(plans))):
        theta = thetas[i].requires_grad_()
        x = images.requires_grad_()
        t = targets.requires_grad_() if soft else targets
        grad = torch.autograd.grad(_step_loss(student, theta, x, t, plans[i]), theta, create_graph=True)[0]
        grad_dot_adjoint = (grad * adjoint).sum()
        inputs = [theta, x] + ([t] if soft else [])
        vjps = torch.autograd.grad(grad_dot_adjoint, inputs)
        grad_lr -= grad_dot_adjoint.detach()
        grad_images -= alpha * vjps[1]
        if soft:
            grad_logits -= alpha * vjps[2]
        adjoint = adjoint - alpha * vjps[0]
        theta.requires_grad_(False)
        images.requires_grad_(False)
        if soft:
            targets.requires_grad_(False)
    return UnrollResult(loss.item(), grad_images, grad_lr, grad_logits, theta_final)


# ----------------------------------------------------------------------------- auto: measure, then choose

FULL_MEMORY_SHARE = 0.5  # `full` is a candidate only if its graph needs at most this share of the free memory


@dataclass
class BackwardChoice:
    """What `auto` chose, and the measurements it chose by (recorded in the run's history)."""

    mode: BackwardMode
    seconds: dict[str, float] = field(default_factory=dict)  # median seconds of one unroll, per mode timed
    full_graph_bytes: int = 0        # estimate of the memory `full` keeps alive across the unroll
    free_bytes: int | None = None    # free memory on the device when measured (None: unknown)
    reason: str = ""


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated: free CUDA memory, else the OS's MemAvailable (Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def full_graph_bytes(student: Student, theta_start: Tensor, images: Tensor, syn_lr: Tensor, plans: list[StepPlan],
                     targets: Tensor) -> int:
    """Memory the `full` mode's graph holds at its peak: the tensors one step saves for the double
    backward, counted with saved-tensor hooks, times the number of steps."""
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    theta = theta_start.detach().requires_grad_()
    x = images.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        grad = torch.autograd.grad(_step_loss(student, theta, x, targets, plans[0]), theta, create_graph=True)[0]
        _ = theta - syn_lr.detach().requires_grad_() * grad
    return saved * len(plans)


def choose_backward(student: Student, theta_start: Tensor, theta_target: Tensor, images: Tensor, syn_lr: Tensor,
                    plans: list[StepPlan], labels: Tensor | None = None, label_logits: Tensor | None = None,
                    repeats: int = 3, free_bytes: int | None = None) -> BackwardChoice:
    """The faster exact backward mode on this segment, among those whose memory fits.

    Each candidate runs once to warm up (allocator, kernel choice), then the candidates take
    turns `repeats` times, so that a drift of the machine's speed (other jobs, the allocator
    growing its pools) hits them alike; the medians decide. `free_bytes` defaults to what
    `free_memory` reports now. Nothing here draws random numbers, so choosing leaves a run's
    randomness as it was.
    """
    device = images.device
    targets = labels if label_logits is None else label_logits.detach()
    free = free_memory(device) if free_bytes is None else free_bytes
    graph = full_graph_bytes(student, theta_start, images, syn_lr, plans, targets)
    if free is not None and graph > FULL_MEMORY_SHARE * free:
        return BackwardChoice("checkpointed", {}, graph, free,
                              f"full would hold ~{graph / 2**30:.2f} GiB, more than {FULL_MEMORY_SHARE:.0%} of the "
                              f"{free / 2**30:.2f} GiB free")

    def run(mode: str) -> None:
        unroll(student, theta_start, theta_target, images, syn_lr, plans, labels, label_logits, mode)

    times: dict[str, list[float]] = {mode: [] for mode in EXACT_MODES}
    try:
        for turn in range(repeats + 1):
            for mode in EXACT_MODES:
                seconds = _seconds(lambda: run(mode), device)
                if turn:  # turn 0 is the warm-up
                    times[mode].append(seconds)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return BackwardChoice("checkpointed", {}, graph, free, "full ran out of memory")
    seconds = {mode: statistics.median(t) for mode, t in times.items()}
    mode = min(seconds, key=seconds.get)
    return BackwardChoice(mode, seconds, graph, free, f"{mode} was faster")


def _seconds(run, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: wait for them before reading the clock
    return time.perf_counter() - started
