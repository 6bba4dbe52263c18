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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mtt.augment import DSAParams, apply_params, sample_params

BackwardMode = Literal["full", "checkpointed"]
BACKWARD_MODES = ("full", "checkpointed")


class Student:
    """A network evaluated at a flat parameter vector theta [P] (in .parameters() order)."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.names = [name for name, _ in net.named_parameters()]
        self.shapes = [p.shape for p in net.parameters()]
        self.numels = [p.numel() for p in net.parameters()]
        self.num_params = sum(self.numels)

    def __call__(self, theta: Tensor, x: Tensor) -> Tensor:
        if theta.shape != (self.num_params,):
            raise ValueError(f"theta has shape {tuple(theta.shape)}, the network has {self.num_params} parameters")
        views = [t.view(s) for t, s in zip(torch.split(theta, self.numels), self.shapes)]
        return functional_call(self.net, dict(zip(self.names, views)), (x,))


@dataclass
class StepPlan:
    """The randomness of one student step: which synthetic images, and which augmentation."""

    indices: Tensor   # [b] into the synthetic set
    augment: DSAParams


def plan_steps(num_images: int, syn_steps: int, batch_syn: int | None, image_shape: tuple[int, int, int],
               dsa: str, generator: torch.Generator, device: torch.device) -> list[StepPlan]:
    """Minibatches as the original: cycle through random permutations split into chunks."""
    batch = num_images if batch_syn is None else min(batch_syn, num_images)
    channels, h, w = image_shape
    plans, chunks = [], []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(num_images, generator=generator).split(batch))
        indices = chunks.pop()
        augment = sample_params(dsa, len(indices), channels, (h, w), generator, device)
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
    x = apply_params(images[plan.indices], plan.augment)
    logits = student(theta, x)
    if targets.dtype == torch.long:
        return F.cross_entropy(logits, targets[plan.indices])
    return F.cross_entropy(logits, targets[plan.indices].softmax(1))  # soft labels: targets are logits


def unroll(student: Student, theta_start: Tensor, theta_target: Tensor, images: Tensor, syn_lr: Tensor,
           plans: list[StepPlan], labels: Tensor | None = None, label_logits: Tensor | None = None,
           mode: BackwardMode = "checkpointed") -> UnrollResult:
    """Matching loss and its gradients for one expert segment; images/syn_lr/label_logits are leaves."""
    if (labels is None) == (label_logits is None):
        raise ValueError("give exactly one of labels (hard) or label_logits (soft)")
    if mode not in BACKWARD_MODES:
        raise ValueError(f"unknown backward mode {mode!r}: use one of {BACKWARD_MODES}")
    theta_start, theta_target = theta_start.detach(), theta_target.detach()
    start_distance = (theta_start - theta_target).pow(2).sum()
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
    loss = (theta - theta_target).pow(2).sum() / start_distance
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
    loss = (theta_final - theta_target).pow(2).sum() / start_distance

    # Backward: adjoint walk, one step's graph at a time.
    adjoint = 2 * (theta_final - theta_target) / start_distance
    grad_images = torch.zeros_like(images)
    grad_lr = torch.zeros_like(alpha)
    grad_logits = torch.zeros_like(targets) if soft else None
    for i in reversed(range(len(plans))):
        theta = thetas[i].requires_grad_()
        x = images.requires_grad_()
        t = targets.requires_grad_() if soft else targets
        grad = torch.autograd.grad(_step_loss(student, theta, x, t, plans[i]), theta, create_graph=True)[0]
        grad_dot_adjoint = grad @ adjoint
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
