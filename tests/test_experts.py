"""Expert training: vectorised == sequential, resume, reproducibility, CLI, torchrun."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtt.augment import apply_params, sample_params
from mtt.buffers import ExpertBuffers, flatten_params
from mtt.data import load_dataset
from mtt.experts import (ExpertConfig, SequentialExperts, VectorisedExperts, augment, init_expert, train_experts,
                         train_group)
from mtt.networks import get_network
from mtt.seeds import stream

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Tiny experts keep this file fast on 2 cores: 20 images per class, 4 steps of 64 per epoch.
TINY = ExpertConfig(num_experts=3, epochs=2, width=16, batch_size=64)
CLI_TINY = ["--dataset", "digits", "--train-per-class", "20", "--width", "16", "--batch-size", "64",
            "--epochs", "2", "--device", "cpu", "--no-progress", "--json"]


@pytest.fixture(scope="module")
def digits():
    # the CLI's --train-per-class 20 --seed 0 picks the same subset
    return load_dataset("digits").take_per_class(20, seed=0)


def shard_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 5e-4)])
def test_vectorised_steps_equal_sequential_steps(digits, dtype, atol, momentum, weight_decay):
    config = replace(TINY, momentum=momentum, weight_decay=weight_decay, lr=0.05)
    experts = [init_expert(digits, config, k) for k in range(3)]
    nets = [net.to(dtype) for net, _ in experts]
    vectorised = VectorisedExperts(nets, config)  # stacks copies: the sequential steps below do not touch it
    sequential = [SequentialExperts(net, config) for net in nets]
    for _ in range(2):  # two steps, so that momentum buffers are exercised
        idx = torch.stack([torch.randperm(len(digits.train_images), generator=g)[:32] for _, g in experts])
        params = [sample_params(config.dsa, 32, digits.channels, digits.im_size, g) for _, g in experts]
        x, y = augment(digits.train_images[idx].to(dtype), params), digits.train_labels[idx]
        vectorised.step(x, y)
        for p, trainer in enumerate(sequential):
            trainer.step(x[p:p + 1], y[p:p + 1])
    expected = torch.stack([flatten_params(net) for net in nets])
    assert vectorised.flat().dtype == dtype
    torch.testing.assert_close(vectorised.flat(), expected, atol=atol, rtol=0)


def test_augment_applies_each_experts_own_draw(digits):
    gens = [torch.Generator().manual_seed(s) for s in range(6)]
    x = digits.train_images[:8].expand(6, -1, -1, -1, -1)
    params = [sample_params("color_crop_cutout_flip_scale_rotate", 8, 1, (8, 8), g) for g in gens]
    torch.testing.assert_close(augment(x, params), torch.stack([apply_params(xi, p) for xi, p in zip(x, params)]))


def test_expert_follows_same_path_whatever_its_group(digits):
    alone = torch.cat([train_group(digits, TINY, [k], torch.device("cpu"))[0] for k in (1, 2)])
    together, acc = train_group(digits, TINY, [1, 2], torch.device("cpu"))
    assert together.shape == (2, TINY.epochs + 1, alone.shape[-1]) and acc.shape == (2, TINY.epochs)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert not torch.equal(together[0, 0], together[1, 0])  # different seeds, different experts


def test_two_seeds_share_no_expert_and_seed_0_keeps_its_experts(digits):
    """Under seed + k, --seed 1's expert 0 was --seed 0's expert 1 (49 of 50 experts retrained); seed 0's expert k
    still draws its weights as torch.manual_seed(k) would, so existing seed-0 folders extend and reproduce as before."""
    first = lambda seed, k: flatten_params(init_expert(digits, replace(TINY, seed=seed), k)[0])  # noqa: E731
    assert not any(torch.equal(first(1, k), first(0, j)) for k in range(2) for j in range(3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        expected = get_network(TINY.model, digits.channels, digits.num_classes, digits.im_size, width=TINY.width,
                               depth=TINY.depth)
    assert torch.equal(first(0, 1), flatten_params(expected))
    for bad in (-1, 2**16, 1.5):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 65536\)"):
            replace(TINY, seed=bad)
    with pytest.raises(ValueError, match="num_experts must be at most 65520"):
        replace(TINY, num_experts=65521)
    with pytest.raises(ValueError, match="item 65536 of seed 0 has no stream: a seed has 65536"):
        stream(0, 65536)  # e.g. PAD's scoring networks past the 16 streams they have


def test_same_seed_same_shards_and_resume(digits, tmp_path):
    config = replace(TINY, parallel=2)
    first = train_experts(digits, config, tmp_path / "a", device="cpu", progress=False)
    train_experts(digits, config, tmp_path / "b", device="cpu", progress=False)
    a, b = shard_tensors(tmp_path / "a"), shard_tensors(tmp_path / "b")
    assert list(a) == ["experts_00000-00001.safetensors", "experts_00002-00002.safetensors"]
    assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    assert first["experts"] == first["trained"] == 3 and len(first["test_acc"]) == 3

    # Nothing left to do: no training, no shard rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.safetensors")}
    again = train_experts(digits, config, tmp_path / "a", device="cpu", progress=False)
    assert again["trained"] == 0 and again["test_acc"] == first["test_acc"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.safetensors")} == mtimes

    # A lost shard is re-trained alone, to the same numbers; asking for more experts adds only those.
    (tmp_path / "a" / "experts_00002-00002.safetensors").unlink()
    assert train_experts(digits, config, tmp_path / "a", device="cpu", progress=False)["trained"] == 1
    more = train_experts(digits, replace(config, num_experts=4), tmp_path / "a", device="cpu", progress=False)
    assert more["trained"] == 1 and more["test_acc"][:3] == first["test_acc"]
    buffers = ExpertBuffers.open(tmp_path / "a")
    assert buffers.expert_ids == [0, 1, 2, 3]
    assert torch.equal(buffers.trajectory(2), b["experts_00002-00002.safetensors"]["expert_00002"])


def test_experts_whose_files_went_away_while_training_are_said_missing(digits, tmp_path, monkeypatch):
    """The first shard removed while the second trained (the folder deleted mid-run): one error, not a KeyError."""
    import mtt.experts
    write = mtt.experts.write_shard

    def and_lose_the_first(path, *args, **kwargs):
        written = write(path, *args, **kwargs)
        if path.name != "experts_00000-00000.safetensors":
            (tmp_path / "experts_00000-00000.safetensors").unlink()
        return written

    monkeypatch.setattr(mtt.experts, "write_shard", and_lose_the_first)
    with pytest.raises(ValueError, match=r"experts \[0\] are no longer in .*: run the command again to train them"):
        train_experts(digits, replace(TINY, num_experts=2, epochs=1), tmp_path, device="cpu", progress=False)


def test_a_group_that_runs_out_of_memory_trains_again_in_halves(digits, tmp_path, monkeypatch):
    """A device that holds 2 experts at once (a real out-of-memory error from train_group for more; on a GPU,
    gpu_suite's cuda-tests): --parallel 4 warns and trains the same experts 2 at a time, not a traceback that
    loses the run; one expert alone that does not fit is an error that keeps the finished ones."""
    import mtt.experts
    train = mtt.experts.train_group

    def on_a_small_device(dataset, config, group, *args, **kwargs):
        if len(group) > fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return train(dataset, config, group, *args, **kwargs)

    monkeypatch.setattr(mtt.experts, "train_group", on_a_small_device)
    fits = 2
    with pytest.warns(UserWarning, match=r"4 experts at once ran out of memory on cpu \(CUDA out of memory\. Tried "
                                         r"to allocate 2\.00 GiB\): training 2 at once from here"):
        train_experts(digits, replace(TINY, num_experts=5, parallel=4), tmp_path / "halved", device="cpu",
                      progress=False)
    assert sorted(p.name for p in (tmp_path / "halved").glob("*.safetensors")) == [
        "experts_00000-00001.safetensors", "experts_00002-00003.safetensors", "experts_00004-00004.safetensors"]
    fits = 5
    train_experts(digits, replace(TINY, num_experts=5, parallel=1), tmp_path / "alone", device="cpu", progress=False)
    halved, alone = ExpertBuffers.open(tmp_path / "halved"), ExpertBuffers.open(tmp_path / "alone")
    for k in range(5):
        torch.testing.assert_close(halved.trajectory(k), alone.trajectory(k), atol=1e-5, rtol=0)

    fits = 0
    with pytest.raises(ValueError, match=r"ran out of memory training one expert alone \(CUDA out of memory.*\): use "
                                         r"a smaller --batch-size"):
        train_experts(digits, replace(TINY, num_experts=6, parallel=1), tmp_path / "halved", device="cpu",
                      progress=False)
    assert ExpertBuffers.open(tmp_path / "halved").expert_ids == [0, 1, 2, 3, 4]


def test_resume_refuses_other_experts(digits, tmp_path):
    train_experts(digits, replace(TINY, num_experts=1, epochs=1), tmp_path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="epochs: 1 there vs 2 now"):
        train_experts(digits, replace(TINY, num_experts=2), tmp_path, device="cpu", progress=False)


def test_resume_refuses_experts_trained_otherwise(digits, tmp_path):
    """The buffers' metadata holds no momentum, batch size, seed ...: config.json does, and a resume must match it."""
    first = replace(TINY, num_experts=1, epochs=1)
    train_experts(digits, first, tmp_path, device="cpu", progress=False)
    recorded = (tmp_path / "config.json").read_text()
    for change in [dict(momentum=0.9), dict(batch_size=32), dict(seed=5), dict(dsa="none")]:
        name, value = next(iter(change.items()))
        with pytest.raises(ValueError, match=rf"other settings \({name}: {getattr(first, name)!r} there vs "
                                             rf"{value!r} now\); run with the settings its config.json records"):
            train_experts(digits, replace(first, num_experts=2, **change), tmp_path, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"train_images: 200 there vs 100 now"):
        train_experts(digits.take_per_class(10), replace(first, num_experts=2), tmp_path, device="cpu",
                      progress=False)
    assert (tmp_path / "config.json").read_text() == recorded  # a refused resume leaves the record as it was
    # Without the record (a copy of the shards alone), how they were trained is unknown: nothing is added.
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"holds experts but no config.json saying how they were trained"):
        train_experts(digits, replace(first, num_experts=2), tmp_path, device="cpu", progress=False)
    (tmp_path / "config.json").write_text(recorded[:40])  # damaged: named, with what to do
    with pytest.raises(ValueError, match=r"config.json is damaged, not valid JSON .*: put back the config.json"):
        train_experts(digits, replace(first, num_experts=2), tmp_path, device="cpu", progress=False)
    (tmp_path / "config.json").write_text(recorded)
    # More experts, trained several at once: the same kind of expert.
    train_experts(digits, replace(first, num_experts=3, parallel=2), tmp_path, device="cpu", progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["num_experts"] == 3
    assert len(ExpertBuffers.open(tmp_path)) == 3
    # Fewer than the folder holds: nothing trained, nothing removed, and the record still counts them all.
    result = train_experts(digits, replace(first, num_experts=1), tmp_path, device="cpu", progress=False)
    assert (result["experts"], result["trained"]) == (3, 0)
    assert json.loads((tmp_path / "config.json").read_text())["num_experts"] == 3
    # Another ConvNet width is named as one, not as two lists of parameter shapes.
    with pytest.raises(ValueError, match=r"trained differently \(width: 16 there vs 8 now\)"):
        train_experts(digits, replace(first, num_experts=4, width=8), tmp_path, device="cpu", progress=False)


def test_an_expert_that_diverges_is_not_saved(digits, tmp_path):
    with pytest.raises(ValueError, match=r"expert 0 diverged: its parameters are not finite from epoch 1 on "
                                         r"\(lr 1e\+06, momentum 0, weight decay 0\); lower them"):
        train_experts(digits, replace(TINY, num_experts=1, epochs=1, lr=1e6), tmp_path, device="cpu",
                      progress=False)
    assert not list(tmp_path.glob("experts_*.safetensors"))


@pytest.mark.parametrize("bad, said", [(dict(momentum=1.0), "momentum must be in \\[0, 1\\)"),
                                       (dict(momentum=-0.1), "momentum must be in"),
                                       (dict(weight_decay=math.inf), "weight_decay must be >= 0 and finite"),
                                       (dict(lr=math.inf), "lr must be > 0 and finite")])
def test_settings_that_cannot_train_are_refused_before_training(bad, said):
    with pytest.raises(ValueError, match=said):
        replace(TINY, **bad)


def test_zca_is_recorded(digits, tmp_path):
    train_experts(digits.with_zca(), replace(TINY, num_experts=1, epochs=1), tmp_path, device="cpu", progress=False)
    assert ExpertBuffers.open(tmp_path, zca=True).meta.zca


def test_batchnorm_falls_back_to_sequential(digits, tmp_path):
    config = replace(TINY, model="ConvNetBN", num_experts=2, epochs=1, parallel=2)
    with pytest.warns(UserWarning, match="BatchNorm"):
        train_experts(digits, config, tmp_path, device="cpu", progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "experts_00000-00000.safetensors", "experts_00001-00001.safetensors"]


def run_cli(*args: str, launcher: list[str] | None = None) -> tuple[dict, str]:
    """The JSON summary and what was said on stderr."""
    cmd = (launcher or [sys.executable]) + ["-m", "mtt", "experts", *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_cli_round_trip(digits, tmp_path):
    out = tmp_path / "experts"
    summary, said = run_cli(*CLI_TINY, "--num-experts", "2", "--out", str(out))
    assert summary["experts"] == 2 and summary["epochs"] == 2 and len(summary["test_acc"]) == 2
    final = [100 * acc for acc in summary["test_acc"]]
    assert (f"saved: 2 experts in {out} (2 trained now); test accuracy after the last epoch "
            f"{sum(final) / 2:.1f} % (from {min(final):.1f} to {max(final):.1f})") in said
    buffers = ExpertBuffers.open(out, dataset="digits", model="ConvNet")
    assert len(buffers) == 2 and buffers.trajectory(1).shape == (3, summary["params"])
    assert buffers.meta.num_params == summary["params"] and not buffers.meta.zca
    assert summary["test_acc"] == [buffers.test_acc(i)[-1].item() for i in range(2)]
    # the CLI's experts are the library's: same seeds, same subset, same numbers
    expected, _ = train_group(digits, replace(TINY, num_experts=2), [1], torch.device("cpu"))
    torch.testing.assert_close(buffers.trajectory(1), expected[0], atol=1e-5, rtol=0)


def test_torchrun_says_a_warning_of_every_rank_once_and_a_ranks_own_with_its_rank(tmp_path, monkeypatch, capsys):
    """ConvNetBN's experts train one at a time (BatchNorm): both ranks warn, rank 0 alone says it. A warning about one
    process (RankWarning: its GPU ran out of memory) is said by the rank that has it, named."""
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]
    _, said = run_cli(*CLI_TINY, "--model", "ConvNetBN", "--num-experts", "2", "--parallel", "2", "--out",
                      str(tmp_path / "bn"), launcher=torchrun)
    assert said.count("has BatchNorm, whose running stats cannot be vmapped") == 1, said

    from mtt.cli import _show_warning
    from mtt.distributed import RankWarning
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _show_warning("2 experts at once ran out of memory", RankWarning, "f.py", 1)
    _show_warning("the same for every rank", UserWarning, "f.py", 1)
    assert capsys.readouterr().err == "warning: rank 1: 2 experts at once ran out of memory\n"


def test_torchrun_two_ranks_split_the_experts(digits, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = [*CLI_TINY, "--num-experts", "3", "--parallel", "2"]
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]  # --standalone: a free port
    summary, _ = run_cli(*args, "--out", str(multi), launcher=torchrun)
    assert summary["experts"] == summary["trained"] == 3 and len(summary["test_acc"]) == 3
    # rank 0 took experts 0 and 2, rank 1 expert 1; each wrote its own shard
    assert sorted(p.name for p in multi.glob("*.safetensors")) == [
        "experts_00000-00002.safetensors", "experts_00001-00001.safetensors"]
    train_experts(digits, replace(TINY, parallel=2), single, device="cpu", progress=False)  # what the CLI args say
    a, b = ExpertBuffers.open(single), ExpertBuffers.open(multi)
    assert a.expert_ids == b.expert_ids == [0, 1, 2]
    for i in range(3):
        torch.testing.assert_close(b.trajectory(i), a.trajectory(i), atol=1e-5, rtol=0)
        torch.testing.assert_close(b.test_acc(i), a.test_acc(i))
