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
  With kept_graphs=M the forward path records the last M steps' graphs (as `full` does) and the
  walk differentiates them as they are instead of re-running those steps: M steps of `full`'s
  memory buy M/N of the recomputation back, so the time goes from `checkpointed`'s (M=0) to
  `full`'s (M=N) in proportion. `auto` keeps as many as fit where `full` as a whole does not.

With compiler="inductor" (`--compile`) each student step runs as a torch.func function under
torch.compile, in every mode ("one step, two ways" below).

Both modes draw the minibatches and DSA parameters of all N steps up front (`plan_steps`)
from one generator, so they see the very same randomness and the backward walk replays it.

`auto` is not a third computation but a choice between the two (`choose_backward`): which
is faster depends on the device, the problem's size and the allocator (`checkpointed`
recomputes every step, ~1.3x the arithmetic, but keeps one step's graph instead of N: where
allocating a large graph is slow, as under glibc's default on a CPU, that wins), and `full`
is only a candidate where its graph fits in memory; where it does not, `checkpointed` keeps
the graphs of as many steps as fit (kept_graphs). Given a compiler, it times each mode compiled
and eager (compiling pays on a GPU, not on a CPU).

Options of the successors (all off by default; the matching options are each a small function called from one
place, while TESLA (`hessian`) and soft labels (`soft`) change what the walk differentiates, so the walk takes them):

- TESLA (Cui et al., ICML 2023), backward mode `tesla`: APPROXIMATE. The checkpointed walk
  without the Hessian term: the adjoint stays lambda_N at every step, so
      dX = -alpha * sum_i (dg_i/dX)^T lambda_N,   dalpha = -sum_i g_i . lambda_N,
  i.e. later steps' dependence on X through theta is dropped. Constant memory and cheaper
  than `checkpointed` (one VJP w.r.t. X per step, no Hessian-vector product w.r.t. theta).
  Never exact, so it is not in EXACT_MODES, `auto` never picks it, and `unroll` runs it only
  with allow_approximate=True.
