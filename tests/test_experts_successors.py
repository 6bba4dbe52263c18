"""Expert options of MTT's successors: FTD's GSAM experts and PAD's easy-to-hard data order.

GSAM steps are checked against the formulas of the official code (juntang-zhuang/GSAM,
gsam/gsam.py) worked out by hand with plain autograd; the curriculum against PAD's schedule
(buffer_CL.py) computed independently from the scores.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mtt.augment import sample_params
from mtt.buffers import ExpertBuffers, flatten_params
from mtt.data import load_dataset
from mtt.experts import (SCORES_FILE, ExpertConfig, SequentialExperts, VectorisedExperts, admitted_images, augment,
                         el2n_scores, init_expert, train_experts, train_group)
from mtt.io import load_safetensors
from mtt.networks import get_network

TINY = ExpertConfig(num_experts=3, epochs=2, width=16, batch_size=64)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits").take_per_class(20, seed=0)


# ----------------------------------------------------------------------------- GSAM by hand

def tiny_net(dtype: torch.dtype, model: str = "ConvNet") -> torch.nn.Module:
    torch.manual_seed(0)
    return get_network(model, 1, 3, (8, 8), width=4, depth=1).to(dtype)


def tiny_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 8, 8, generator=g, dtype=dtype), torch.randint(3, (16,), generator=g)


def norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum((t ** 2).sum() for t in tensors))


def hand_step(net, x, y, rho, alpha, lr, weight_decay, sam_only=False) -> list[torch.Tensor]:
    """One step as GSAM(adaptive=True) over torch.optim.SGD takes it, on a copy of net, written out."""
    net = copy.deepcopy(net)
    params = list(net.parameters())
    g = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    grad_norm = norm([p.detach().abs() * gi for p, gi in zip(params, g)])
    e = [rho * p.detach() ** 2 * gi / (grad_norm + 1e-12) for p, gi in zip(params, g)]
    with torch.no_grad():
        for p, ei in zip(params, e):
            p.add_(ei)
    g_p = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    with torch.no_grad():
        for p, ei in zip(params, e):
            p.sub_(ei)
    if sam_only:  # plain (adaptive) SAM: the gradient at the perturbed weights
        d = g_p
    else:
        cosine = sum((a * b).sum() for a, b in zip(g, g_p)) / (norm(g) * norm(g_p) + 1e-12)
        d = [gp - alpha * (gi - cosine * norm(g) * gp / (norm(g_p) + 1e-12)) for gi, gp in zip(g, g_p)]
    return [p.detach() - lr * (di + weight_decay * p.detach()) for p, di in zip(params, d)]


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
def test_one_gsam_step_equals_the_hand_computed_one(dtype, atol):
    net, (x, y) = tiny_net(dtype), tiny_batch(dtype)
    config = replace(TINY, lr=0.1, weight_decay=5e-4, sam_rho=0.5, gsam_alpha=0.3)  # big rho: a visible effect
    expected = hand_step(net, x, y, 0.5, 0.3, 0.1, 5e-4)
    SequentialExperts(net, config).step(x[None], y[None])
    for got, want in zip(net.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, atol=atol, rtol=0)
    plain = tiny_net(dtype)
    SequentialExperts(plain, replace(config, sam_rho=0.0, gsam_alpha=0.0)).step(x[None], y[None])
    assert (flatten_params(plain) - flatten_params(net)).abs().max() > 100 * atol  # GSAM did change the step


def test_gsam_alpha_zero_is_plain_sam_by_hand():
    net, (x, y) = tiny_net(torch.float64), tiny_batch(torch.float64)
    expected = hand_step(net, x, y, 0.5, 0.0, 0.1, 0.0, sam_only=True)
    SequentialExperts(net, replace(TINY, lr=0.1, sam_rho=0.5)).step(x[None], y[None])
    for got, want in zip(net.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, atol=1e-10, rtol=0)


def test_gsam_leaves_batchnorm_statistics_to_the_first_pass():
    net, (x, y) = tiny_net(torch.float64, "ConvNetBN"), tiny_batch(torch.float64)
    once = copy.deepcopy(net).train()
    once(x)  # one forward in train mode: the statistics SGD's step would leave
    SequentialExperts(net, replace(TINY, sam_rho=0.5, gsam_alpha=0.3)).step(x[None], y[None])
    stats = [(a, b) for a, b in zip(net.buffers(), once.buffers()) if a.is_floating_point()]  # running mean, var
    assert stats
    for got, want in stats:
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_vectorised_gsam_equals_three_sequential_experts(digits):
    config = replace(TINY, lr=0.05, momentum=0.9, weight_decay=5e-4, sam_rho=0.05, gsam_alpha=0.3)
    experts = [init_expert(digits, config, k) for k in range(3)]
    nets = [net.double() for net, _ in experts]
    vectorised = VectorisedExperts(nets, config)
    sequential = [SequentialExperts(net, config) for net in nets]
    for _ in range(2):  # two steps: momentum buffers and the perturbation of moved weights
        idx = torch.stack([torch.randperm(len(digits.train_images), generator=g)[:32] for _, g in experts])
        params = [sample_params(config.dsa, 32, digits.channels, digits.im_size, g) for _, g in experts]
        x, y = augment(digits.train_images[idx].double(), params), digits.train_labels[idx]
        vectorised.step(x, y)
        for p, trainer in enumerate(sequential):
            trainer.step(x[p:p + 1], y[p:p + 1])
    torch.testing.assert_close(vectorised.flat(), torch.stack([flatten_params(net) for net in nets]),
                               atol=1e-12, rtol=0)


def test_train_experts_with_gsam_writes_shards_and_records_it(digits, tmp_path):
    config = replace(TINY, num_experts=2, parallel=2, sam_rho=0.01, gsam_alpha=0.3)
    result = train_experts(digits, config, tmp_path, device="cpu", progress=False)
    assert result["trained"] == 2 and [p.name for p in tmp_path.glob("*.safetensors")] == [
        "experts_00000-00001.safetensors"]
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["sam_rho"] == 0.01 and recorded["gsam_alpha"] == 0.3 and "el2n" not in recorded
    buffers = ExpertBuffers.open(tmp_path)
    plain, _ = train_group(digits, replace(config, sam_rho=0.0, gsam_alpha=0.0), [1], CPU)
    assert torch.isfinite(buffers.trajectory(1)).all()
    assert not torch.allclose(buffers.trajectory(1)[-1], plain[0, -1], atol=1e-6)  # not the plain SGD expert


# ----------------------------------------------------------------------------- easy to hard

def test_admitted_images_follow_pads_linear_schedule():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(3, (60,), generator=g)
    scores = torch.rand(60, generator=g).round(decimals=1)  # ties: the lower index goes first
    config = replace(TINY, easy_to_hard=0.5, easy_to_hard_epochs=4)
    for epoch in range(7):
        share = min(1.0, 0.5 + 0.5 * epoch / 4)  # PAD's linear_cl_scheduler_acse(e, init_ratio, add_end_epoch)
        expected = []
        for c in range(3):
            members = [i for i in range(60) if labels[i] == c]
            expected += sorted(members, key=lambda i: (scores[i].item(), i))[:int(share * len(members))]
        admitted = admitted_images(scores, labels, config, epoch)
        if share == 1:
            assert admitted is None  # every image, in the plain run's order
        else:
            assert admitted.tolist() == sorted(expected)
    assert admitted_images(scores, labels, replace(config, easy_to_hard=0.0), 0) is None


def pad_buffer_cl_indices(scores, labels, e, init_ratio, add_end, rm_first, rm_second, ratio_first, ratio_second):
    """buffer_CL.py's if-chain written out per class (its sorted_diff_indices: each class, easiest first)."""
    chosen = []
    for c in labels.unique().tolist():
        ranked = sorted((i for i in range(len(labels)) if labels[i] == c), key=lambda i: (scores[i].item(), i))
        n = len(ranked)
        if e <= add_end:
            chosen += ranked[:int(min(1, init_ratio + (1 - init_ratio) * e / add_end) * n)]
        elif add_end < e <= rm_first:
            chosen += ranked
        elif rm_first < e <= rm_second:
            chosen += ranked[int(ratio_first * n):]
        else:
            chosen += ranked[int(ratio_second * n):]
    return sorted(chosen)


