"""The successors' options of `unroll` in float64: TESLA's approximate backward, ATT's closest-step
matching, PAD's parameter mask (issue 11, the unroll stage)."""
import pytest
import test_unroll
import torch
import torch.nn.functional as F
from test_unroll import BATCH, CLASSES, STEPS, reference_grads, segment_plans

from mtt.augment import DEFAULT_STRATEGY
from mtt.networks import get_network
from mtt.unroll import (
    APPROXIMATE_MODES,
    BACKWARD_MODES,
    EXACT_MODES,
    _batch_loss,
    _matched_steps,
    _step_batch,
    plan_steps,
    shallow_layer_mask,
    student_path,
    unroll,
)


def step_loss(student, theta, images, targets, plan):
    """The cross-entropy of one student step on its augmented minibatch (plain autograd, for the references)."""
    return _batch_loss(student, theta, *_step_batch(images, targets, plan))

K = 3
problem = test_unroll.problem  # the float64 fixture of the exact modes' tests


def segments_problem(images):
    """K segments with their own starts, targets and plans."""
    torch.manual_seed(5)
    return plan_steps(len(images), STEPS, BATCH, (1, 8, 8), DEFAULT_STRATEGY, torch.Generator().manual_seed(2),
                      torch.device("cpu"), segments=K)


def cosine(a, b):
    return (a.flatten() @ b.flatten() / (a.norm() * b.norm())).item()


# ----------------------------------------------------------------------------- TESLA

def tesla_closed_form(student, theta_start, theta_target, images, syn_lr, plans, targets):
    """dX = -alpha sum_i d(g_i(theta_i, X) . lambda_N)/dX, dalpha = -sum_i g_i . lambda_N, with theta_i from a
    plain forward (constants) and lambda_N = 2 (theta_N - target) / ||theta_0 - target||^2."""
    path = student_path(student, theta_start, images, syn_lr, plans,
                        **({"labels": targets} if targets.dtype == torch.long else {"label_logits": targets}))
    adjoint = 2 * (path[-1] - theta_target) / (theta_start - theta_target).pow(2).sum()
    x = images.clone().requires_grad_()
    soft = targets.dtype != torch.long
    t = targets.clone().requires_grad_() if soft else targets
    total_dot = 0
    for i, plan in enumerate(plans):
        theta = path[i].clone().requires_grad_()
        g = torch.autograd.grad(step_loss(student, theta, x, t, plan), theta, create_graph=True)[0]
        total_dot = total_dot + (g * adjoint).sum()
    grads = torch.autograd.grad(total_dot, [x] + ([t] if soft else []))
    return -syn_lr * grads[0], -total_dot.detach(), (-syn_lr * grads[1] if soft else None)


def test_tesla_is_approximate_and_never_an_exact_mode(problem):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    assert "tesla" in APPROXIMATE_MODES and "tesla" not in EXACT_MODES and "tesla" not in BACKWARD_MODES
    with pytest.raises(ValueError, match="APPROXIMATE.*allow_approximate"):
        unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, mode="tesla")


@pytest.mark.parametrize("soft", [False, True])
def test_tesla_equals_its_closed_form(problem, soft):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    kw = {"label_logits": 2.0 * F.one_hot(labels, CLASSES).double() + 0.1 * torch.randn(len(labels), CLASSES,
                                                                                      dtype=torch.float64)} \
        if soft else {"labels": labels}
    result = unroll(student, theta_start, theta_target, images, syn_lr, plans, mode="tesla", allow_approximate=True,
                    **kw)
    exact = unroll(student, theta_start, theta_target, images, syn_lr, plans, mode="full", **kw)
    d_images, d_lr, d_logits = tesla_closed_form(student, theta_start, theta_target, images, syn_lr, plans,
                                                 kw.get("label_logits", labels))
    assert result.loss == pytest.approx(exact.loss, rel=1e-12)  # the loss itself is exact
    assert torch.allclose(result.grad_images, d_images, rtol=0, atol=1e-10 * d_images.abs().max().item())
    assert torch.allclose(result.grad_lr, d_lr, rtol=1e-10, atol=0)
    if soft:
        assert torch.allclose(result.grad_label_logits, d_logits, rtol=0, atol=1e-10 * d_logits.abs().max().item())
    assert d_images.abs().sum() > 0


