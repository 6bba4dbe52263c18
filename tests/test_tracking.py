"""Experiment tracking: choices and missing packages fail early, TensorBoard gets what a run logs,
and a failing backend only warns."""
import sys
from dataclasses import replace

import pytest
import torch

from mtt.data import load_dataset
from mtt.distill import DistillConfig, IterationInfo, initial_state
from mtt.tracking import TRACKERS, Tracker, tracker


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def state(digits):
    config = DistillConfig(dataset="digits", ipc=2, width=16, device="cpu")
    return initial_state(config, digits, torch.device("cpu"))


def infos(state):
    """What distill would pass for iterations 1..4, with an evaluation run before iteration 3's update."""
    evaluation = {"iteration": 2, "mean": 61.5, "std": 1.25, "runs": [60.25, 62.75]}
    return [IterationInfo(i, 1.0 / i, 0.01 * i, state, evaluation if i == 3 else None) for i in range(1, 5)]


def test_unknown_kind_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match="tensorboard, wandb"):
        tracker("mlflow", tmp_path, {})
    assert TRACKERS == ("tensorboard", "wandb")


@pytest.mark.parametrize("kind", TRACKERS)
def test_missing_package_names_the_pip_command(kind, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, kind, None)  # makes `import kind` raise ImportError
    with pytest.raises(ValueError, match=f"--log {kind} needs the {kind} package: pip install {kind}"):
        tracker(kind, tmp_path, {})
    assert not any(tmp_path.iterdir())  # failed before writing anything


def test_tensorboard_gets_scalars_and_images_at_their_steps(digits, state, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = tracker("tensorboard", tmp_path, {"dataset": "digits", "ipc": 2}, digits, image_every=2)
    for info in infos(state):
        logger(info)
    logger.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    def scalars(tag):
        return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]
    assert scalars("distill/loss") == [(i, 1.0 / i) for i in range(1, 5)]
    assert scalars("distill/syn_lr") == [(i, 0.01 * i) for i in range(1, 5)]
    assert scalars("eval/accuracy") == [(2, 61.5)] and scalars("eval/accuracy_std") == [(2, 1.25)]
    images = events.Images("synthetic_images")
    assert [e.step for e in images] == [2, 3, 4]  # every 2 iterations, and with the evaluation
    # digits 8x8 enlarged 4x: 10 rows (classes) x 2 columns (IPC) of 32 px cells with 2 px gutters
    assert (images[0].height, images[0].width) == (2 + 10 * 34, 2 + 2 * 34)
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"ipc": 2' in config


class Failing:
    """A backend whose service went away mid-run."""

    def __init__(self):
        self.calls = 0

    def scalars(self, values, step):
        self.calls += 1
        raise ConnectionError("the tracking server is unreachable")

    image = scalars

    def close(self):
        self.calls += 1
        raise ConnectionError("the tracking server is unreachable")


def test_a_failing_backend_warns_once_and_stops_logging(digits, state):
    backend = Failing()
    logger = Tracker(backend, digits)
    with pytest.warns(RuntimeWarning, match="unreachable") as caught:
        for info in infos(state):
            logger(info)
        logger.close()
    assert len(caught) == 1 and backend.calls == 1


class Recording:
    """A backend that keeps what it is given."""

    def __init__(self):
        self.images = []

    def scalars(self, values, step):
        pass

    def image(self, name, grid, step):
        self.images.append(grid)

    def close(self):
        pass


def test_without_a_dataset_each_image_is_stretched_to_the_display_range(state):
    backend = Recording()
    logger = Tracker(backend, image_every=1)
    logger(IterationInfo(1, 0.5, 0.01, replace(state, images=state.images * 50 + 30)))
    [grid] = backend.images
    assert grid.shape == (3, 2 + 10 * 34, 2 + 2 * 34)
    cells = grid[0, 2:34, 2:34], grid[0, 2:34, 36:68]  # the two images of class 0
    assert all(cell.min() == 0 and cell.max() == 1 for cell in cells)


def test_the_images_logged_are_the_set_evaluated(digits, state):
    """Under FTD's EMA the set evaluated and saved is the images' average: the viewer shows that, not the raw
    images the optimiser moves."""
    class Recording:
        def __init__(self):
            self.grids = []

        def scalars(self, values, step):
            pass

        def image(self, tag, grid, step):
            self.grids.append(grid)

    with_ema = replace(state, ema_images=state.images.flip(0))
    backend = Recording()
    logger = Tracker(backend, digits, image_every=1)
    logger(IterationInfo(1, 1.0, 0.01, with_ema, None))
    assert torch.equal(backend.grids[0], logger._grid(with_ema.ema_images, with_ema.labels))
    assert not torch.equal(backend.grids[0], logger._grid(with_ema.images, with_ema.labels))