@pytest.mark.parametrize("init_ratio", [0.5, 0.0])
def test_admitted_images_follow_pads_stages_with_the_easy_ones_removed_late(init_ratio):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(3, (60,), generator=g)
    scores = torch.rand(60, generator=g).round(decimals=1)
    config = replace(TINY, easy_to_hard=init_ratio, easy_to_hard_epochs=4, drop_easy=((6, 0.1), (8, 0.3)))
    for epoch in range(12):
        admitted = admitted_images(scores, labels, config, epoch)
        # Without the adding phase (0: off) PAD's chain starts from every image (its init_ratio 1).
        expected = pad_buffer_cl_indices(scores, labels, epoch, init_ratio or 1.0, 4, 6, 8, 0.1, 0.3)
        got = list(range(60)) if admitted is None else admitted.tolist()
        assert got == expected, epoch
    assert admitted_images(scores, labels, config, 7).numel() < 60  # the check is not vacuous


def plain_loop(dataset, config, ids, admitted_at=lambda epoch: None) -> torch.Tensor:
    """The expert loop written out: each epoch a permutation of the admitted images from the expert's generator."""
    experts = [init_expert(dataset, config, k) for k in ids]
    trainer = (VectorisedExperts([n for n, _ in experts], config) if len(ids) > 1
               else SequentialExperts(experts[0][0], config))
    gens = [g for _, g in experts]
    snapshots = [trainer.flat()]
    for epoch in range(config.epochs):
        pool = admitted_at(epoch)
        pool = torch.arange(len(dataset.train_images)) if pool is None else pool
        order = torch.stack([pool[torch.randperm(len(pool), generator=g)] for g in gens])
        for start in range(0, len(pool), config.batch_size):
            idx = order[:, start:start + config.batch_size]
            params = [sample_params(config.dsa, idx.shape[1], dataset.channels, dataset.im_size, g) for g in gens]
            trainer.step(augment(dataset.train_images[idx], params), dataset.train_labels[idx])
        snapshots.append(trainer.flat())
    return torch.stack(snapshots, 1)