def test_tesla_differs_from_the_exact_gradient_but_is_related(problem):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    tesla = unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, mode="tesla",
                   allow_approximate=True)
    exact = unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, mode="full")
    cos = cosine(tesla.grad_images, exact.grad_images)
    print(f"TESLA vs exact: cosine of dL/dX {cos:.6f}, dL/dalpha {tesla.grad_lr.item():.6e} vs "
          f"{exact.grad_lr.item():.6e}")
    assert 0 < cos < 0.999999
    assert not torch.allclose(tesla.grad_lr, exact.grad_lr, rtol=1e-9, atol=0)


@pytest.mark.parametrize("match", ["final", "closest"])
def test_tesla_k_segments_equal_the_mean_of_per_segment_tesla(problem, match):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    plans = segments_problem(images)
    starts = theta_start + 0.05 * torch.randn(K, len(theta_start), dtype=torch.float64)
    targets = starts + 0.05 * torch.randn_like(starts)
    kw = {"labels": labels, "mode": "tesla", "allow_approximate": True, "match": match}
    together = unroll(student, starts, targets, images, syn_lr, plans, **kw)
    apart = [unroll(student, starts[k], targets[k], images, syn_lr, segment_plans(plans, k), **kw) for k in range(K)]
    assert together.loss == pytest.approx(sum(r.loss for r in apart) / K, rel=1e-12)
    assert together.matched_step == [r.matched_step for r in apart]
    for name in ["grad_images", "grad_lr"]:
        mean = sum(getattr(r, name) for r in apart) / K
        assert torch.allclose(getattr(together, name), mean, rtol=1e-9, atol=1e-14), name


# ----------------------------------------------------------------------------- ATT

def target_near_step(student, theta_start, images, syn_lr, plans, labels, step, noise=1e-4, seed=3):
    path = student_path(student, theta_start, images, syn_lr, plans, labels=labels)
    g = torch.Generator().manual_seed(seed)
    return path[step] + noise * torch.randn(path.shape[-1], generator=g, dtype=path.dtype)


@pytest.mark.parametrize("mode", EXACT_MODES)
@pytest.mark.parametrize("where", ["near step 3", "the fixture's target"])
def test_att_equals_autograd_through_the_unroll_truncated_at_the_matched_step(problem, mode, where):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    if where == "near step 3":
        theta_target = target_near_step(student, theta_start, images, syn_lr, plans, labels, 3)
    result = unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, mode=mode,
                    match="closest")
    path = student_path(student, theta_start, images, syn_lr, plans, labels=labels)
    distances = (path[1:] - theta_target).abs().sum(-1).tolist()  # ATT chooses by the L1 distance
    step = result.matched_step
    assert isinstance(step, int) and step == 1 + max(i for i, d in enumerate(distances) if d == min(distances))
    if where == "near step 3":
        assert step == 3 < STEPS  # truncation is exercised
    ref_loss, (ref_images, ref_lr) = reference_grads(net, theta_start, theta_target, images, syn_lr, plans[:step],
                                                     labels=labels)
    assert result.loss == pytest.approx(ref_loss, rel=1e-9)
    assert torch.allclose(result.grad_images, ref_images, rtol=1e-6, atol=1e-12 * ref_images.abs().max().item())
    assert torch.allclose(result.grad_lr, ref_lr, rtol=1e-6, atol=0)
    assert torch.allclose(result.final_params, path[-1], rtol=0, atol=1e-12)  # still theta_N, not theta_{i*}


