"""The distillation loop on digits with real (tiny) experts: outputs, resume, guards, presets, CLI."""
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mtt.distill
from mtt.buffers import ExpertBuffers, write_index, write_shard
from mtt.data import load_dataset
from mtt.distill import (BEST_SYNTHETIC, DistillationDiverged, DistillConfig, EvaluationFailed, OutOfMemory,
                         best_evaluation, check_distilled_from, distill, load_snapshots, preset, stored_config,
                         stored_set)
from mtt.experts import ExpertConfig, train_experts
from mtt.interrupt import Interrupted
from mtt.synthetic import SyntheticSet
from mtt.unroll import BackwardChoice

WIDTH = 16


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def experts(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    train_experts(digits, ExpertConfig(num_experts=2, epochs=4, width=WIDTH), out, device="cpu", progress=False)
    return out


def small_config(**overrides):
    settings = dict(dataset="digits", ipc=1, width=WIDTH, syn_steps=5, expert_epochs=2, max_start_epoch=2,
                    lr_img=10, lr_lr=1e-5, iterations=6, eval_repeats=0, checkpoint_every=3, snapshot_every=2,
                    device="cpu", seed=3, backward="checkpointed")  # not auto: runs compared must use one mode
    return DistillConfig(**(settings | overrides))


def test_distill_writes_every_output(digits, experts, tmp_path):
    buffers = ExpertBuffers.open(experts)
    config = small_config(batch_syn=4)
    synthetic = distill(config, digits, buffers, tmp_path, progress=False)

    loaded = SyntheticSet.load(tmp_path / "synthetic.safetensors")
    assert loaded.images.shape == (10, 1, 8, 8) and loaded.labels.tolist() == list(range(10))
    assert torch.equal(loaded.images, synthetic.images) and loaded.syn_lr == synthetic.syn_lr
    assert loaded.config["syn_steps"] == 5 and loaded.dataset == "digits"
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["loss"]) == len(history["syn_lr"]) == 6
    assert all(0 < loss < 10 for loss in history["loss"])
    snapshots = load_snapshots(tmp_path)
    assert [it for it, _ in snapshots] == [0, 2, 4, 6]
    assert not torch.equal(snapshots[0][1], snapshots[-1][1])  # the images moved
    assert synthetic.syn_lr != 0.01  # and so did the step size
    assert not (tmp_path / BEST_SYNTHETIC).exists()  # nothing evaluated, nothing to choose from
    # The version that wrote them, should the space images live in change again (it did in 0.2).
    assert json.loads((tmp_path / "config.json").read_text())["mtt_version"] == mtt.__version__
    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["mtt_version"] == mtt.__version__


def test_a_run_of_mtt_0_1_in_a_space_that_changed_is_refused(tmp_path):
    """mtt 0.1 whitened normalised images (0.2: pixels, as the original code): its ZCA runs cannot be resumed,
    evaluated or drawn as if their images were in today's space. Its other runs can."""
    for zca, refused in [(True, True), (False, False)]:
        run = tmp_path / str(zca)
        config = replace(small_config(), zca=zca)
        metadata = {"config": json.dumps(asdict(config)), "iteration": "2"}
        (run / "snapshots").mkdir(parents=True)
        save_file({"var.images": torch.zeros(10, 1, 8, 8)}, run / "checkpoint.safetensors", metadata)
        (run / "config.json").write_text(metadata["config"])  # 0.1 recorded no version
        for path in [run / "checkpoint.safetensors", run / "snapshots" / "iter_000000.safetensors"]:
            if refused:
                with pytest.raises(ValueError, match=f"the run in {run}: written by mtt < 0.2, whose ZCA-whitened "
                                                     "digits images lived in another space"):
                    stored_config(path)
            else:
                assert stored_config(path).zca is False


def test_the_best_evaluated_set_is_kept_and_resume_goes_on_choosing(digits, experts, tmp_path, capsys):
    buffers = ExpertBuffers.open(experts)
    scores = {0: 50.0, 2: 70.0, 4: 60.0, 6: 70.0, 8: 80.0}  # iteration 6 ties 2: the first stays

    def evaluator(state):
        return {"mean": scores[state.iteration], "std": 0.0, "runs": [scores[state.iteration]]}

    def kept():
        return SyntheticSet.load(tmp_path / BEST_SYNTHETIC)

    distill(small_config(eval_every=2), digits, buffers, tmp_path, progress=False, evaluator=evaluator)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [e["iteration"] for e in history["evals"]] == [0, 2, 4, 6]
    assert best_evaluation(history)["iteration"] == 2
    snapshot = dict(load_snapshots(tmp_path))[2]
    assert torch.equal(kept().images, snapshot) and kept().dataset == "digits"
    assert kept().syn_lr == pytest.approx(history["syn_lr"][1])  # the step size it was evaluated with
    assert not torch.equal(kept().images, SyntheticSet.load(tmp_path / "synthetic.safetensors").images)
    said = capsys.readouterr().err.splitlines()  # a line per evaluation, the final one's too
    # One network each: no spread to show.
    assert said == ["evaluation at iteration 0: 50.00 % (best so far, saved as synthetic_best.safetensors)",
                    "evaluation at iteration 2: 70.00 % (best so far, saved as synthetic_best.safetensors)",
                    "evaluation at iteration 4: 60.00 % (best 70.00 % at iteration 2)",
                    "evaluation at iteration 6: 70.00 % (best 70.00 % at iteration 2)"]

    final = distill(small_config(eval_every=2, iterations=8), digits, buffers, tmp_path, resume=True,
                    progress=False, evaluator=evaluator)
    assert torch.equal(kept().images, final.images) and kept().syn_lr == final.syn_lr
    assert best_evaluation(json.loads((tmp_path / "history.json").read_text()))["iteration"] == 8