- ATT (Liu et al., ECCV 2024), match="closest": the matching loss is taken at the student step
  i* in 1..N closest to the target (a detached argmin of the L1 distance, the latest of equals,
  per segment, as ATT's code) and the gradient flows from that step only; match="final"
  (default) is MTT's step N.
- PAD (Li et al., 2024), param_mask: the matching loss (numerator and denominator) counts only
  the parameters the mask keeps; `shallow_layer_mask` masks out the first layers.
"""
from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from mtt.augment import DSAParams, apply_params, sample_params
from mtt.device import seconds, to_device
from mtt.distributed import local_world_size

BackwardMode = Literal["full", "checkpointed", "tesla"]
EXACT_MODES = ("full", "checkpointed")
APPROXIMATE_MODES = ("tesla",)  # not exact: never chosen by `auto`, run only with allow_approximate=True
BACKWARD_MODES = ("auto", *EXACT_MODES)
COMPILE_VARIANTS = 64  # compiled variants a run may need: minibatch sizes x label kinds x walk options
Compiler = str | Callable  # a torch.compile backend: its name or the backend itself, or CUDA_GRAPHS
CUDA_GRAPHS = "inductor-cudagraphs"  # inductor's kernels, each compiled step replayed as one CUDA graph
                                     # (torch.compile's mode "reduce-overhead"); timed by bench/gpu_suite.py
CUDA_GRAPH_BACKENDS = (CUDA_GRAPHS, "cudagraphs")  # "cudagraphs": dynamo's own, the traced ops replayed unfused
MatchMode = Literal["final", "closest"]
MATCH_MODES = ("final", "closest")


class Student:
    """A network evaluated at a flat parameter vector theta [P] (in .parameters() order), or at K of
    them at once, theta [K, P] on inputs [K, B, ...] (K segments, one vmapped call)."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.names = [name for name, _ in net.named_parameters()]
        self.shapes = [p.shape for p in net.parameters()]
        self.numels = [p.numel() for p in net.parameters()]
        self.num_params = sum(self.numels)

    def __call__(self, theta: Tensor, x: Tensor) -> Tensor:
        if theta.shape[-1:] != (self.num_params,) or theta.dim() > 2:
            raise ValueError(f"theta has shape {tuple(theta.shape)}, the network has {self.num_params} parameters")
        return self._forward(theta, x) if theta.dim() == 1 else vmap(self._forward)(theta, x)

    def _forward(self, theta: Tensor, x: Tensor) -> Tensor:
        views = [t.view(s) for t, s in zip(torch.split(theta, self.numels), self.shapes)]
        return functional_call(self.net, dict(zip(self.names, views)), (x,))


class CompileFailed(ValueError):
    """torch.compile could not compile the student's steps here (no C compiler, no Triton, an op it cannot trace)."""

    def __init__(self, backend: Compiler, reason: str):
        self.reason = reason
        super().__init__(f"torch.compile (backend {getattr(backend, '__name__', backend)!r}) could not compile the "
                         f"student's steps: {reason}. Run without compile (drop --compile): the same gradient, "
                         "computed eagerly")


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
        plans.append(StepPlan(to_device(indices, device), augment))
    return plans


@dataclass
class UnrollResult:
    loss: float                      # the matching loss
    grad_images: Tensor              # dL/dX
    grad_lr: Tensor                  # dL/dalpha (0-d)
    grad_label_logits: Tensor | None # dL/d(label logits), when soft labels are on
    final_params: Tensor             # theta_N, detached: where the student ended
    matched_step: int | list[int] | None = None  # the step the loss was taken at (N unless match="closest");
                                                 # a list, one per segment, for K segments


def _step_batch(images: Tensor, targets: Tensor, plan: StepPlan) -> tuple[Tensor, Tensor]:
    """The step's augmented minibatch and its targets: [b, ...], or [K, b, ...] for K segments."""
    x = apply_params(images[plan.indices.flatten()], plan.augment).view(*plan.indices.shape, *images.shape[1:])
    if targets.dim() == 3:  # fixed soft targets, one set per segment (TESLA's teacher labels): [K, N, C]
        return x, targets[torch.arange(len(targets), device=targets.device).unsqueeze(1), plan.indices]
    return x, targets[plan.indices]


def _batch_loss(student: Student, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """The cross-entropy on a step's minibatch; with K segments the sum of theirs, so that d/dtheta[k] is
    segment k's gradient. Soft targets come as logits (softmax taken)."""
    logits = student(theta, x)
    if y.dtype != torch.long:
        y = y.softmax(-1)
    if theta.dim() == 1:
        return F.cross_entropy(logits, y)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(0, 1), reduction="none").view(x.shape[:2]).mean(1).sum()


def unroll(student: Student, theta_start: Tensor, theta_target: Tensor, images: Tensor, syn_lr: Tensor,
           plans: list[StepPlan], labels: Tensor | None = None, label_logits: Tensor | None = None,
           mode: BackwardMode = "checkpointed", match: MatchMode = "final", param_mask: Tensor | None = None,
           allow_approximate: bool = False, compiler: Compiler | None = None, kept_graphs: int = 0) -> UnrollResult:
    """Matching loss and its gradients; images/syn_lr/label_logits are leaves.

    One expert segment: theta_start/theta_target [P]. K segments at once: [K, P] each, with plans
    from plan_steps(..., segments=K); the loss is the mean of the K segments' losses.

    labels: class indices [N], or fixed soft targets given as logits (softmax taken), [N, C] or one
    set per segment [K, N, C] (TESLA's teacher labels); no gradient flows to them. label_logits:
    learned soft labels [N, C], whose gradient is returned.

    mode: "full" or "checkpointed" (exact), or "tesla" (APPROXIMATE: no Hessian term; needs
    allow_approximate=True). match: "final" (MTT, the loss at step N) or "closest" (ATT, at each
    segment's step closest to its target). param_mask: bool [P], the parameters the loss counts
    (PAD); None counts all. compiler: a torch.compile backend ("inductor", or a callable) for the student's
    steps, which then run as torch.func functions, or CUDA_GRAPHS (inductor's, replayed as CUDA graphs); None
    runs them eagerly. kept_graphs (`checkpointed`, `tesla`, eager): the last steps whose graphs the forward path
    keeps for the walk, see the module's docstring.
    """
    if (labels is None) == (label_logits is None):
        raise ValueError("give exactly one of labels (hard) or label_logits (soft)")
    if mode in APPROXIMATE_MODES and not allow_approximate:
        raise ValueError(f"backward mode {mode!r} is APPROXIMATE (it drops the Hessian term, so its gradient is not "
                         f"the exact one): pass allow_approximate=True to use it, or use one of {EXACT_MODES}")
    if mode not in EXACT_MODES + APPROXIMATE_MODES:
        raise ValueError(f"unknown backward mode {mode!r}: use one of {EXACT_MODES} (resolve 'auto' with "
                         f"choose_backward) or, approximate, one of {APPROXIMATE_MODES}")
    if match not in MATCH_MODES:
        raise ValueError(f"unknown match {match!r}: use one of {MATCH_MODES}")
    if kept_graphs < 0 or kept_graphs and (mode == "full" or compiler is not None):
        raise ValueError(f"kept_graphs={kept_graphs}: the walk of an eager `checkpointed` or `tesla` keeps 0 or more "
                         f"steps' graphs; `full` keeps all of them, and compiled steps are recomputed (mode {mode!r}, "
                         f"compiler {compiler!r})")
    theta_start, theta_target = theta_start.detach(), theta_target.detach()
    if theta_start.shape != theta_target.shape or plans and plans[0].indices.dim() != theta_start.dim():
        raise ValueError(f"theta_start {tuple(theta_start.shape)}, theta_target {tuple(theta_target.shape)} and plans "
                         f"for {plans[0].indices.dim() if plans else '?'}-d indices do not describe the same segments")
    weight = _loss_weight(param_mask, theta_start)
    start_distance = _distance(theta_start, theta_target, weight)  # [K] for K segments
    step_functions = _step_functions(compiler)
    try:
        if mode == "full":
            return _unroll_full(student, theta_start, theta_target, start_distance, images, syn_lr, plans, labels,
                                label_logits, match, weight, step_functions.graph)
        return _adjoint_walk(student, theta_start, theta_target, start_distance, images, syn_lr, plans, labels,
                             label_logits, match, weight, step_functions, mode == "checkpointed", kept_graphs)
    except Exception as err:
        if compiler is None or not isinstance(err, torch._dynamo.exc.TorchDynamoException):
            raise
        root = err  # dynamo wraps what the backend or the tracer raised
        while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
            root = inner
        reason = next((line for line in str(root).splitlines() if line.strip()), "")
        raise CompileFailed(compiler, f"{type(root).__name__}: {reason}") from err


# ----------------------------------------------------------------------------- the matching loss (PAD, ATT)

def _loss_weight(param_mask: Tensor | None, theta: Tensor) -> Tensor | None:
    """PAD: the mask as 0/1 floats of theta's dtype (None: every parameter counts)."""
    if param_mask is None:
        return None
    if param_mask.dtype != torch.bool or param_mask.shape != theta.shape[-1:]:
        raise ValueError(f"param_mask must be a bool tensor of shape ({theta.shape[-1]},), got {param_mask.dtype} "
                         f"{tuple(param_mask.shape)}")
    if not param_mask.any():
        raise ValueError("param_mask keeps no parameter: the matching loss would be 0/0")
    return param_mask.to(device=theta.device, dtype=theta.dtype)


def _distance(theta: Tensor, target: Tensor, weight: Tensor | None, norm: int = 2) -> Tensor:
    """||theta - target||^2 (norm 2) or ||theta - target||_1 (norm 1, ATT's choice of step) over the last dim,
    counting only the kept parameters (PAD) when weight is given."""
    gaps = (theta - target).pow(2) if norm == 2 else (theta - target).abs()
    return (gaps if weight is None else gaps * weight).sum(-1)


def shallow_layer_mask(model: Student | nn.Module, fraction: float) -> Tensor:
    """PAD's parameter selection: a bool [P] mask (in .parameters() order) that is False on the first
    int(fraction * P) parameters, the shallow layers', which the matching loss then leaves out.

    PAD (Li et al., 2024, "Prioritize Alignment in Dataset Distillation", arXiv 2408.03360) uses "only deep
    layers of the agent model to perform the distillation to avoid excessively introducing low-level
    information". As its code (PAD_depth.py: `keep_indices = loss_indices[int(depth_ratio * P):]` of the flat
    parameter vector) the cut is at that index, inside a tensor if it falls there, not rounded to whole tensors:
    on the CIFAR-10 ConvNet whole tensors would mask 93.5 % of the parameters at fraction 0.5.
    """
    numels = model.numels if isinstance(model, Student) else [p.numel() for p in model.parameters()]
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    mask = torch.ones(sum(numels), dtype=torch.bool)
    mask[:int(fraction * len(mask))] = False
    return mask


def _matched_steps(path: list[Tensor], theta_target: Tensor, weight: Tensor | None, match: MatchMode) -> list[int]:
    """ATT: per segment, the step whose parameters the loss is taken at. "final": N; "closest", as ATT's code
    (distill_ATT.py) chooses it: the argmin over i in 1..N of the L1 distance ||theta_i - target||_1 (the loss
    at that step stays the normalised squared one), detached; ties go to the latest step."""
    steps, segments = len(path) - 1, 1 if path[0].dim() == 1 else len(path[0])
    if match == "final" or steps == 0:
        return [steps] * segments
    distances = torch.stack([_distance(theta.detach(), theta_target, weight, norm=1)
                             for theta in path[1:]])  # [N(, K)]
    return (steps - distances.flip(0).argmin(0)).reshape(-1).tolist()  # flipped: the latest of equal ones


def _at_steps(path: list[Tensor], steps: list[int]) -> Tensor:
    """theta at each segment's matched step: path[s] for one segment, row k of path[s_k] for K of them."""
    if path[0].dim() == 1:
        return path[steps[0]]
    if all(s == len(path) - 1 for s in steps):
        return path[-1]
    return torch.stack([path[s][k] for k, s in enumerate(steps)])


def _reported(steps: list[int], theta: Tensor) -> int | list[int]:
    return steps[0] if theta.dim() == 1 else steps


# ----------------------------------------------------------------------------- the backward modes

def _unroll_full(student: Student, theta_start: Tensor, theta_target: Tensor, start_distance: Tensor, images: Tensor,
                 syn_lr: Tensor, plans: list[StepPlan], labels: Tensor | None, label_logits: Tensor | None,
                 match: str, weight: Tensor | None, step: StepFunction) -> UnrollResult:
    images = images.detach().requires_grad_()
    syn_lr = syn_lr.detach().requires_grad_()
    targets = labels if label_logits is None else label_logits.detach().requires_grad_()
    theta = theta_start.requires_grad_()
    path = [theta]  # references only: the graph keeps these alive anyway
    for plan in plans:
        theta = step(student, theta, *_step_batch(images, targets, plan), syn_lr)
        path.append(theta)
    steps = _matched_steps(path, theta_target, weight, match)
    loss = (_distance(_at_steps(path, steps), theta_target, weight) / start_distance).mean()
    leaves = [images, syn_lr] + ([targets] if label_logits is not None else [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # unused: ATT matched at step 0 (no plans)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    return UnrollResult(loss.item(), grads[0], grads[1], grads[2] if label_logits is not None else None,
                        theta.detach(), _reported(steps, theta))


def _forward_path(student: Student, theta_start: Tensor, images: Tensor, targets: Tensor, alpha: Tensor,
                  plans: list[StepPlan], step: StepFunction, kept_graphs: int = 0,
                  soft: bool = False) -> tuple[list[Tensor], dict[int, StepGraph]]:
    """theta_0..theta_N of the student, with no graph kept across steps; the last `kept_graphs` steps keep their
    own graph for the walk (by step index)."""
    thetas, graphs = [theta_start.detach()], {}
    for i, plan in enumerate(plans):
        x, y = _step_batch(images, targets, plan)
        if i < len(plans) - kept_graphs:
            thetas.append(step(student, thetas[-1], x, y, alpha))
        else:
            graphs[i] = graph = _step_graph(student, thetas[-1], x, y, soft)
            thetas.append((graph.theta - alpha * graph.grad).detach())
    return thetas, graphs


def student_path(student: Student, theta_start: Tensor, images: Tensor, syn_lr: Tensor | float,
                 plans: list[StepPlan], labels: Tensor | None = None,
                 label_logits: Tensor | None = None) -> Tensor:
    """The student's parameters after each of its steps, [N + 1, P] (for plots of its path)."""
    targets = labels if label_logits is None else label_logits.detach()
    alpha = torch.as_tensor(syn_lr, dtype=theta_start.dtype, device=theta_start.device)
    return torch.stack(_forward_path(student, theta_start, images.detach(), targets, alpha, plans,
                                     EAGER_STEPS.forward)[0])


def _loss_adjoints(theta_matched: Tensor, theta_target: Tensor, start_distance: Tensor, weight: Tensor | None,
                   steps: list[int]) -> dict[int, Tensor]:
    """dL/dtheta_s that the matching loss feeds in at each matched step s (for K segments, the rows
    of the segments matched at s; the other rows zero)."""
    segments = 1 if theta_matched.dim() == 1 else len(theta_matched)
    diff = theta_matched - theta_target
    seed = 2 * (diff if weight is None else diff * weight) / (start_distance.unsqueeze(-1) * segments)
    if theta_matched.dim() == 1 or len(set(steps)) == 1:
        return {steps[0]: seed}
    return {s: seed * torch.tensor([t == s for t in steps], dtype=seed.dtype, device=seed.device).unsqueeze(-1)
            for s in set(steps)}


def _adjoint_walk(student: Student, theta_start: Tensor, theta_target: Tensor, start_distance: Tensor,
                  images: Tensor, syn_lr: Tensor, plans: list[StepPlan], labels: Tensor | None,
                  label_logits: Tensor | None, match: str, weight: Tensor | None, step_functions: Steps, hessian: bool,
                  kept_graphs: int) -> UnrollResult:
    """`checkpointed` (hessian=True, exact) and `tesla` (hessian=False, APPROXIMATE, see the module's docstring:
    the adjoint is not updated by -alpha*H_i lambda, so each step sees the adjoint of the matched step). The last
    `kept_graphs` steps are not re-run: their graphs, recorded by the forward path, are differentiated as they are."""
    images = images.detach()
    alpha = syn_lr.detach()
    soft = label_logits is not None
    targets = label_logits.detach() if soft else labels
    thetas, kept = _forward_path(student, theta_start, images, targets, alpha, plans, step_functions.forward,
                                 kept_graphs, soft)
    theta_final = thetas[-1]
    steps = _matched_steps(thetas, theta_target, weight, match)
    theta_matched = _at_steps(thetas, steps)
    loss = (_distance(theta_matched, theta_target, weight) / start_distance).mean()

    # Backward: adjoint walk, one step's graph at a time, from the last matched step down.
    arriving = _loss_adjoints(theta_matched, theta_target, start_distance, weight, steps)
    adjoint = None
    grad_images = torch.zeros_like(images)
    grad_lr = torch.zeros_like(alpha)
    grad_logits = torch.zeros_like(targets) if soft else None
    for i in reversed(range(max(steps))):
        if i + 1 in arriving:
            adjoint = arriving[i + 1] if adjoint is None else adjoint + arriving[i + 1]
        # The step's minibatch, and the map of its gradients back through the augmentation and the selection
        # to the whole set: kept out of the step itself, so that a compiled step is one variant for every DSA op.
        if soft:
            (x, y), to_the_set = torch.func.vjp(lambda im, lg: _step_batch(im, lg, plans[i]), images, targets)
        else:
            x, to_the_set, y = torch.func.vjp(lambda im: _step_batch(im, targets, plans[i]), images, has_aux=True)
        if i in kept:
            grad_dot_adjoint, d_x, *rest = _walk_graph(kept.pop(i), adjoint, soft, hessian)
        else:
            grad_dot_adjoint, d_x, *rest = step_functions.walk(student, thetas[i], x, y, adjoint, soft, hessian)
        d_set = to_the_set((d_x, rest[0]) if soft else d_x)
        grad_lr -= grad_dot_adjoint
        grad_images -= alpha * d_set[0]
        if soft:
            grad_logits -= alpha * d_set[1]
        if hessian:
            adjoint = adjoint - alpha * rest[-1]  # lambda_i = lambda_{i+1} - alpha * H_i lambda_{i+1}
    return UnrollResult(loss.item(), grad_images, grad_lr, grad_logits, theta_final, _reported(steps, theta_final))


# ----------------------------------------------------------------------------- one step, two ways
#
# On a step's minibatch x (augmented) with targets y: a step forward, theta -> theta - alpha * g(theta), without
# a graph (the walk's forward path) or with one that autograd differentiates afterwards (`full`), and a step of
# the backward walk: for the adjoint lambda, g . lambda and its vector-Jacobian products (dg/dx)^T lambda,
# (dg/dy)^T lambda (learned soft labels) and H lambda (hessian=True; TESLA skips it). Eager autograd by default.
# torch.compile cannot differentiate an autograd graph twice (AOTAutograd refuses double backward), but the same
# steps written with torch.func's grad (and grad-of-grad) are plain forward computations to it, which it compiles;
# autograd then differentiates the compiled forward step once, through the backward AOTAutograd compiled with it.
# On an H200 the compiled walk made `checkpointed` 2.7x faster than eager `full` at CIFAR-10 IPC 10 (BENCHMARKS.md).
# With the DSA op and the minibatch selection outside it, a compiled step is also one fixed sequence of kernels
# per minibatch shape, which CUDA_GRAPHS replays as one CUDA graph: no launch per kernel (opt-in, not yet timed).

StepFunction = Callable[[Student, Tensor, Tensor, Tensor, Tensor], Tensor]
WalkStepFunction = Callable[[Student, Tensor, Tensor, Tensor, Tensor, bool, bool], tuple[Tensor, ...]]


class Steps(NamedTuple):
    forward: StepFunction    # theta_{i+1}, no graph kept
    graph: StepFunction      # theta_{i+1} with its graph, to be differentiated once (`full`)
    walk: WalkStepFunction   # one step of the adjoint walk


def _autograd_step(student: Student, theta: Tensor, x: Tensor, y: Tensor, alpha: Tensor) -> Tensor:
    theta = theta.detach().requires_grad_()
    grad = torch.autograd.grad(_batch_loss(student, theta, x, y), theta)[0]
    return (theta - alpha * grad).detach()


def _autograd_graph_step(student: Student, theta: Tensor, x: Tensor, y: Tensor, alpha: Tensor) -> Tensor:
    return theta - alpha * torch.autograd.grad(_batch_loss(student, theta, x, y), theta, create_graph=True)[0]


class StepGraph(NamedTuple):
    """One step recorded by autograd for the walk: its inputs as leaves and the gradient g(theta; x, y)."""
    theta: Tensor
    x: Tensor
    y: Tensor  # a leaf for soft targets (their gradient is wanted); class indices as they are
    grad: Tensor


def _step_graph(student: Student, theta: Tensor, x: Tensor, y: Tensor, soft: bool) -> StepGraph:
    theta, x = theta.detach().requires_grad_(), x.detach().requires_grad_()
    y = y.detach().requires_grad_() if soft else y
    return StepGraph(theta, x, y, torch.autograd.grad(_batch_loss(student, theta, x, y), theta, create_graph=True)[0])


def _walk_graph(graph: StepGraph, adjoint: Tensor, soft: bool, hessian: bool) -> tuple[Tensor, ...]:
    grad_dot_adjoint = (graph.grad * adjoint).sum()
    inputs = [graph.x] + ([graph.y] if soft else []) + ([graph.theta] if hessian else [])  # tesla: no VJP w.r.t. theta
    return grad_dot_adjoint.detach(), *torch.autograd.grad(grad_dot_adjoint, inputs)


def _autograd_walk_step(student: Student, theta: Tensor, x: Tensor, y: Tensor, adjoint: Tensor, soft: bool,
                        hessian: bool) -> tuple[Tensor, ...]:
    return _walk_graph(_step_graph(student, theta, x, y, soft), adjoint, soft, hessian)


def _func_step(student: Student, theta: Tensor, x: Tensor, y: Tensor, alpha: Tensor) -> Tensor:
    return theta - alpha * torch.func.grad(_batch_loss, argnums=1)(student, theta, x, y)


def _func_walk_step(student: Student, theta: Tensor, x: Tensor, y: Tensor, adjoint: Tensor, soft: bool,
                    hessian: bool) -> tuple[Tensor, ...]:
    def step_grad(x_: Tensor, *rest: Tensor) -> Tensor:  # rest: the soft targets, theta, as differentiated
        return torch.func.grad(_batch_loss, argnums=1)(student, rest[-1] if hessian else theta, x_,
                                                       rest[0] if soft else y)
    inputs = (x,) + ((y,) if soft else ()) + ((theta,) if hessian else ())
    grad, pullback = torch.func.vjp(step_grad, *inputs)
    return (grad * adjoint).sum(), *pullback(adjoint)


EAGER_STEPS = Steps(_autograd_step, _autograd_graph_step, _autograd_walk_step)


def _step_functions(compiler: Compiler | None) -> Steps:
    """The eager autograd steps (compiler None), or the torch.func steps compiled with that torch.compile backend."""
    return EAGER_STEPS if compiler is None else _compiled_steps(compiler)


@functools.cache
def _compiled_steps(backend: Compiler) -> Steps:
    # Each minibatch size (a last, smaller chunk; segments), label kind and whether autograd records the step
    # (`full`) is a variant compiled on first use; past the default recompile limit (8) dynamo would quietly run
    # the rest eagerly.
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, COMPILE_VARIANTS)
    # fullgraph: a step that does not trace whole is an error, not a quiet mix of compiled and eager pieces.
    how = dict(backend="inductor", mode="reduce-overhead") if backend == CUDA_GRAPHS else dict(backend=backend)
    step, walk = (torch.compile(f, dynamic=False, fullgraph=True, **how) for f in (_func_step, _func_walk_step))
    if backend in CUDA_GRAPH_BACKENDS:
        step, walk = _copied_out(step), _copied_out(walk)
    return Steps(step, step, walk)


def _copied_out(replayed: Callable) -> Callable:
    """A step replayed as a CUDA graph writes its outputs into the graph's own memory, which the next replay
    reuses (CUDAGraph Trees then refuse to read the old ones): the forward path keeps theta_0..theta_N, so every
    step's outputs are copied out (a copy of P floats and of the minibatch's gradient per step)."""
    def run(*args):
        out = replayed(*args)
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()
    return run


# ----------------------------------------------------------------------------- auto: measure, then choose

def memory_share(device: torch.device) -> float:
    """The share of the free memory that `full`'s graph, or the step graphs `checkpointed` keeps, may fill.

    On CUDA 85 %: `full_graph_bytes` came within 1.3-2.3 % of the peak measured at each of the paper's CIFAR shapes
    (an H200, BENCHMARKS.md), the rest is left to the allocator's rounding and fragmentation, and a run that runs
    out anyway redoes the iteration with `checkpointed`. So `full` runs where the original's published time was
    taken (CIFAR-100 IPC 10, ~57 GiB, on an 80 GB card), not a slower walk. Elsewhere running out of RAM is not an
    error a run can survive (Linux's OOM killer ends the process): half."""
    return 0.85 if device.type == "cuda" else 0.5


def backward_name(mode: str, compiled: bool) -> str:
    """How a mode is named in `auto`'s timings and reports: "full", "compiled checkpointed", ..."""
    return f"compiled {mode}" if compiled else mode


@dataclass
class BackwardChoice:
    """What `auto` chose, and the measurements it chose by (recorded in the run's history)."""

    mode: BackwardMode
    seconds: dict[str, float] = field(default_factory=dict)  # median seconds of one unroll, per mode timed
    full_graph_bytes: int = 0        # estimate of the memory `full` keeps alive across the unroll
    free_bytes: int | None = None    # free memory on the device when measured (None: unknown)
    reason: str = ""
    kept_graphs: int = 0             # checkpointed: the last steps whose graphs the forward path keeps (what fits)
    compiled: bool = False           # the mode's steps run compiled (`auto` with a compiler, where that was faster)


def checkpointed_after_out_of_memory(device: torch.device, reason: str, graph_bytes: int = 0, steps: int = 0,
                                     free_bytes: int | None = None, compiled: bool = False) -> BackwardChoice:
    """`full` ran out of memory: `checkpointed` instead, the same gradient, keeping the graphs of half of the `steps`
    (fewer where those do not fit in memory_share of what is free), with graph_bytes `full`'s estimate; none with
    graph_bytes 0 (kept graphs that ran out) or compiled (its steps are all recomputed). Call it outside the
    `except` block, whose traceback still holds the failed graph, so that emptying the cache frees it."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    free = free_memory(device) if free_bytes is None else free_bytes
    kept = 0
    if graph_bytes and free and not compiled:
        kept = min(steps // 2, graphs_that_fit(graph_bytes, steps, free, memory_share(device)))
    if kept:
        reason += f"; keeping the graphs of the last {kept} of {steps} steps"
    return BackwardChoice("checkpointed", {}, graph_bytes, free, reason, kept, compiled)


def free_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate: free CUDA memory (the cached blocks PyTorch's allocator would reuse
    included), else its share of the OS's MemAvailable (Linux), which torchrun's processes on this machine split."""
    if device.type == "cuda":  # the driver's free memory and what PyTorch holds cached for reuse
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // local_world_size()
    except OSError:
        pass
    return None


def full_graph_bytes(student: Student, theta_start: Tensor, images: Tensor, syn_lr: Tensor, plans: list[StepPlan],
                     targets: Tensor) -> int:
    """Memory the `full` mode's graph holds at its peak: the tensors one step saves for the double
    backward, counted with saved-tensor hooks (each storage once: several nodes save the same
    activation, and views share their base's memory), on the step with the largest minibatch (the
    first drawn is often a smaller last chunk), times the number of steps."""
    # Held until counted: a storage freed meanwhile could hand its address to another one, which
    # would then be counted in its place (seen with torch 2.11 on the CPU).
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage
        return t

    theta = theta_start.detach().requires_grad_()
    x = images.detach().requires_grad_()
    largest = max(plans, key=lambda plan: plan.indices.numel())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _autograd_graph_step(student, theta, *_step_batch(x, targets, largest), syn_lr.detach().requires_grad_())
    return sum(storage.nbytes() for storage in storages.values()) * len(plans)


def graphs_that_fit(graph_bytes: int, steps: int, free_bytes: int | None, share: float) -> int:
    """How many of the steps' graphs (`full`'s graph_bytes over `steps`) fit in `share` of free_bytes (see
    memory_share): `steps` itself where all of `full`'s graph does (or the free memory is unknown)."""
    if free_bytes is None or graph_bytes <= share * free_bytes:
        return steps
    return int(share * free_bytes * steps // graph_bytes)


def choose_backward(student: Student, theta_start: Tensor, theta_target: Tensor, images: Tensor, syn_lr: Tensor,
                    plans: list[StepPlan], labels: Tensor | None = None, label_logits: Tensor | None = None,
                    repeats: int = 3, free_bytes: int | None = None,
                    compiler: Compiler | None = None) -> BackwardChoice:
    """The fastest exact backward on this segment among those whose memory fits: `full` and `checkpointed`, and
    with a compiler each of them compiled too (kept only where that is faster: compiling pays on a GPU, not on a
    CPU); a mode that does not compile is left out, and said so in the reason. Where `full` does not fit,
    eager `checkpointed` keeps the graphs of as many of the last steps as would (kept_graphs; compiled steps are
    all recomputed), which needs no timing without a compiler: each graph kept is a step less to recompute.

    Each candidate runs once to warm up (allocator, kernel choice, compiling), then the candidates take
    turns `repeats` times, so that a drift of the machine's speed (other jobs, the allocator
    growing its pools) hits them alike; the medians decide. `free_bytes` defaults to what
    `free_memory` reports now. Nothing here draws random numbers, so choosing leaves a run's
    randomness as it was.
    """
    device = images.device
    targets = labels if label_logits is None else label_logits.detach()
    free = free_memory(device) if free_bytes is None else free_bytes
    graph = full_graph_bytes(student, theta_start, images, syn_lr, plans, targets)
    share = memory_share(device)
    fit = graphs_that_fit(graph, len(plans), free, share)
    modes = EXACT_MODES if fit == len(plans) else ("checkpointed",)
    kept = 0 if fit == len(plans) else fit
    too_big = "" if fit == len(plans) else (f"full would hold ~{graph / 2**30:.2f} GiB, more than {share:.0%} of the "
                                            f"{free / 2**30:.2f} GiB free")
    keeping = f"the graphs of the last {kept} of {len(plans)} steps fit"
    candidates = [(mode, False) for mode in modes] + [(mode, True) for mode in modes if compiler]
    if len(candidates) == 1:
        return BackwardChoice("checkpointed", {}, graph, free, f"{too_big}; {keeping}", kept)

    def kept_by(mode: str, compiled: bool) -> int:  # `full` keeps every graph anyway; compiled steps recompute
        return 0 if compiled or mode == "full" else kept

    def run(mode: str, compiled: bool) -> None:
        unroll(student, theta_start, theta_target, images, syn_lr, plans, labels, label_logits, mode,
               compiler=compiler if compiled else None, kept_graphs=kept_by(mode, compiled))

    uncompiled: dict[str, CompileFailed] = {}
    times: dict[tuple[str, bool], list[float]] | None = None
    try:
        for mode, compiled in candidates:  # the warm-up, compiling included
            try:
                run(mode, compiled)
            except CompileFailed as err:
                uncompiled[mode] = err
        times = {(mode, compiled): [] for mode, compiled in candidates if not (compiled and mode in uncompiled)}
        for _ in range(repeats):
            for (mode, compiled), took in times.items():
                took.append(seconds(lambda: run(mode, compiled), device))
    except torch.OutOfMemoryError:
        times = None  # out of this block, so that the error's traceback lets go of the failed graph
    if times is None:
        return checkpointed_after_out_of_memory(device, "full ran out of memory", graph, len(plans), free)
    medians = {candidate: statistics.median(t) for candidate, t in times.items()}
    mode, compiled = min(medians, key=medians.get)
    timed = {backward_name(*candidate): t for candidate, t in medians.items()}
    reason = f"{backward_name(mode, compiled)} was " + (f"the fastest of {', '.join(timed)}" if len(timed) > 2
                                                         else "faster")
    if too_big:
        reason += f" ({too_big}{'' if compiled else '; ' + keeping})"
    if compiler and len(uncompiled) < len(modes):
        reason += f"; compiled by {getattr(compiler, '__name__', compiler)}"
    reason += "".join(f"; {failed} could not be compiled ({err.reason})" for failed, err in uncompiled.items())
    return BackwardChoice(mode, timed, graph, free, reason, kept_by(mode, compiled), compiled)