def test_att_chooses_by_the_l1_distance_and_the_latest_of_equals():
    """As ATT's code: l1_loss(student_params[-1], target, "sum"), kept when `current >= L`."""
    target, near_in_l2, near_in_l1 = torch.zeros(4), torch.ones(4), torch.tensor([3.0, 0, 0, 0])
    start = torch.full((4,), 9.0)
    assert _matched_steps([start, near_in_l2, near_in_l1], target, None, "closest") == [2]  # L1 3 < 4; L2 9 > 4
    assert _matched_steps([start, near_in_l2, near_in_l2, start], target, None, "closest") == [2]
    segments = torch.stack([near_in_l1, near_in_l2])  # K = 2: each its own choice
    assert _matched_steps([torch.full((2, 4), 9.0), segments, segments.flip(0)], target, None, "closest") == [1, 2]


def test_att_final_is_mtt(problem):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    for mode in EXACT_MODES:
        plain = unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, mode=mode)
        final = unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, mode=mode,
                       match="final")
        assert plain.matched_step == final.matched_step == STEPS
        assert torch.equal(plain.grad_images, final.grad_images) and plain.loss == final.loss
    with pytest.raises(ValueError, match="match"):
        unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, match="nearest")


@pytest.mark.parametrize("mode", EXACT_MODES)
def test_att_k_segments_each_match_their_own_step(problem, mode):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    plans = segments_problem(images)
    starts = theta_start + 0.05 * torch.randn(K, len(theta_start), dtype=torch.float64)
    targets = []
    for k, step in enumerate([2, STEPS, 4]):
        if step == STEPS:
            targets.append(starts[k] + 0.05 * torch.randn_like(starts[k]))  # the fixture-like far target
        else:
            targets.append(target_near_step(student, starts[k], images, syn_lr, segment_plans(plans, k), labels, step))
    targets = torch.stack(targets)
    together = unroll(student, starts, targets, images, syn_lr, plans, labels=labels, mode=mode, match="closest")
    apart = [unroll(student, starts[k], targets[k], images, syn_lr, segment_plans(plans, k), labels=labels, mode=mode,
                    match="closest") for k in range(K)]
    assert together.matched_step == [r.matched_step for r in apart]
    assert together.matched_step[0] == 2 and together.matched_step[2] == 4  # segments truncated differently
    assert together.loss == pytest.approx(sum(r.loss for r in apart) / K, rel=1e-12)
    for name in ["grad_images", "grad_lr"]:
        mean = sum(getattr(r, name) for r in apart) / K
        assert torch.allclose(getattr(together, name), mean, rtol=1e-6, atol=1e-12), name


def test_att_modes_agree(problem):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    theta_target = target_near_step(student, theta_start, images, syn_lr, plans, labels, 4)
    full, ckpt = (unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, mode=m,
                         match="closest") for m in EXACT_MODES)
    assert full.matched_step == ckpt.matched_step == 4
    assert torch.allclose(full.grad_images, ckpt.grad_images, rtol=1e-9, atol=1e-12 * full.grad_images.abs().max())
    assert torch.allclose(full.grad_lr, ckpt.grad_lr, rtol=1e-9, atol=0)


# ----------------------------------------------------------------------------- PAD

def test_shallow_layer_mask_drops_the_leading_share_of_the_flat_parameters(problem):
    net, student, *_ = problem
    total = sum(p.numel() for p in net.parameters())
    assert shallow_layer_mask(student, 0.0).all()
    mask = shallow_layer_mask(net, 0.25)
    assert torch.equal(mask, shallow_layer_mask(student, 0.25))
    cut = int(0.25 * total)  # PAD_depth.py: keep_indices = loss_indices[int(depth_ratio * P):]
    assert not mask[:cut].any() and mask[cut:].all()
    # On the CIFAR-10 ConvNet half is inside conv3's weight: whole tensors would have masked 93.5 %.
    cifar = shallow_layer_mask(get_network("ConvNet", 3, 10, (32, 32)), 0.5)
    assert (~cifar).sum().item() == 160005 == 320010 // 2
    with pytest.raises(ValueError, match="fraction"):
        shallow_layer_mask(net, 1.0)


