"""Experiment tracking (TensorBoard or Weights & Biases) as a distillation callback.

`tracker(kind, run_dir, config)` checks that the backend is installed before any work starts;
the Tracker it returns, passed in `distill(..., callbacks=[...])`, logs the matching loss and
the learned step size every iteration, the test accuracy at each evaluation, and a grid of the
synthetic images every `image_every` iterations and at evaluations.
"""
from __future__ import annotations

import importlib
import json
import math
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from mtt.data import Dataset
from mtt.distill import IterationInfo
from mtt.io import atomic_write_text

TRACKERS = ("tensorboard", "wandb")
MAX_PER_CLASS = 10  # images per class in a grid: at IPC 50 a full grid would bloat the logs


class Backend(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def image(self, name: str, grid: Tensor, step: int) -> None: ...
    def close(self) -> None: ...


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        # Indented in a code block: TensorBoard renders text as markdown.
        text = json.dumps(config, indent=2, default=str).replace("\n", "\n    ")
        self.writer.add_text("config", "    " + text)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def image(self, name: str, grid: Tensor, step: int) -> None:
        self.writer.add_image(name, grid, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        # The id is kept in the run folder so that `--resume` continues the same W&B run.
        id_file = run_dir / "wandb_run_id"
        if not id_file.exists():
            atomic_write_text(id_file, uuid.uuid4().hex[:8])
        self.wandb = wandb
        self.run = wandb.init(project="mtt", config=config, dir=run_dir, id=id_file.read_text().strip(),
                              resume="allow")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, name: str, grid: Tensor, step: int) -> None:
        # uint8 HWC, so wandb stores exactly these pixels instead of rescaling a float tensor.
        pixels = grid.mul(255).round().byte().permute(1, 2, 0).numpy()
        self.run.log({name: self.wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """A distill callback; a backend failure warns once and turns logging off, never stops the run."""

    def __init__(self, backend: Backend, dataset: Dataset | None = None, image_every: int = 100) -> None:
        if image_every < 1:
            raise ValueError(f"image_every must be >= 1, got {image_every}")
        self.backend: Backend | None = backend
        self.dataset = dataset
        self.image_every = image_every

    def __call__(self, info: IterationInfo) -> None:
        # The evaluation ran before this iteration's update, on the images of evaluation["iteration"];
        # logged first, as W&B only accepts steps that do not go back.
        if info.evaluation is not None:
            self.log_evaluation(info.evaluation)
        self._guarded(lambda: self._log_iteration(info))

    def log_evaluation(self, evaluation: dict[str, Any]) -> None:
        """Log one entry of history["evals"]; public for the final evaluation, which distill records
        after its last callback."""
        self._guarded(lambda: self.backend.scalars(
            {"eval/accuracy": evaluation["mean"], "eval/accuracy_std": evaluation["std"]}, evaluation["iteration"]))

    def close(self) -> None:
        self._guarded(lambda: self.backend.close())
        self.backend = None

    def _log_iteration(self, info: IterationInfo) -> None:
        self.backend.scalars({"distill/loss": info.loss, "distill/syn_lr": info.syn_lr}, info.iteration)
        if info.iteration % self.image_every == 0 or info.evaluation is not None:  # the set evaluated (FTD: the EMA)
            self.backend.image("synthetic_images", self._grid(info.state.result()[0], info.state.labels),
                               info.iteration)

    def _guarded(self, log: Callable[[], None]) -> None:
        if self.backend is None:
            return
        try:
            log()
        except Exception as err:  # any backend failure: losing logs beats losing a long distillation
            warnings.warn(f"experiment tracking failed and is now off for this run: {err!r}", RuntimeWarning)
            self.backend = None

    def _grid(self, images: Tensor, labels: Tensor) -> Tensor:
        """[3, H', W'] pixels in [0, 1]: one row per class (ten images a row at IPC 1)."""
        from torchvision.utils import make_grid  # here: the CLI imports this module for TRACKERS alone

        from mtt.viz import display_pixels

        keep = torch.cat([(labels == c).nonzero().flatten()[:MAX_PER_CLASS] for c in labels.unique()])
        images = images[keep].detach().float().cpu()
        if self.dataset is not None:
            pixels = display_pixels(images, self.dataset)
        else:  # no dataset to undo the normalisation with: stretch each image to [0, 1]
            low, high = images.amin((1, 2, 3), keepdim=True), images.amax((1, 2, 3), keepdim=True)
            pixels = (images - low) / (high - low).clamp_min(1e-12)
        scale = math.ceil(32 / max(pixels.shape[-2:]))  # enlarge 8x8 digits so the viewer shows them
        pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        per_class = len(keep) // len(labels.unique())
        return make_grid(pixels, nrow=per_class if per_class > 1 else 10, pad_value=1.0)


def tracker(kind: str, run_dir: str | Path, config: dict[str, Any], dataset: Dataset | None = None, *,
            image_every: int = 100) -> Tracker:
    """A Tracker logging to `kind` (one of TRACKERS); raises ValueError at once if its package is missing."""
    if kind not in TRACKERS:
        raise ValueError(f"unknown tracker {kind!r}: use one of {', '.join(TRACKERS)}")
    try:
        importlib.import_module(kind)
    except ImportError:
        raise ValueError(f"--log {kind} needs the {kind} package: pip install {kind}") from None
    backend = TensorBoard if kind == "tensorboard" else WandB
    try:
        started = backend(Path(run_dir), config)
    except Exception as err:  # e.g. wandb not logged in: its own error types, which share no base class
        raise ValueError(f"--log {kind} could not start: {type(err).__name__}: {err}") from None
    return Tracker(started, dataset, image_every)
