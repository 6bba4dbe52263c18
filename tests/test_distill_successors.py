"""The successors' options in the distillation loop (DATM, FTD, TESLA labels) and the --method recipes,
each against an independent computation, on digits with real (tiny) experts."""
import json
import os
import subprocess
import sys

import numpy
import pytest
import torch
from safetensors import safe_open
from torch.nn.utils import vector_to_parameters

from mtt.buffers import ExpertBuffers
from mtt.data import load_dataset
from mtt.distill import DistillConfig, distill, initial_state, preset, start_epoch_range
from mtt.experts import ExpertConfig, train_experts
from mtt.initialise import correctly_classified_images, experts_label_logits, teacher_logits
from mtt.networks import get_network
from mtt.recipes import METHODS, apply_recipe, expert_note
from mtt.synthetic import SyntheticSet
from mtt.unroll import StepPlan, Student, plan_steps, unroll

WIDTH = 16


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def experts(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    train_experts(digits, ExpertConfig(num_experts=3, epochs=8, width=WIDTH, lr=0.05), out, device="cpu",
                  progress=False)  # 56-86 % accurate, every class above 0: DATM reads them
    return ExpertBuffers.open(out)


def small_config(**overrides):
    settings = dict(dataset="digits", ipc=2, width=WIDTH, syn_steps=4, expert_epochs=1, max_start_epoch=3,
                    lr_img=10, lr_lr=1e-5, iterations=4, eval_repeats=0, checkpoint_every=2, snapshot_every=1,
                    device="cpu", seed=5, backward="checkpointed")
    return DistillConfig(**(settings | overrides))


def network_at(digits, theta):
    """An independent forward: a plain nn.Module with theta written into its parameters."""
    net = get_network("ConvNet", digits.channels, digits.num_classes, digits.im_size, WIDTH, 3).double()
    vector_to_parameters(theta.double(), net.parameters())
    return net


def student(digits):
    return Student(get_network("ConvNet", digits.channels, digits.num_classes, digits.im_size, WIDTH, 3))


# ----------------------------------------------------------------------------- DATM

def test_datm_window_values_at_given_iterations():
    # DATM's CIFAR-10 IPC 10 window: [0, upper), upper 10 -> 20 by iteration 1000 (int() as theirs).
    config = small_config(min_start_epoch=0, current_max_start_epoch=10, max_start_epoch=20, expansion_end=1000)
    expected = {0: 10, 1: 10, 99: 10, 100: 11, 550: 15, 999: 19, 1000: 20, 5000: 20}
    assert {it: start_epoch_range(config, it) for it in expected} == {it: (0, u) for it, u in expected.items()}
    fixed = small_config(min_start_epoch=20, max_start_epoch=70)  # CIFAR-100 IPC 50: [20, 70) throughout
    assert start_epoch_range(fixed, 0) == start_epoch_range(fixed, 10**6) == (20, 70)
    assert start_epoch_range(small_config(), 7) == (0, 3)  # MTT


def test_a_skipped_update_leaves_everything_untouched(digits, experts, tmp_path):
    config = small_config(soft_labels=True, ema_decay=0.5, loss_threshold=1e-9, iterations=3, checkpoint_every=1)
    start = initial_state(config, digits, torch.device("cpu"))
    states = []
    distill(config, digits, experts, tmp_path, progress=False, callbacks=[lambda info: states.append(info.state)])
    last = states[-1]
    assert torch.equal(last.images, start.images) and torch.equal(last.syn_lr, start.syn_lr)
    assert torch.equal(last.label_logits, start.label_logits) and torch.equal(last.ema_images, start.images)
    assert all(torch.equal(m, torch.zeros_like(m)) for m in last.momenta.values())
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["skipped"] == [0, 1, 2] and all(loss > 1e-9 for loss in history["loss"])


def test_correctly_classified_initialisation(digits, experts):
    chosen = correctly_classified_images(digits, 3, student(digits), experts, torch.Generator().manual_seed(0),
                                         torch.device("cpu"))
    assert chosen.shape == (30, 1, 8, 8)
    finals = [network_at(digits, experts.snapshot(e, -1)) for e in range(len(experts))]
    for i, image in enumerate(chosen):
        c = i // 3
        assert (digits.train_images[digits.class_indices(c)] == image).flatten(1).all(1).any()  # real, its class
        assert any(net(image[None].double()).argmax().item() == c for net in finals)  # some expert gets it right
    assert len({tuple(x.flatten().tolist()) for x in chosen}) == 30  # distinct


def test_soft_label_init_is_the_mean_logits_of_exactly_the_correct_experts(digits, experts):
    images = digits.train_images[:40]
    labels = digits.train_labels[:40]
    got = experts_label_logits(student(digits), experts, images, labels)
    finals = [network_at(digits, experts.snapshot(e, -1)) for e in range(len(experts))]
    some_wrong = 0
    for n in range(len(images)):
        with torch.no_grad():
            logits = [net(images[n:n + 1].double())[0] for net in finals]
        right = [z for z in logits if z.argmax().item() == labels[n].item()]
        some_wrong += len(right) < len(logits)
        expected = torch.stack(right).mean(0) if right else torch.stack(logits).mean(0)
        torch.testing.assert_close(got[n].double(), expected, atol=1e-4, rtol=1e-4)
    assert some_wrong > 0  # the case that matters (only the correct experts count) was exercised


def test_first_expert_labels_are_its_final_logits_on_images_drawn_at_random(digits, experts):
    """DATM's CIFAR-100 IPC 50 config starts from random real images labelled by one expert (buffer[0][-1])."""
    config = small_config(init="real", soft_labels=True, label_init="first-expert")
    state = initial_state(config, digits, torch.device("cpu"), student(digits), experts)
    real = initial_state(small_config(init="real"), digits, torch.device("cpu"))
    assert torch.equal(state.images, real.images)  # the images of init="real", not of "correct"
    with torch.no_grad():
        expected = network_at(digits, experts.snapshot(0, -1))(state.images.double())
    torch.testing.assert_close(state.label_logits.double(), expected, atol=1e-4, rtol=1e-4)
    assert preset("cifar100", 50, method="datm").label_init == "first-expert"
    assert preset("cifar100", 50, method="datm").init == "real"
    with pytest.raises(ValueError, match="read the experts: pass student and buffers"):
        initial_state(config, digits, torch.device("cpu"))


def test_datm_run_starts_from_its_initialisation_and_learns_labels(digits, experts, tmp_path):
    config = small_config(init="correct", soft_labels=True, label_init="experts", label_momentum=0.9, lr_labels=2.0)
    initial = initial_state(config, digits, torch.device("cpu"), student(digits), experts)
    torch.testing.assert_close(initial.label_logits,
                               experts_label_logits(student(digits), experts, initial.images, initial.labels))
    synthetic = distill(config, digits, experts, tmp_path, progress=False)
    assert not torch.equal(synthetic.label_logits, initial.label_logits)  # learned


def test_label_momentum_is_used(digits, experts, tmp_path):
    config = small_config(soft_labels=True, label_momentum=0.9, iterations=2, lr_labels=1.0)
    seen = []
    distill(config, digits, experts, tmp_path, progress=False, callbacks=[lambda info: seen.append(
        (info.state.label_logits.clone(), info.state.momenta["label_logits"].clone()))])
    (first, m1), (second, m2) = seen
    start = initial_state(config, digits, torch.device("cpu")).label_logits
    torch.testing.assert_close(first, start - m1)  # momentum_1 = g_1, lr 1
    torch.testing.assert_close(second, first - m2)  # momentum_2 = 0.9 g_1 + g_2
    config_05 = small_config(soft_labels=True, label_momentum=0.5, iterations=2, lr_labels=1.0)
    seen_05 = []
    distill(config_05, digits, experts, tmp_path / "half", progress=False, callbacks=[lambda info: seen_05.append(
        info.state.momenta["label_logits"].clone())])
    # Same draws, same first step: g_2 recovered from both runs agrees only with the momentum each used.
    torch.testing.assert_close(seen_05[0], m1)
    torch.testing.assert_close(m2 - 0.9 * m1, seen_05[1] - 0.5 * m1, atol=1e-3, rtol=1e-2)


# ----------------------------------------------------------------------------- FTD

def test_ema_update_and_what_is_evaluated_and_saved(digits, experts, tmp_path):
    decay = 0.8
    config = small_config(ema_decay=decay, iterations=3)
    images = [initial_state(config, digits, torch.device("cpu")).images]
    evaluated = []

    def evaluator(state):
        evaluated.append(state.result()[0].clone())
        return {"mean": 0.0, "std": 0.0, "runs": []}

    distill(config, digits, experts, tmp_path, progress=False, evaluator=evaluator,
            callbacks=[lambda info: images.append(info.state.images.clone())])
    ema = images[0]
    for x in images[1:]:
        ema = decay * ema + (1 - decay) * x
    saved = SyntheticSet.load(tmp_path / "synthetic.safetensors")
    torch.testing.assert_close(saved.images, ema)
    torch.testing.assert_close(evaluated[-1], ema)
    assert not torch.allclose(saved.images, images[-1])  # the EMA, not the raw images


# ----------------------------------------------------------------------------- TESLA labels

def test_teacher_logits_are_the_target_networks_logits(digits, experts):
    thetas = torch.stack([experts.snapshot(e, 3) for e in range(2)])
    images = digits.train_images[:7]
    got = teacher_logits(student(digits), thetas, images)
    for k in range(2):
        with torch.no_grad():
            expected = network_at(digits, thetas[k])(images.double())
        torch.testing.assert_close(got[k].double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["full", "checkpointed"])
def test_per_segment_soft_targets_equal_separate_unrolls(digits, experts, mode):
    torch.manual_seed(0)
    net = get_network("ConvNet", 1, 10, (8, 8), 8, 1).double()
    s = Student(net)
    p = s.num_params
    images = torch.randn(20, 1, 8, 8, dtype=torch.float64)
    starts, targets = torch.randn(2, p, dtype=torch.float64) * 0.1, torch.randn(2, p, dtype=torch.float64) * 0.1
    soft = torch.randn(2, 20, 10, dtype=torch.float64)
    lr = torch.tensor(0.01, dtype=torch.float64)
    plans = plan_steps(20, 3, 5, (1, 8, 8), "none", torch.Generator().manual_seed(1), torch.device("cpu"), 2)
    together = unroll(s, starts, targets, images, lr, plans, labels=soft, mode=mode)
    one = [[StepPlan(pl.select(slice(k, k + 1)).indices[0], pl.select(slice(k, k + 1)).augment) for pl in plans]
           for k in range(2)]  # segment k's plans, as a one-segment unroll takes them
    separate = [unroll(s, starts[k], targets[k], images, lr, one[k], labels=soft[k], mode=mode) for k in range(2)]
    assert together.loss == pytest.approx(sum(r.loss for r in separate) / 2, rel=1e-9)
    torch.testing.assert_close(together.grad_images, sum(r.grad_images for r in separate) / 2, atol=1e-10, rtol=1e-8)


def test_teacher_labels_run_and_are_saved(digits, experts, tmp_path):
    config = small_config(teacher_labels=True, backward="tesla")
    synthetic = distill(config, digits, experts, tmp_path, progress=False)
    assert synthetic.label_logits is not None and synthetic.label_logits.shape == (20, 10)


# ----------------------------------------------------------------------------- resume, recipes

def test_resume_is_exact_with_every_new_state(digits, experts, tmp_path):
    options = dict(init="correct", soft_labels=True, label_init="experts", label_momentum=0.9, ema_decay=0.7,
                   current_max_start_epoch=1, expansion_end=3, loss_threshold=1.0, segments=2)
    straight = distill(small_config(iterations=6, **options), digits, experts, tmp_path / "a", progress=False)
    distill(small_config(iterations=3, **options), digits, experts, tmp_path / "b", progress=False)
    resumed = distill(small_config(iterations=6, **options), digits, experts, tmp_path / "b", resume=True,
                      progress=False)
    assert torch.equal(straight.images, resumed.images) and torch.equal(straight.label_logits, resumed.label_logits)
    with safe_open(str(tmp_path / "a" / "checkpoint.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "b" / "checkpoint.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and "ema_images" in set(a.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    ha, hb = (json.loads((tmp_path / d / "history.json").read_text()) for d in "ab")
    assert ha["loss"] == hb["loss"] and ha.get("skipped") == hb.get("skipped")


def test_teacher_labels_resume_exactly(digits, experts, tmp_path):
    options = dict(teacher_labels=True, backward="tesla")
    straight = distill(small_config(iterations=4, **options), digits, experts, tmp_path / "a", progress=False)
    distill(small_config(iterations=2, **options), digits, experts, tmp_path / "b", progress=False)
    resumed = distill(small_config(iterations=4, **options), digits, experts, tmp_path / "b", resume=True,
                      progress=False)
    assert torch.equal(straight.images, resumed.images) and torch.equal(straight.label_logits, resumed.label_logits)


def test_datm_recipe_is_the_authors_table():
    c = preset("cifar10", 10, method="datm")
    assert (c.syn_steps, c.expert_epochs, c.min_start_epoch, c.current_max_start_epoch, c.max_start_epoch,
            c.expansion_end) == (80, 2, 0, 10, 20, 1000)
    assert (c.lr_img, c.lr_lr, c.lr_labels, c.batch_syn, c.loss_threshold) == (100, 1e-5, 2, 100, 1.0)
    assert (c.init, c.soft_labels, c.label_init, c.label_momentum, c.iterations, c.zca) == \
        ("correct", True, "experts", 0.9, 10000, True)
    one = preset("cifar10", 1, method="datm")
    assert (one.max_start_epoch, one.current_max_start_epoch, one.loss_threshold, one.lr_lr, one.lr_labels,
            one.batch_syn) == (4, None, 1.1, 1e-7, 5, 10)
    c100 = preset("cifar100", 50, method="datm")
    assert (c100.min_start_epoch, c100.max_start_epoch, c100.current_max_start_epoch) == (20, 70, None)


def test_every_recipe_is_a_valid_config_and_overrides_win():
    for dataset, ipc in [("cifar10", 1), ("cifar10", 10), ("cifar10", 50), ("cifar100", 1), ("cifar100", 10),
                         ("cifar100", 50), ("digits", 1), ("digits", 10), ("fashion-mnist", 1),
                         ("fashion-mnist", 10)]:
        for method in METHODS:
            config = preset(dataset, ipc, method=method)
            config.validate()
            assert config.method == method
    assert preset("cifar10", 10, method="ftd").ema_decay == 0.9995
    ftd = preset("cifar100", 10, method="ftd")  # FTD's README command
    assert (ftd.ema_decay, ftd.max_start_epoch, ftd.zca, ftd.syn_steps) == (0.9995, 40, True, 20)
    assert preset("digits", 1, method="ftd", iterations=1000).ema_decay == pytest.approx(0.99)
    assert preset("digits", 1, method="ftd", iterations=5).ema_decay == 0.5  # a short run keeps its EMA
    assert preset("digits", numpy.int64(1)) == preset("digits", 1)
    assert preset("cifar10", 1, method="tesla").backward == "tesla"
    att = preset("cifar10", 1, method="att")  # ATT's README's command
    assert (att.match, att.syn_steps, att.expert_epochs, att.max_start_epoch, att.lr_img, att.lr_lr, att.lr_teacher,
            att.zca, att.ema_decay, att.iterations) == ("closest", 80, 4, 2, 100, 1e-7, 0.01, True, 0.9999, 6000)
    att = preset("cifar100", 50, method="att")
    assert (att.batch_syn, att.syn_steps, att.ema_decay, att.zca) == (1200, 80, 0.999, True)
    assert preset("tiny-imagenet", 10, method="att").batch_syn is None  # the whole set per step, as ATT's
    assert preset("digits", 1, method="att", iterations=1000).ema_decay == pytest.approx(0.99)  # FTD's, scaled
    assert preset("cifar10", 10, method="pad").pad_fraction == 0.5
    # PAD's configs' depth_ratio: CIFAR-100 has its own, other datasets follow CIFAR-10's by IPC.
    assert [preset("cifar100", ipc, method="pad").pad_fraction for ipc in (1, 10, 50)] == [0.5, 0.5, 0.0]
    assert [preset("digits", ipc, method="pad").pad_fraction for ipc in (1, 10)] == [0.0, 0.5]
    assert preset("cifar10", 10, method="datm", lr_labels=7.0).lr_labels == 7.0
    assert preset("cifar10", 10) == preset("cifar10", 10, method="mtt")
    with pytest.raises(ValueError, match="unknown method"):
        apply_recipe(preset("cifar10", 10), "dream")


@pytest.mark.parametrize("bad, match", [
    (dict(min_start_epoch=3), "min_start_epoch"), (dict(current_max_start_epoch=5), "current_max_start_epoch"),
    (dict(loss_threshold=0.0), "loss_threshold"), (dict(label_init="experts"), "--soft-labels"),
    (dict(teacher_labels=True, soft_labels=True), "exclude"), (dict(ema_decay=1.0), "ema_decay"),
    (dict(label_momentum=-0.1), "label_momentum"), (dict(init="best"), "init"), (dict(method="dream"), "method"),
])
def test_bad_successor_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        small_config(**bad).validate()


def test_cli_method_recorded_in_config_and_synthetic_set(experts, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "mtt", "distill", "--dataset", "digits", "--ipc", "1", "--buffers",
         str(experts.source), "--out", str(out), "--method", "datm", "--iterations", "2", "--eval-repeats", "0",
         "--syn-steps", "3", "--max-start-epoch", "2", "--expert-epochs", "1", "--backward", "checkpointed",
         "--lr-labels", "3", "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "datm" and config["init"] == "correct" and config["lr_labels"] == 3.0
    saved = SyntheticSet.load(out / "synthetic.safetensors")
    assert saved.config["method"] == "datm" and saved.label_logits is not None
    assert "note (datm)" in result.stderr


def test_the_note_on_a_recipes_experts_is_for_experts_that_lack_it(experts):
    plain = experts.training()
    assert plain["sam_rho"] == 0 and plain["epochs"] == experts.meta.epochs  # the folder's config.json
    assert expert_note("ftd", plain).startswith("FTD's experts are trained with GSAM")
    gsam = plain | {"sam_rho": 0.01, "gsam_alpha": 0.3}  # DATM's and PAD's experts are FTD's GSAM ones too
    assert expert_note("ftd", gsam) is None and expert_note("ftd", plain | {"sam_rho": 0.01})  # SAM is not GSAM
    assert expert_note("ftd", plain | {"sam_rho": None})  # a hand-edited record
    assert expert_note("pad", gsam | {"drop_easy": [[40, 0.1]], "epochs": 100}) is None and expert_note("pad", gsam)
    assert expert_note("pad", gsam | {"drop_easy": [[40, 0.1]]})  # 100 epochs, as PAD's
    assert expert_note("pad", plain | {"drop_easy": [[40, 0.1]]})
    assert expert_note("datm", gsam | {"epochs": 100}) is None and expert_note("datm", gsam)
    assert expert_note("datm", {})  # {}: unrecorded
    assert expert_note("mtt", {}) is None
    assert "--batch-size 512" in expert_note("att", plain) and expert_note("att", plain | {"batch_size": 512}) is None


def test_cli_rejects_bad_successor_flags(experts, tmp_path):
    for flag, value in [("--ema-decay", "1.5"), ("--method", "dream"), ("--label-momentum", "1")]:
        result = subprocess.run([sys.executable, "-m", "mtt", "distill", "--dataset", "digits", "--ipc", "1",
                                 "--buffers", str(experts.source), "--out", str(tmp_path), flag, value],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.count("error:") == 1 and flag in result.stderr
        assert "Traceback" not in result.stderr


def test_nearly_uniform_teacher_labels_are_warned_about():
    from mtt.distill import _check_teacher

    said = []
    _check_teacher(torch.zeros(10, 10) + 0.01 * torch.randn(10, 10), said.append)  # top probability ~0.1
    assert len(said) == 1 and "teacher labels are nearly uniform (mean top probability 0.1" in said[0]
    _check_teacher(5 * torch.eye(10), said.append)  # top probability 0.94
    assert len(said) == 1