@pytest.mark.parametrize("mode", [*EXACT_MODES, "tesla"])
def test_pad_masked_parameters_leave_loss_and_gradients_unchanged(problem, mode):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    mask = shallow_layer_mask(student, 0.3)
    assert 0 < mask.sum() < len(mask)
    kw = {"labels": labels, "mode": mode, "param_mask": mask, "allow_approximate": True}
    result = unroll(student, theta_start, theta_target, images, syn_lr, plans, **kw)
    moved = theta_target + torch.where(mask, 0.0, 1.0) * torch.randn_like(theta_target)  # only masked entries move
    other = unroll(student, theta_start, moved, images, syn_lr, plans, **kw)
    assert other.loss == pytest.approx(result.loss, rel=1e-12)
    assert torch.allclose(other.grad_images, result.grad_images, rtol=1e-10, atol=0)
    assert torch.allclose(other.grad_lr, result.grad_lr, rtol=1e-10, atol=0)
    # By hand, on the kept entries only.
    path = student_path(student, theta_start, images, syn_lr, plans, labels=labels)
    kept_target = theta_target[mask]
    by_hand = (path[-1][mask] - kept_target).pow(2).sum() / (theta_start[mask] - kept_target).pow(2).sum()
    assert result.loss == pytest.approx(by_hand.item(), rel=1e-12)
    unmasked = unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, mode=mode,
                      allow_approximate=True)
    assert result.loss != pytest.approx(unmasked.loss, rel=1e-6)  # the mask matters


def test_pad_exact_modes_agree_and_equal_masked_autograd(problem):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    mask = shallow_layer_mask(student, 0.3)
    full, ckpt = (unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, mode=m,
                         param_mask=mask) for m in EXACT_MODES)
    # Reference: plain autograd through the unroll, the loss written on the kept entries only.
    x = images.clone().requires_grad_()
    lr = syn_lr.clone().requires_grad_()
    theta = theta_start.clone().requires_grad_()
    for plan in plans:
        g = torch.autograd.grad(step_loss(student, theta, x, labels, plan), theta, create_graph=True)[0]
        theta = theta - lr * g
    loss = (theta[mask] - theta_target[mask]).pow(2).sum() / (theta_start[mask] - theta_target[mask]).pow(2).sum()
    ref_images, ref_lr = torch.autograd.grad(loss, [x, lr])
    for result in (full, ckpt):
        assert result.loss == pytest.approx(loss.item(), rel=1e-12)
        assert torch.allclose(result.grad_images, ref_images, rtol=1e-6, atol=1e-12 * ref_images.abs().max().item())
        assert torch.allclose(result.grad_lr, ref_lr, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="param_mask"):
        unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, param_mask=mask.double())
    with pytest.raises(ValueError, match="keeps no parameter"):
        unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels,
               param_mask=torch.zeros_like(mask))


@pytest.mark.parametrize("mode", [*EXACT_MODES, "tesla"])
def test_all_three_together_k_segments(problem, mode):
    """ATT + PAD (+ TESLA) on K segments: equals the mean of the per-segment results."""
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    plans = segments_problem(images)
    starts = theta_start + 0.05 * torch.randn(K, len(theta_start), dtype=torch.float64)
    targets = torch.stack([target_near_step(student, starts[k], images, syn_lr, segment_plans(plans, k), labels, s)
                           for k, s in enumerate([2, 5, 3])])
    kw = {"labels": labels, "mode": mode, "match": "closest", "param_mask": shallow_layer_mask(student, 0.2),
          "allow_approximate": True}
    together = unroll(student, starts, targets, images, syn_lr, plans, **kw)
    apart = [unroll(student, starts[k], targets[k], images, syn_lr, segment_plans(plans, k), **kw) for k in range(K)]
    assert together.matched_step == [r.matched_step for r in apart]
    assert together.loss == pytest.approx(sum(r.loss for r in apart) / K, rel=1e-12)
    for name in ["grad_images", "grad_lr"]:
        mean = sum(getattr(r, name) for r in apart) / K
        assert torch.allclose(getattr(together, name), mean, rtol=1e-6, atol=1e-12), name
