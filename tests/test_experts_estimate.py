"""estimate_seconds: a rough time for train_experts, from a few timed steps of one group."""
from __future__ import annotations

import itertools
import math
import types
from dataclasses import replace

import pytest

import mtt.device
from mtt.data import load_dataset
from mtt.experts import ExpertConfig, estimate_seconds

TINY = ExpertConfig(num_experts=3, epochs=2, width=16, batch_size=64, parallel=2)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits").take_per_class(20, seed=0)


def test_positive_finite_and_grows_with_epochs(digits):
    short = estimate_seconds(digits, TINY, device="cpu")
    long = estimate_seconds(digits, replace(TINY, epochs=20), device="cpu")
    assert math.isfinite(short) and short > 0
    # 10x the epochs: about 10x the time; loose, the machine may be busy.
    assert 2 < long / short < 50


@pytest.mark.parametrize("parallel", [1, 2, 3])
def test_extrapolates_groups_epochs_and_steps(digits, monkeypatch, parallel):
    # A clock that advances 1 s per reading makes the extrapolation exact.
    ticks = itertools.count()
    monkeypatch.setattr(mtt.device, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    config = replace(TINY, parallel=parallel, epochs=5)
    seconds = estimate_seconds(digits, config, device="cpu", probe_batches=4)
    n, n_test = len(digits.train_images), len(digits.test_images)
    steps, test_batches = math.ceil(n / 64), math.ceil(n_test / min(128, n_test))
    groups = math.ceil(3 / parallel)
    # 4 probe steps between two readings: 1/4 s a step; one test batch between two: 1 s a batch.
    assert seconds == pytest.approx(groups * 5 * (steps / 4 + test_batches * 1))


def test_rejects_no_probe(digits):
    with pytest.raises(ValueError, match="probe_batches"):
        estimate_seconds(digits, TINY, device="cpu", probe_batches=0)