def test_images_start_from_real_images_of_each_class(digits, experts, tmp_path):
    config = small_config(iterations=1, snapshot_every=1)
    distill(config, digits, ExpertBuffers.open(experts), tmp_path, progress=False)
    start = load_snapshots(tmp_path)[0][1]
    for c, image in enumerate(start):
        assert (digits.train_images[digits.class_indices(c)] == image).flatten(1).all(1).any()


def test_resume_equals_a_straight_run(digits, experts, tmp_path):
    buffers = ExpertBuffers.open(experts)
    straight = distill(small_config(iterations=6), digits, buffers, tmp_path / "straight", progress=False)
    distill(small_config(iterations=3), digits, buffers, tmp_path / "split", progress=False)
    resumed = distill(small_config(iterations=6), digits, buffers, tmp_path / "split", resume=True, progress=False)
    assert torch.equal(straight.images, resumed.images)
    assert straight.syn_lr == resumed.syn_lr
    a, b = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("straight", "split"))
    assert a["loss"] == b["loss"]


def test_existing_run_needs_resume_and_the_same_kind_of_run(digits, experts, tmp_path):
    buffers = ExpertBuffers.open(experts)
    distill(small_config(iterations=3), digits, buffers, tmp_path, progress=False)
    with pytest.raises(ValueError, match="add --resume"):
        distill(small_config(iterations=3), digits, buffers, tmp_path, progress=False)
    with pytest.raises(ValueError, match="--ipc: checkpoint 1 vs now 2"):
        distill(small_config(iterations=6, ipc=2), digits, buffers, tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("options", [{}, {"soft_labels": True, "ema_decay": 0.5, "ipc": 2}])
def test_a_runs_checkpoint_and_snapshots_hold_the_set_it_would_have_saved(digits, experts, tmp_path, options):
    """What `evaluate` reads from a stopped run: at the run's end the checkpoint and the last snapshot give exactly
    synthetic.safetensors (soft labels and FTD's EMA included), and the first snapshot the starting images."""
    buffers = ExpertBuffers.open(experts)
    final = distill(small_config(iterations=4, **options), digits, buffers, tmp_path, progress=False)
    for stored, iteration in [(tmp_path / "checkpoint.safetensors", 4),
                              (tmp_path / "snapshots" / "iter_000004.safetensors", 4)]:
        config = stored_config(stored)
        assert config == small_config(iterations=4, **options)
        synthetic, at = stored_set(stored, config, digits)
        assert at == iteration and synthetic.syn_lr == final.syn_lr and synthetic.config == final.config
        assert torch.equal(synthetic.images, final.images) and torch.equal(synthetic.labels, final.labels)
        assert (synthetic.label_logits is None) == (final.label_logits is None)
        if final.label_logits is not None:
            assert torch.equal(synthetic.label_logits, final.label_logits)
    assert torch.equal(load_snapshots(tmp_path)[-1][1], final.images)  # what the plots show: FTD's EMA too
    first, at = stored_set(tmp_path / "snapshots" / "iter_000000.safetensors", config, digits)
    assert at == 0 and torch.equal(first.images, load_snapshots(tmp_path)[0][1]) and first.syn_lr == pytest.approx(0.01)


def test_learning_rates_and_unroll_may_change_on_resume_and_the_change_is_recorded(digits, experts, tmp_path,
                                                                                      capsys):
    buffers = ExpertBuffers.open(experts)
    distill(small_config(iterations=3), digits, buffers, tmp_path, progress=False)
    distill(small_config(iterations=5, lr_img=5, syn_steps=4), digits, buffers, tmp_path, resume=True,
            progress=False)
    assert ("resuming at iteration 3 with settings other than the checkpoint's: syn_steps 5 -> 4, lr_img 10 -> 5, "
            "iterations 3 -> 5\n" in capsys.readouterr().err)
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["changes"] == [{"iteration": 3, "changed": {"lr_img": [10, 5], "syn_steps": [5, 4],
                                                                "iterations": [3, 5]}}]
    assert len(history["loss"]) == 5
    assert json.loads((tmp_path / "config.json").read_text())["lr_img"] == 5
    with pytest.raises(ValueError, match="holds a run of 5 iterations, more than --iterations 4: raise --iterations"):
        distill(small_config(iterations=4), digits, buffers, tmp_path, resume=True, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["iterations"] == 5


def test_experts_with_non_finite_parameters_are_blamed_not_the_settings(digits, experts, tmp_path):
    buffers = ExpertBuffers.open(experts)
    damaged = torch.stack([buffers.trajectory(0)])
    damaged[0, 1:-1, :5] = float("nan")  # damaged in the middle: its last epoch is finite, so it is found when drawn
    write_shard(tmp_path / "bad" / "experts_00000-00000.safetensors", damaged, buffers.meta, [0])
    write_index(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"the experts' parameters are not finite \(experts \[0\], start epochs "
                                         r"\[\d\]\): expert 0 in .*bad/experts_00000-00000.safetensors diverged or "
                                         r"is damaged"):
        distill(small_config(), digits, ExpertBuffers.open(tmp_path / "bad"), tmp_path / "run", progress=False)


def test_diverged_experts_are_left_out_before_the_run(digits, experts, tmp_path, capsys):
    """An expert whose last epoch is not finite (its training diverged: the original's files or a download may hold
    one) would stop the run when drawn, hours in: it is left out at the start, with a warning naming it, and the run
    (and its resume) is the run from the other experts alone."""
    buffers = ExpertBuffers.open(experts)
    trajectories = torch.stack([buffers.trajectory(0), buffers.trajectory(1)])
    trajectories[1, 2:, :5] = float("nan")  # diverged in epoch 2
    write_shard(tmp_path / "mixed" / "experts_00000-00001.safetensors", trajectories, buffers.meta, [0, 1])
    write_index(tmp_path / "mixed")
    mixed = ExpertBuffers.open(tmp_path / "mixed")
    assert mixed.diverged() == [1] and mixed.without([1]).expert_ids == [0]
    run = distill(small_config(iterations=3), digits, mixed, tmp_path / "run", progress=False)
    assert re.search(r"warning: 1 of the 2 experts diverged \(their last epoch's parameters are not finite\): "
                     r"expert 1 in .*mixed/experts_00000-00001.safetensors; distilling from the other 1",
                     capsys.readouterr().err)
    alone = distill(small_config(iterations=3), digits, buffers.first(1), tmp_path / "alone", progress=False)
    assert torch.equal(run.images, alone.images)  # expert 0 drawn every time, as from it alone
    resumed = distill(small_config(iterations=4), digits, mixed, tmp_path / "run", resume=True, progress=False)
    assert torch.isfinite(resumed.images).all()
    check_distilled_from(tmp_path / "run", mixed)  # the figures' check: these are the experts it drew from
    assert mixed.without_diverged().expert_ids == [0]

    trajectories[0, -1, 0] = float("inf")
    write_shard(tmp_path / "mixed" / "experts_00000-00001.safetensors", trajectories, buffers.meta, [0, 1])
    with pytest.raises(ValueError, match=r"every expert in .*mixed diverged .*train them again with a lower --lr"):
        distill(small_config(), digits, ExpertBuffers.open(tmp_path / "mixed"), tmp_path / "none", progress=False)


def test_a_diverged_run_continues_with_the_advice_it_gives(digits, experts, tmp_path):
    buffers = ExpertBuffers.open(experts)
    with pytest.raises(DistillationDiverged, match=r"--resume and a smaller --lr-img .* or --lr-lr \(now 1000\)") as err:
        distill(small_config(lr_lr=1e3, iterations=20), digits, buffers, tmp_path, progress=False)
    assert f"saved in {tmp_path / 'checkpoint.safetensors'}" in str(err.value)
    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as f:  # the last good state
        syn_lr, images = f.get_tensor("var.syn_lr"), f.get_tensor("var.images")
    assert syn_lr > 0 and torch.isfinite(images).all()
    stopped_at = int(str(err.value).split("iteration ")[1].split(":")[0])
    synthetic = distill(small_config(lr_lr=1e-5, iterations=stopped_at + 3), digits, buffers, tmp_path, resume=True,
                        progress=False)
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["loss"]) == stopped_at + 3 and synthetic.syn_lr > 0
    assert history["changes"][0]["changed"]["lr_lr"] == [1e3, 1e-5]


def test_resuming_with_other_experts_is_refused(digits, experts, tmp_path):
    distill(small_config(iterations=3), digits, ExpertBuffers.open(experts), tmp_path / "run", progress=False)
    others = tmp_path / "others"
    train_experts(digits, ExpertConfig(num_experts=2, epochs=4, width=WIDTH, seed=7), others, device="cpu",
                  progress=False)
    with pytest.raises(ValueError, match=r"other experts \(2 ConvNet experts on digits, 4 epochs, hash \w+; now "
                                         r"2 ConvNet experts on digits, 4 epochs, hash \w+\)\. Pass the same --buffers"):
        distill(small_config(iterations=6), digits, ExpertBuffers.open(others), tmp_path / "run", resume=True,
                progress=False)


def test_the_best_set_is_the_one_the_history_names_after_an_interrupt(digits, experts, tmp_path, monkeypatch):
    """An interrupt in the iteration after an evaluation drops that evaluation; redone on resume it may score
    otherwise (CUDA is not deterministic): synthetic_best.safetensors holds the set the history names best."""
    scores = iter([50.0, 90.0, 40.0, 45.0, 45.0])  # iterations 0, 2 (dropped by the interrupt), 2 again, 4, 6

    def evaluator(state):
        return {"mean": next(scores), "runs": [0.0]}

    iteration, interrupted = mtt.distill._iteration, []

    def interrupted_once(state, *args):
        if state.iteration == 2 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt  # as Ctrl-C inside the iteration, after its evaluation
        return iteration(state, *args)

    monkeypatch.setattr(mtt.distill, "_iteration", interrupted_once)
    buffers, config = ExpertBuffers.open(experts), small_config(eval_every=2, iterations=6)
    with pytest.raises(Interrupted):
        distill(config, digits, buffers, tmp_path, evaluator=evaluator, progress=False)
    distill(config, digits, buffers, tmp_path, evaluator=evaluator, resume=True, progress=False)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [e["mean"] for e in history["evals"]] == [50.0, 40.0, 45.0, 45.0]
    assert best_evaluation(history)["iteration"] == 0
    assert torch.equal(SyntheticSet.load(tmp_path / BEST_SYNTHETIC).images, dict(load_snapshots(tmp_path))[0])


def test_a_finished_run_extended_is_not_evaluated_twice_where_it_ended(digits, experts, tmp_path):
    evaluated = []

    def evaluator(state):
        evaluated.append(state.iteration)
        return {"mean": 50.0, "runs": [50.0]}

    buffers = ExpertBuffers.open(experts)
    distill(small_config(iterations=4, eval_every=2), digits, buffers, tmp_path, evaluator=evaluator, progress=False)
    distill(small_config(iterations=6, eval_every=2), digits, buffers, tmp_path, evaluator=evaluator, resume=True,
            progress=False)
    assert evaluated == [0, 2, 4, 6]
    assert [e["iteration"] for e in json.loads((tmp_path / "history.json").read_text())["evals"]] == [0, 2, 4, 6]


def test_a_failed_evaluation_saves_the_run_and_says_how_to_go_on(digits, experts, tmp_path):
    def evaluator(state):
        if state.iteration == 4:  # as evaluate() says when the learned step size makes its networks diverge
            raise ValueError("training loss became nan by pass 0 of training with lr 3.2: the learning rate is "
                             "too large for ConvNet")
        return {"mean": 50.0, "runs": [50.0]}

    buffers = ExpertBuffers.open(experts)
    with pytest.raises(EvaluationFailed, match=r"evaluating the set at iteration 4 failed: training loss "
                       r"became nan .*--resume and --eval-repeats 0 .*--lr sets the networks' learning rate"):
        distill(small_config(eval_every=2), digits, buffers, tmp_path / "run", evaluator=evaluator, progress=False)
    with safe_open(str(tmp_path / "run" / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["iteration"] == "4"  # not 3, the last regular checkpoint: nothing is redone
    resumed = distill(small_config(), digits, buffers, tmp_path / "run", resume=True, progress=False)
    straight = distill(small_config(), digits, buffers, tmp_path / "straight", progress=False)
    assert torch.equal(resumed.images, straight.images) and resumed.syn_lr == straight.syn_lr


def test_a_fresh_run_in_a_folder_an_earlier_run_left_without_a_checkpoint(digits, experts, tmp_path, capsys):
    """Its sets and history are results: refused, not overwritten (a checkpoint moved away leaves them). Snapshots
    alone are what a run killed before its first checkpoint leaves: removed, so that the plots show the new run
    alone."""
    buffers = ExpertBuffers.open(experts)
    distill(small_config(iterations=10, snapshot_every=5), digits, buffers, tmp_path, progress=False)
    (tmp_path / "checkpoint.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds an earlier run's synthetic.safetensors and history.json but no "
                                         r"checkpoint.safetensors to resume from: choose another --out"):
        distill(small_config(), digits, buffers, tmp_path, progress=False)
    (tmp_path / "synthetic.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds an earlier run's history.json but no checkpoint"):
        distill(small_config(), digits, buffers, tmp_path, progress=False)
    assert len(load_snapshots(tmp_path)) == 3  # kept while the run's history says they are results
    (tmp_path / "history.json").unlink()
    distill(small_config(), digits, buffers, tmp_path, progress=False)
    assert [it for it, _ in load_snapshots(tmp_path)] == [0, 2, 4, 6]  # not 5 and 10 of the earlier run
    assert f"starting afresh in {tmp_path}: removed the 3 snapshots of an earlier run" in capsys.readouterr().err


def test_resume_into_an_empty_folder_says_it_starts_afresh(digits, experts, tmp_path, capsys):
    distill(small_config(iterations=2), digits, ExpertBuffers.open(experts), tmp_path, resume=True, progress=False)
    assert f"no checkpoint in {tmp_path} yet, starting afresh" in capsys.readouterr().err


def test_a_checkpoint_that_is_not_one_says_how_to_go_on(digits, experts, tmp_path):
    (tmp_path / "checkpoint.safetensors").write_text('{"not": "a checkpoint"}')
    with pytest.raises(ValueError, match="not a checkpoint mtt can read .*to start afresh, choose another --out"):
        distill(small_config(), digits, ExpertBuffers.open(experts), tmp_path, resume=True, progress=False)
    # A safetensors file with a config but not a checkpoint's tensors (a synthetic set copied over it, say).
    distill(small_config(iterations=1), digits, ExpertBuffers.open(experts), tmp_path / "run", progress=False)
    tensors = load_file(tmp_path / "run" / "checkpoint.safetensors")
    with safe_open(str(tmp_path / "run" / "checkpoint.safetensors"), "pt") as f:
        metadata = f.metadata()
    save_file({k: v for k, v in tensors.items() if k != "generator"}, tmp_path / "run" / "checkpoint.safetensors",
              metadata)
    with pytest.raises(ValueError, match="not a checkpoint mtt can read \\(.it holds no .generator..\\)"):
        distill(small_config(), digits, ExpertBuffers.open(experts), tmp_path / "run", resume=True, progress=False)


def test_experts_too_short_for_the_settings(digits, experts, tmp_path):
    with pytest.raises(ValueError, match="match up to epoch 5, beyond the 4 epochs the experts were trained for: "
                                         "pass e.g. --max-start-epoch 3 --expert-epochs 2, or train experts for 5"):
        distill(small_config(max_start_epoch=4, expert_epochs=2), digits, ExpertBuffers.open(experts), tmp_path)
    # What it suggests runs: start epochs 0..2 with targets 2 epochs on, the last the experts' last snapshot, epoch 4.
    distill(small_config(max_start_epoch=3, expert_epochs=2, iterations=1), digits, ExpertBuffers.open(experts),
            tmp_path)


def test_zca_must_match_the_experts(digits, experts, tmp_path):
    with pytest.raises(ValueError, match="zca"):
        distill(small_config(zca=True), digits.with_zca(), ExpertBuffers.open(experts), tmp_path)


def test_soft_labels_are_learned(digits, experts, tmp_path):
    synthetic = distill(small_config(soft_labels=True, iterations=3), digits, ExpertBuffers.open(experts), tmp_path,
                        progress=False)
    assert synthetic.label_logits.shape == (10, 10)
    assert synthetic.label_logits.argmax(1).tolist() == list(range(10))
    start = torch.nn.functional.one_hot(torch.arange(10), 10).float() * synthetic.label_logits.max()
    assert not torch.allclose(synthetic.label_logits, start)


def test_bad_config_values():
    with pytest.raises(ValueError, match="syn_steps must be >= 1"):
        small_config(syn_steps=0).validate()
    with pytest.raises(ValueError, match="backward"):
        small_config(backward="exact").validate()
    # what would fail deep inside torch, or run with a meaning nobody gave it
    for field, value in [("ipc", 2.5), ("syn_steps", 2.5), ("seed", 1.5), ("iterations", True)]:
        with pytest.raises(ValueError, match=f"{field} must be an integer, got {value!r}"):
            small_config(**{field: value}).validate()
    with pytest.raises(ValueError, match="lr_img must be > 0 and finite, got inf"):
        small_config(lr_img=float("inf")).validate()
    with pytest.raises(ValueError, match="width must be at most 8192, got 200000"):  # a set could not say it
        small_config(width=200000).validate()


def test_experts_of_another_dataset_are_named_as_such(digits, experts, tmp_path):
    with pytest.raises(ValueError, match="the experts were trained on digits and the data is digits, but this run "
                                         "distils mnist"):
        distill(small_config(dataset="mnist"), digits, ExpertBuffers.open(experts), tmp_path, progress=False)


@pytest.mark.parametrize("faster", ["eager", "compiled"])
def test_auto_with_compile_runs_compiled_only_where_that_was_faster_and_resumes_so(digits, experts, tmp_path,
                                                                                 monkeypatch, capsys, faster):
    """compile=True under `auto`: both modes timed eager and compiled, the fastest run from then on and on resume.
    The "compiled" steps are the eager ones here, and whichever side is slowed loses."""
    import mtt.distill
    import mtt.unroll
    from test_unroll import slowed
    eager, calls = mtt.unroll.EAGER_STEPS, []
    counted = mtt.unroll.Steps(*(lambda *args, step=step: calls.append(None) or step(*args) for step in eager))
    slow = slowed(eager, 0.05)
    monkeypatch.setattr(mtt.unroll, "EAGER_STEPS", slow if faster == "compiled" else eager)
    monkeypatch.setattr(mtt.unroll, "_compiled_steps", lambda backend: counted if faster == "compiled" else slow)
    buffers = ExpertBuffers.open(experts)
    distill(small_config(iterations=2, backward="auto", compile=True), digits, buffers, tmp_path, progress=False)
    chosen = json.loads((tmp_path / "history.json").read_text())["backward"]
    assert set(chosen["seconds"]) == {"full", "checkpointed", "compiled full", "compiled checkpointed"}
    assert chosen["compiled"] == (faster == "compiled") and f"; compiled by {mtt.distill.COMPILE_BACKEND}" in \
        chosen["reason"]
    said = f"backward auto: {'compiled ' if faster == 'compiled' else ''}{chosen['mode']} ({chosen['reason']}"
    assert said in capsys.readouterr().err
    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["compiled"] == ("1" if faster == "compiled" else "")
    calls.clear()
    distill(small_config(iterations=3, backward="auto", compile=True), digits, buffers, tmp_path, resume=True,
            progress=False)
    assert json.loads((tmp_path / "history.json").read_text())["backward"] == chosen  # not chosen again
    assert bool(calls) == (faster == "compiled")  # the resumed iteration ran the steps chosen


@pytest.mark.parametrize("backward", ["checkpointed", "full"])
def test_compiled_run_equals_the_eager_run(digits, experts, tmp_path, monkeypatch, capsys, backward):
    """compile=True: the student's torch.func steps through torch.compile (aot_eager here: inductor's code
    generation takes minutes on a CPU and is checked on the GPU), batch_syn < IPC * classes so that the
    minibatch sizes vary; the same images and step size as the eager run, float32 round-off apart."""
    import mtt.distill
    monkeypatch.setattr(mtt.distill, "COMPILE_BACKEND", "aot_eager")
    buffers = ExpertBuffers.open(experts)
    config = small_config(iterations=3, batch_syn=4, backward=backward)
    eager = distill(config, digits, buffers, tmp_path / "eager", progress=False)
    compiled = distill(replace(config, compile=True), digits, buffers, tmp_path / "compiled", progress=False)
    assert torch.allclose(compiled.images, eager.images, rtol=1e-4, atol=1e-5)
    assert compiled.syn_lr == pytest.approx(eager.syn_lr, rel=1e-5)
    assert f"backward {backward}, compiled: the first iteration compiles it" in capsys.readouterr().err


def test_auto_backward_chooses_once_records_it_and_resumes_with_it(digits, experts, tmp_path):
    buffers = ExpertBuffers.open(experts)
    distill(small_config(backward="auto", iterations=3), digits, buffers, tmp_path / "auto", progress=False)
    history = json.loads((tmp_path / "auto" / "history.json").read_text())
    chosen = history["backward"]
    assert chosen["iteration"] == 0 and chosen["mode"] in ("full", "checkpointed")
    assert set(chosen["seconds"]) == {"full", "checkpointed"} and chosen["full_graph_bytes"] > 0
    with safe_open(str(tmp_path / "auto" / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["backward"] == chosen["mode"]
    resumed = distill(small_config(backward="auto", iterations=6), digits, buffers, tmp_path / "auto", resume=True,
                      progress=False)
    assert json.loads((tmp_path / "auto" / "history.json").read_text())["backward"] == chosen  # not chosen again
    # Choosing draws no random numbers: the run is the one the chosen mode gives on its own.
    straight = distill(small_config(backward=chosen["mode"], iterations=6), digits, buffers, tmp_path / "straight",
                       progress=False)
    assert torch.equal(straight.images, resumed.images) and straight.syn_lr == resumed.syn_lr


def out_of_memory_from(call: int, compute):
    """`compute` (an unroll mode's function), raising CUDA's out-of-memory error from its call-th call on (0-based)."""
    calls = []

    def run(*args, **kwargs):
        calls.append(None)
        if len(calls) > call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return compute(*args, **kwargs)
    return run


def test_auto_goes_on_with_checkpointed_when_full_runs_out_of_memory(digits, experts, tmp_path, monkeypatch, capsys):
    """Memory can shrink under a run that `auto` started on `full` (another job, the evaluation's networks):
    the iteration is redone with `checkpointed` keeping the graphs of half of the steps (they fit here), and the
    run goes on with it."""
    import mtt.distill
    import mtt.unroll
    monkeypatch.setattr(mtt.distill, "choose_backward", lambda *args, **kwargs: BackwardChoice("full", reason="timed"))
    monkeypatch.setattr(mtt.unroll, "_unroll_full", out_of_memory_from(1, mtt.unroll._unroll_full))
    buffers = ExpertBuffers.open(experts)
    survived = distill(small_config(backward="auto", iterations=4), digits, buffers, tmp_path / "auto",
                       progress=False)
    history = json.loads((tmp_path / "auto" / "history.json").read_text())
    assert len(history["loss"]) == 4
    assert history["backward"]["mode"] == "checkpointed" and history["backward"]["iteration"] == 1
    assert history["backward"]["kept_graphs"] == 2  # of syn_steps=5
    assert "full ran out of memory at iteration 1" in history["backward"]["reason"]
    assert "keeping the graphs of the last 2 of 5 steps" in history["backward"]["reason"]
    assert "backward auto: checkpointed (full ran out of memory at iteration 1" in capsys.readouterr().err
    with safe_open(str(tmp_path / "auto" / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["backward"] == "checkpointed"
    # Both modes are exact: the run is the one either gives, float32 round-off apart.
    straight = distill(small_config(iterations=4), digits, buffers, tmp_path / "straight", progress=False)
    assert torch.allclose(survived.images, straight.images, rtol=1e-4, atol=1e-5)


def test_auto_keeps_the_step_graphs_that_fit_and_resumes_with_them(digits, experts, tmp_path, monkeypatch, capsys):
    """Memory for half of `full`'s graph: `auto` runs `checkpointed` keeping the last half of the steps' graphs,
    records how many, and a resumed run goes on with them; the same run as plain `checkpointed`, round-off apart."""
    import mtt.distill
    import mtt.unroll
    choose = mtt.unroll.choose_backward

    def with_half_the_memory(student, theta_start, theta_target, images, syn_lr, plans, labels, *args, **kwargs):
        free = mtt.unroll.full_graph_bytes(student, theta_start, images, syn_lr, plans, labels)  # 50 % of it usable
        return choose(student, theta_start, theta_target, images, syn_lr, plans, labels, *args, free_bytes=free,
                      **kwargs)

    monkeypatch.setattr(mtt.distill, "choose_backward", with_half_the_memory)
    buffers = ExpertBuffers.open(experts)
    distill(small_config(backward="auto", iterations=3), digits, buffers, tmp_path / "auto", progress=False)
    chosen = json.loads((tmp_path / "auto" / "history.json").read_text())["backward"]
    assert chosen["mode"] == "checkpointed" and chosen["kept_graphs"] == 2  # of syn_steps=5
    assert "the graphs of the last 2 of 5 steps fit" in capsys.readouterr().err
    with safe_open(str(tmp_path / "auto" / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["kept_graphs"] == "2"
    original_walk, walks = mtt.unroll._adjoint_walk, []
    monkeypatch.setattr(mtt.unroll, "_adjoint_walk", lambda *args: walks.append(args[-1]) or original_walk(*args))
    resumed = distill(small_config(backward="auto", iterations=6), digits, buffers, tmp_path / "auto", resume=True,
                      progress=False)
    assert walks == [2, 2, 2]  # not chosen again, and kept on resume
    straight = distill(small_config(iterations=6), digits, buffers, tmp_path / "straight", progress=False)
    assert torch.allclose(resumed.images, straight.images, rtol=1e-4, atol=1e-5)
    assert resumed.syn_lr == pytest.approx(straight.syn_lr, rel=1e-5)
    # Compiled steps are recomputed, none kept: resumed with compile on, auto chooses again (compiled).
    monkeypatch.setattr(mtt.distill, "COMPILE_BACKEND", "aot_eager")
    distill(small_config(backward="auto", iterations=7, compile=True), digits, buffers, tmp_path / "auto",
            resume=True, progress=False)
    chosen = json.loads((tmp_path / "auto" / "history.json").read_text())["backward"]
    assert chosen["iteration"] == 6 and set(chosen["seconds"]) == {"checkpointed", "compiled checkpointed"}
    assert chosen["kept_graphs"] == walks[-1] == (0 if chosen["compiled"] else 2)


@pytest.mark.parametrize("before", ["tesla", "full"])
def test_a_run_resumed_under_auto_chooses_its_backward(digits, experts, tmp_path, before):
    """A run started with a given mode (TESLA's approximate one included) and resumed under `auto` measures and
    takes an exact mode; it does not go on with the mode it was started with."""
    buffers = ExpertBuffers.open(experts)
    distill(small_config(backward=before, iterations=2), digits, buffers, tmp_path, progress=False)
    distill(small_config(backward="auto", iterations=4), digits, buffers, tmp_path, resume=True, progress=False)
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["backward"]["iteration"] == 2 and set(history["backward"]["seconds"]) == {"full", "checkpointed"}
    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["backward"] == history["backward"]["mode"]


def test_a_run_resumed_on_other_hardware_chooses_its_backward_again(digits, experts, tmp_path, capsys):
    """`auto`'s choice was timed and sized on one device (the checkpoint says which): resumed on another (a run
    started on a CPU, resumed on a GPU), it chooses again; the history says why and keeps the earlier choice, and
    config.json records the experts, the versions and the hardware."""
    buffers = ExpertBuffers.open(experts)
    distill(small_config(backward="auto", iterations=3), digits, buffers, tmp_path, progress=False)
    distill(small_config(backward="auto", iterations=4), digits, buffers, tmp_path, resume=True, progress=False)
    assert json.loads((tmp_path / "history.json").read_text())["backward"]["iteration"] == 0  # same CPU: kept
    path = tmp_path / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["chosen_on"] == "cpu" and metadata["iteration"] == "4"
    save_file(load_file(path), path, metadata | {"chosen_on": "NVIDIA A100-SXM4-40GB"})  # as if saved there
    capsys.readouterr()
    distill(small_config(backward="auto", iterations=5), digits, buffers, tmp_path, resume=True, progress=False)
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["backward"]["iteration"] == 4 and set(history["backward"]["seconds"]) == {"full", "checkpointed"}
    assert history["changes"][-1]["changed"]["hardware"] == ["NVIDIA A100-SXM4-40GB", "cpu"]
    assert "hardware NVIDIA A100-SXM4-40GB -> cpu" in capsys.readouterr().err
    assert [before["iteration"] for before in history["backward_before"]] == [0]  # what ran iterations 0..3
    record = json.loads((tmp_path / "config.json").read_text())  # how the run was made, for later
    assert record["experts"] == {"source": str(buffers.source), **buffers.identity()}
    assert record["torch_version"] == torch.__version__ and record["ran_on"] == "cpu"


def test_auto_drops_the_kept_graphs_when_they_run_out_of_memory(digits, experts, tmp_path, monkeypatch):
    import mtt.distill
    import mtt.unroll
    kept = BackwardChoice("checkpointed", reason="fits", kept_graphs=3)
    monkeypatch.setattr(mtt.distill, "choose_backward", lambda *args, **kwargs: kept)
    original_walk, walks = mtt.unroll._adjoint_walk, []

    def walk(*args):  # the kept graphs no longer fit from iteration 1 on
        walks.append(args[-1])
        if args[-1] and len(walks) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original_walk(*args)

    monkeypatch.setattr(mtt.unroll, "_adjoint_walk", walk)
    distill(small_config(backward="auto", iterations=3), digits, ExpertBuffers.open(experts), tmp_path,
            progress=False)
    assert walks == [3, 3, 0, 0]
    chosen = json.loads((tmp_path / "history.json").read_text())["backward"]
    assert chosen["kept_graphs"] == 0 and chosen["iteration"] == 1
    assert "checkpointed keeping 3 steps' graphs ran out of memory at iteration 1" in chosen["reason"]


def test_auto_keeps_no_graph_when_full_and_then_the_kept_graphs_run_out_of_memory(digits, experts, tmp_path,
                                                                                 monkeypatch):
    """Where the free memory misleads (a cap set with torch.cuda.set_per_process_memory_fraction, which the
    driver does not report): `full` runs out, then the half of its graphs kept, in one iteration; it ends on
    `checkpointed` keeping none, not in an error."""
    import mtt.distill
    import mtt.unroll
    monkeypatch.setattr(mtt.distill, "choose_backward", lambda *args, **kwargs: BackwardChoice("full", reason="timed"))
    monkeypatch.setattr(mtt.unroll, "_unroll_full", out_of_memory_from(1, mtt.unroll._unroll_full))
    original_walk, walks = mtt.unroll._adjoint_walk, []

    def walk(*args):
        walks.append(args[-1])
        if args[-1]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original_walk(*args)

    monkeypatch.setattr(mtt.unroll, "_adjoint_walk", walk)
    distill(small_config(backward="auto", iterations=3), digits, ExpertBuffers.open(experts), tmp_path,
            progress=False)
    assert walks == [2, 0, 0]  # iteration 1 (kept 2 of 5, then none), iteration 2
    chosen = json.loads((tmp_path / "history.json").read_text())["backward"]
    assert chosen["mode"] == "checkpointed" and chosen["kept_graphs"] == 0 and chosen["iteration"] == 1
    assert chosen["reason"].startswith("full, then checkpointed keeping 2 steps' graphs ran out of memory at "
                                       "iteration 1")


def test_out_of_memory_saves_the_state_and_says_how_to_go_on(digits, experts, tmp_path, monkeypatch):
    import mtt.unroll
    buffers = ExpertBuffers.open(experts)
    walk = mtt.unroll._adjoint_walk
    monkeypatch.setattr(mtt.unroll, "_adjoint_walk", out_of_memory_from(2, walk))
    with pytest.raises(OutOfMemory, match=r"ran out of memory at iteration 2 \(CUDA out of memory.*--resume.*"
                                          r"--backward checkpointed .*now checkpointed.*--batch-syn \(now all\)"):
        distill(small_config(iterations=6), digits, buffers, tmp_path / "split", progress=False)
    with safe_open(str(tmp_path / "split" / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["iteration"] == "2"
    monkeypatch.setattr(mtt.unroll, "_adjoint_walk", walk)
    resumed = distill(small_config(iterations=6), digits, buffers, tmp_path / "split", resume=True, progress=False)
    straight = distill(small_config(iterations=6), digits, buffers, tmp_path / "straight", progress=False)
    assert torch.equal(straight.images, resumed.images) and straight.syn_lr == resumed.syn_lr


def test_paper_presets_match_the_design_table():
    table = {  # DESIGN.md: syn_steps, expert_epochs, max_start, batch_syn, zca, lr_img, lr_lr, lr_teacher
        ("cifar10", 1): (50, 2, 2, None, True, 100, 1e-7, 0.01),
        ("cifar10", 10): (30, 2, 20, None, True, 100, 1e-5, 0.001),
        ("cifar10", 50): (30, 2, 40, None, False, 1000, 1e-5, 0.001),
        ("cifar100", 1): (20, 3, 20, None, True, 1000, 1e-5, 0.01),
        ("cifar100", 10): (20, 2, 20, None, False, 1000, 1e-5, 0.01),
        ("cifar100", 50): (80, 2, 40, 125, True, 1000, 1e-5, 0.01),
        ("tiny-imagenet", 1): (10, 2, 10, None, False, 1e4, 1e-4, 0.01),
        ("tiny-imagenet", 10): (20, 2, 40, 200, False, 1e4, 1e-4, 0.01),
        ("tiny-imagenet", 50): (20, 2, 40, 300, False, 1e4, 1e-4, 0.01),
    }
    for (dataset, ipc), expected in table.items():
        c = preset(dataset, ipc)
        got = (c.syn_steps, c.expert_epochs, c.max_start_epoch, c.batch_syn, c.zca, c.lr_img, c.lr_lr, c.lr_teacher)
        assert got == expected, (dataset, ipc)
        assert c.iterations == 5000 and not c.soft_labels
    assert preset("tiny-imagenet", 1).model == "ConvNetD4"
    with pytest.raises(ValueError, match="no preset for svhn at IPC 3"):
        preset("svhn", 3)


def test_preset_takes_the_names_load_dataset_takes_and_says_when_a_dataset_is_unknown():
    assert preset("CIFAR-10", 10) == preset("cifar10", 10) and preset("CIFAR-10", 10).dataset == "cifar10"
    assert preset("FashionMNIST", 1) == preset("fashion-mnist", 1)
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'; available: .*cifar10"):
        preset("cifar11", 1)


def cli(*args):
    return [sys.executable, "-m", "mtt", "distill", *map(str, args)]


def test_cli_json_and_a_real_kill_then_resume(experts, tmp_path):
    common = ["--dataset", "digits", "--ipc", "1", "--buffers", experts, "--preset", "none", "--width", WIDTH,
              "--syn-steps", 5, "--expert-epochs", 2, "--max-start-epoch", 2, "--lr-img", 10, "--eval-repeats", 0,
              "--backward", "checkpointed", "--device", "cpu", "--seed", 5, "--iterations", 200,
              "--checkpoint-every", 10, "--no-progress"]
    straight = subprocess.run(cli(*common, "--out", tmp_path / "straight", "--json"), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    summary = json.loads(straight.stdout.strip().splitlines()[-1])
    assert summary["iterations"] == 200 and summary["syn_lr"] > 0 and summary["final_loss"] > 0
    assert set(summary) >= {"iterations", "final_loss", "syn_lr", "seconds", "out"}

    run = tmp_path / "killed"
    process = subprocess.Popen(cli(*common, "--out", run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with safe_open(str(checkpoint), "pt") as f:
        killed_at = int(f.metadata()["iteration"])
    assert 0 < killed_at < 200  # 200 iterations: the kill finds the run going even when this process is slow
    resumed = subprocess.run(cli(*common, "--out", run, "--resume", "--json"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = SyntheticSet.load(tmp_path / "straight" / "synthetic.safetensors")
    b = SyntheticSet.load(run / "synthetic.safetensors")
    assert torch.equal(a.images, b.images) and a.syn_lr == b.syn_lr


def test_cli_reports_and_keeps_the_best_evaluated_set(experts, tmp_path):
    result = subprocess.run(cli("--dataset", "digits", "--ipc", 1, "--buffers", experts, "--preset", "none",
                                "--width", WIDTH, "--syn-steps", 5, "--expert-epochs", 2, "--max-start-epoch", 2,
                                "--lr-img", 1000, "--iterations", 6, "--eval-every", 2, "--eval-repeats", 2,
                                "--eval-epochs", 20, "--snapshot-every", 2, "--device", "cpu", "--no-progress",
                                "--out", tmp_path, "--json"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    evals = json.loads((tmp_path / "history.json").read_text())["evals"]
    assert summary["final_eval"] == evals[-1] and summary["best_eval"] == max(evals, key=lambda e: e["mean"])
    best = summary["best_eval"]["iteration"]
    assert torch.equal(SyntheticSet.load(tmp_path / BEST_SYNTHETIC).images, dict(load_snapshots(tmp_path))[best])
    assert (f"best: {summary['best_eval']['mean']:.2f}" in result.stderr) == (best != 6)
    # Extended without evaluations: the last evaluation is no longer the final set's, and is not called that.
    extended = subprocess.run(cli("--dataset", "digits", "--ipc", 1, "--buffers", experts, "--out", tmp_path,
                                  "--resume", "--iterations", 8, "--eval-repeats", 0, "--device", "cpu",
                                  "--no-progress", "--json"), capture_output=True, text=True)
    assert extended.returncode == 0, extended.stderr
    summary = json.loads(extended.stdout.strip().splitlines()[-1])
    assert "final_eval" not in summary and summary["last_eval"] == evals[-1] and summary["iterations"] == 8


def test_cli_reports_bad_input_without_a_traceback(experts, tmp_path):
    result = subprocess.run(cli("--dataset", "digits", "--ipc", 1, "--buffers", tmp_path / "missing", "--out",
                                tmp_path / "run", "--device", "cpu"), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr


def test_segments_distil_and_resume_exactly(digits, experts, tmp_path):
    buffers = ExpertBuffers.open(experts)
    straight = distill(small_config(segments=3, iterations=4), digits, buffers, tmp_path / "straight",
                       progress=False)
    distill(small_config(segments=3, iterations=2), digits, buffers, tmp_path / "split", progress=False)
    resumed = distill(small_config(segments=3, iterations=4), digits, buffers, tmp_path / "split", resume=True,
                      progress=False)
    assert torch.equal(straight.images, resumed.images) and straight.syn_lr == resumed.syn_lr
    one = distill(small_config(iterations=4), digits, buffers, tmp_path / "one", progress=False)
    assert not torch.equal(one.images, straight.images)  # three segments are not one


@pytest.mark.parametrize("option", [dict(backward="tesla"), dict(match="closest"), dict(pad_fraction=0.3),
                                    dict(match="closest", pad_fraction=0.3, segments=2)])
def test_successor_options_run_in_the_loop(digits, experts, tmp_path, option):
    synthetic = distill(small_config(iterations=3, **option), digits, ExpertBuffers.open(experts), tmp_path,
                        progress=False)
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["loss"]) == 3 and all(0 < loss < 10 for loss in history["loss"])
    assert torch.isfinite(synthetic.images).all() and synthetic.config | option == synthetic.config


def test_successor_options_are_checked():
    with pytest.raises(ValueError, match="match must be one of"):
        small_config(match="nearest").validate()
    with pytest.raises(ValueError, match=r"pad_fraction must be in \[0, 1\)"):
        small_config(pad_fraction=1.0).validate()