@pytest.mark.parametrize("ids", [[1], [0, 1, 2]])
def test_without_the_curriculum_the_data_order_is_unchanged(digits, ids):
    trajectories, _ = train_group(digits, TINY, ids, CPU)
    assert torch.equal(trajectories, plain_loop(digits, TINY, ids))


def test_with_the_curriculum_experts_see_a_permutation_of_the_admitted_images(digits):
    config = replace(TINY, epochs=3, easy_to_hard=0.5, easy_to_hard_epochs=2)
    scores = torch.rand(len(digits.train_images), generator=torch.Generator().manual_seed(3))
    trajectories, _ = train_group(digits, config, [0, 1], CPU, scores=scores)
    expected = plain_loop(digits, config, [0, 1], lambda e: admitted_images(scores, digits.train_labels, config, e))
    assert torch.equal(trajectories, expected)
    assert len(admitted_images(scores, digits.train_labels, config, 0)) == 100  # half of each class of 20


def test_el2n_scores_are_finite_deterministic_and_higher_on_mislabeled_images(digits):
    wrong = torch.arange(0, len(digits.train_labels), 10)  # 20 of 200 images get the next class's label
    labels = digits.train_labels.clone()
    labels[wrong] = (labels[wrong] + 1) % digits.num_classes
    noisy = replace(digits, train_labels=labels, _class_indices=None)
    config = replace(TINY, lr=0.1, batch_size=32)  # a few epochs are enough to fit the clean labels a little
    scores = el2n_scores(noisy, config, "cpu", networks=2, epochs=10)
    assert scores.shape == (len(labels),) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(scores, el2n_scores(noisy, config, "cpu", networks=2, epochs=10))
    mislabeled = torch.zeros(len(labels), dtype=torch.bool)
    mislabeled[wrong] = True
    assert scores[mislabeled].mean() > scores[~mislabeled].mean() + 0.03
    assert not torch.equal(scores, el2n_scores(noisy, replace(config, seed=1), "cpu", networks=2, epochs=10))


def test_train_experts_with_the_curriculum_caches_the_scores_and_resumes(digits, tmp_path):
    config = replace(TINY, num_experts=2, parallel=2, easy_to_hard=0.5, easy_to_hard_epochs=2, drop_easy=((2, 0.1),))
    train_experts(digits, config, tmp_path, device="cpu", progress=False)
    cache = tmp_path / SCORES_FILE
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["easy_to_hard"] == 0.5 and recorded["el2n"]["file"] == str(SCORES_FILE)
    assert ExpertConfig(**{k: recorded[k] for k in ("easy_to_hard", "drop_easy")}).drop_easy == config.drop_easy
    scores = load_safetensors(cache)["el2n"]
    assert torch.equal(scores, el2n_scores(digits, config, "cpu"))  # the defaults train_experts uses
    mtime = cache.stat().st_mtime_ns

    # One more expert: the cached scores are reused, and it is the expert a fresh group would give.
    more = train_experts(digits, replace(config, num_experts=3), tmp_path, device="cpu", progress=False)
    assert more["trained"] == 1 and cache.stat().st_mtime_ns == mtime
    alone, _ = train_group(digits, config, [2], CPU, scores=scores)
    assert torch.equal(ExpertBuffers.open(tmp_path).trajectory(2), alone[0])

    # Experts of other training are not mixed with these: config.json says how these were trained ...
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 there vs 1 now"):
        train_experts(digits, replace(config, num_experts=4, seed=1), tmp_path, device="cpu", progress=False)
    # ... and, before any expert is finished (the first group killed), the cached scores say what they came from.
    for shard in tmp_path.glob("experts_*.safetensors"):
        shard.unlink()
    with pytest.raises(ValueError, match="EL2N scores of other training.*seed"):
        train_experts(digits, replace(config, num_experts=4, seed=1), tmp_path, device="cpu", progress=False)


# ----------------------------------------------------------------------------- command line

@pytest.mark.parametrize("flags, names", [
    (["--sam-rho", "-1"], "--sam-rho"),
    (["--gsam-alpha", "-0.3", "--sam-rho", "0.01"], "--gsam-alpha"),
    (["--gsam-alpha", "0.3"], "sam_rho"),
    (["--easy-to-hard", "1.5"], "easy_to_hard"),
    (["--easy-to-hard", "0.5", "--easy-to-hard-epochs", "0"], "--easy-to-hard-epochs"),
    (["--drop-easy", "40"], "--drop-easy"),
    (["--drop-easy", "40:1.0"], "--drop-easy"),
    (["--drop-easy", "60:0.1", "40:0.2"], "drop_easy"),
])
def test_bad_successor_flags_are_one_error_line(tmp_path, flags, names):
    result = subprocess.run([sys.executable, "-m", "mtt", "experts", "--dataset", "digits", "--out", "x",
                             "--device", "cpu", *flags], cwd=tmp_path, capture_output=True, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert names in errors[0]
    assert not (tmp_path / "x").exists()  # nothing was started
