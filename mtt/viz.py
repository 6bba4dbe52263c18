"""Plots: synthetic image grids and their evolution, training curves, PCA of trajectories.

Every function builds a matplotlib Figure on the Agg canvas directly, never through pyplot:
notebooks keep their own backend, figures are not shown twice, and nothing piles up in
pyplot's figure list. A notebook shows the returned Figure as the value of a cell (it renders
itself as a PNG); given `path`, the figure is also saved atomically, in the format its suffix
names.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from safetensors import safe_open
from torch import Tensor

from mtt.augment import DEFAULT_STRATEGY
from mtt.buffers import ExpertBuffers
from mtt.data import SPECS, ZCA, Dataset, DatasetSpec, dataset_key
from mtt.device import DeviceLike, resolve_device
from mtt.distill import (CHECKPOINT, FINAL_SYNTHETIC, HISTORY, RUN_CONFIG, SNAPSHOTS, DistillConfig,
                         check_distilled_from, load_snapshots)
from mtt.io import atomic_save_figure, atomic_write, read_json
from mtt.networks import get_network
from mtt.paper import mean_and_std
from mtt.synthetic import SyntheticSet
from mtt.unroll import Student, plan_steps, student_path

PathLike = str | os.PathLike
DPI = 150
# Okabe-Ito: tells apart under the common colour-vision deficiencies.
BLUE, ORANGE, SKY, GREEN, VERMILLION, PURPLE, GREY = (
    "#0072B2", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#CC79A7", "#7F7F7F")
EXPERT_COLOURS = (BLUE, GREEN, PURPLE, SKY, ORANGE, "#000000")
STUDENT_COLOUR = VERMILLION  # kept out of EXPERT_COLOURS so the student always stands out


class NotebookFigure(Figure):
    """A Figure that shows itself as the value of a notebook cell, whatever the notebook's backend: IPython renders
    a plain Figure only once pyplot has set up its inline backend, and these figures never go through pyplot."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()


def _figure(width: float, height: float) -> Figure:
    fig = NotebookFigure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike | None) -> Figure:
    if path is not None:
        atomic_save_figure(fig, path, DPI)
    return fig


# ----------------------------------------------------------------------------- pixels

def _as_dataset(dataset: Dataset | DatasetSpec | str, zca: ZCA | None = None) -> Dataset:
    """A Dataset to denormalise with: the given one (with `zca` in place of its own, if given),
    or an empty one made from a spec or a dataset name."""
    if isinstance(dataset, Dataset):
        return dataset if zca is None else replace(dataset, zca=zca)
    spec = SPECS[dataset_key(dataset)] if isinstance(dataset, str) else dataset  # 'CIFAR-10' is cifar10
    empty = torch.empty(0)
    return Dataset(spec, [str(c) for c in range(spec.num_classes)], empty, empty.long(), empty, empty.long(), zca)


def display_pixels(images: Tensor, dataset: Dataset | DatasetSpec | str, zca: ZCA | None = None,
                   clip: float | None = 2.5) -> Tensor:
    """Training-space images [N, C, H, W] -> pixels in [0, 1], shown the way the paper shows them.

    ZCA (`zca`, else the dataset's) and the normalisation are undone; then, as in the original
    code's clipped image logs, values beyond mean +- clip * std of the whole set are clipped
    and each image is stretched to [0, 1] on its own. clip=None: plain pixels clipped to [0, 1].
    """
    pixels = _as_dataset(dataset, zca).denormalize(torch.nan_to_num(images.detach().float().cpu()))
    if clip is None:
        return pixels.clamp(0, 1)
    mean, std = pixels.mean(), pixels.std()
    pixels = pixels.clamp(mean - clip * std, mean + clip * std)
    low, high = pixels.amin((1, 2, 3), keepdim=True), pixels.amax((1, 2, 3), keepdim=True)
    return (pixels - low) / (high - low).clamp_min(1e-12)


@dataclass
class _Mosaic:
    """Images tiled in one array with white gutters; `centre` gives a cell's centre for labels."""

    image: np.ndarray  # [H', W'] (grey) or [H', W', 3]
    cell: tuple[int, int]
    pad: int

    def centre(self, index: int, axis: int) -> float:
        return self.pad + index * (self.cell[axis] + self.pad) + (self.cell[axis] - 1) / 2


def _mosaic(pixels: Tensor, cells: list[list[int]]) -> _Mosaic:
    """pixels [N, C, H, W] laid out as cells[row][col] = image index.

    Small images are enlarged by repeating pixels (8x8 digits 4x, 28x28 2x) so the gutters
    stay thin and every renderer shows sharp squares instead of a blur.
    """
    _, channels, h, w = pixels.shape
    scale = max(1, math.ceil(32 / max(h, w)))
    tiles = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()
    h, w = h * scale, w * scale
    pad = max(1, h // 16)
    rows, cols = len(cells), max(len(r) for r in cells)
    out = np.ones((pad + rows * (h + pad), pad + cols * (w + pad), channels), dtype=np.float32)
    for r, row in enumerate(cells):
        for c, index in enumerate(row):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            out[top:top + h, left:left + w] = tiles[index]
    return _Mosaic(out[..., 0] if channels == 1 else out, (h, w), pad)


def _show(ax, image: np.ndarray) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _label_size(cell_inches: float) -> float:
    """A font size in points that fits beside a cell of this height."""
    return float(np.clip(cell_inches * 72 * 0.4, 5, 10))


def _text_width(labels: Sequence[str], points: float) -> float:
    """Rough width in inches of the longest label (an average glyph is ~0.6 em wide)."""
    return max(map(len, labels)) * 0.6 * points / 72


def _class_labels(labels: Tensor | None, num_images: int, num_classes: int, ipc: int | None) -> Tensor:
    if labels is not None:
        return labels.detach().cpu().long()
    per_class = ipc or num_images // num_classes
    if per_class * num_classes != num_images:
        raise ValueError(f"{num_images} images are not {num_classes} classes x {per_class} per class: pass labels")
    return torch.arange(num_classes).repeat_interleave(per_class)


# ----------------------------------------------------------------------------- image grids

def image_grid(images: Tensor | SyntheticSet, dataset: Dataset | DatasetSpec | str, labels: Tensor | None = None,
               class_names: Sequence[str] | None = None, ipc: int | None = None, path: PathLike | None = None, *,
               zca: ZCA | None = None, clip: float | None = 2.5, title: str | None = None) -> Figure:
    """Synthetic images, one row per class (IPC 1: a grid with the class above each image).

    `images` are in the training space (a SyntheticSet brings its labels and ZCA along);
    without labels they are taken as class-ordered, `ipc` per class. With labels, `ipc`
    caps how many images per class are shown. See display_pixels for `zca` and `clip`.
    """
    set_of = None
    if isinstance(images, SyntheticSet):
        labels = images.labels if labels is None else labels
        zca, set_of = zca or images.zca, images.dataset
        images = images.images
    if ipc is not None and ipc < 1:
        raise ValueError(f"ipc must be >= 1 (images shown per class), got {ipc}")
    data = _as_dataset(dataset, zca)
    if set_of and dataset_key(set_of) != dataset_key(data.name):
        raise ValueError(f"the set is of {set_of}, not {data.name}: pass its own dataset")
    if images.shape[1] != data.channels:
        raise ValueError(f"the images have {images.shape[1]} channels but {data.name} images {data.channels}: pass "
                         "the dataset they are of")
    names = list(class_names or data.class_names)
    if len(names) < data.num_classes:
        raise ValueError(f"{len(names)} class names for {data.num_classes} classes")
    labels = _class_labels(labels, len(images), data.num_classes, ipc)
    pixels = display_pixels(images, data, clip=clip)
    per_class = {c: (labels == c).nonzero().flatten().tolist()[:ipc] for c in labels.unique().tolist()}
    shown = max(len(v) for v in per_class.values())
    title = title or f"Synthetic images ({shown} per class)"
    if shown == 1:
        fig = _one_per_class(pixels, {c: v[0] for c, v in per_class.items()}, names, title)
    else:
        fig = _rows_per_class(pixels, per_class, names, title)
    return _save(fig, path)


def _one_per_class(pixels: Tensor, index: dict[int, int], names: list[str], title: str) -> Figure:
    cols = min(10, len(index))
    rows = math.ceil(len(index) / cols)
    cell = 1.0 if rows <= 4 else max(0.5, 12 / rows)
    fig = _figure(cols * cell + 0.2, rows * (cell + 0.22) + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, (c, i) in zip(axes, index.items()):
        _show(ax, _mosaic(pixels, [[i]]).image)
        ax.set_title(names[c], fontsize=_label_size(cell * 1.2), pad=2)
    for ax in axes[len(index):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def _rows_per_class(pixels: Tensor, per_class: dict[int, list[int]], names: list[str], title: str) -> Figure:
    rows, cols = len(per_class), max(len(v) for v in per_class.values())
    mosaic = _mosaic(pixels, list(per_class.values()))
    cell = float(np.clip(min(0.6, 14 / cols, 20 / rows), 0.12, None))
    label_width = _text_width([names[c] for c in per_class], _label_size(cell))
    fig = _figure(max(4.0, cols * cell + label_width + 0.3), rows * cell + 0.5)  # room for the title
    ax = fig.add_subplot()
    _show(ax, mosaic.image)
    ax.set_yticks([mosaic.centre(r, 0) for r in range(rows)], [names[c] for c in per_class],
                  fontsize=_label_size(cell))
    ax.tick_params(axis="y", length=0)
    ax.set_title(title)
    return fig


def _run_synthetic(run_dir: PathLike) -> SyntheticSet | None:
    """The run's final synthetic set, or None while the run is still going."""
    path = Path(run_dir) / FINAL_SYNTHETIC
    return SyntheticSet.load(path) if path.is_file() else None


def _run_config(run_dir: PathLike) -> dict[str, Any]:
    path = Path(run_dir) / RUN_CONFIG
    return read_json(path, f"put back the {RUN_CONFIG} the run wrote") if path.is_file() else {}


def _snapshots(run_dir: PathLike) -> list[tuple[int, Tensor]]:
    snapshots = load_snapshots(run_dir)
    if not snapshots:
        raise FileNotFoundError(f"no snapshots in {Path(run_dir) / SNAPSHOTS}: is {run_dir} a distillation run "
                                "folder (mtt.distill writes snapshots every `snapshot_every` iterations)?")
    return snapshots


def _run_space(run_dir: PathLike, dataset: Dataset | DatasetSpec | str, num_images: int) -> tuple[Dataset, Tensor]:
    """The dataset to denormalise a run's images with (the run's own ZCA when it saved one) and their labels."""
    synthetic = _run_synthetic(run_dir)
    data = _as_dataset(dataset, synthetic.zca if synthetic else None)
    if data.zca is None and _run_config(run_dir).get("zca"):  # no final set yet to bring the run's ZCA
        raise ValueError(f"{run_dir} distils in ZCA-whitened space and holds no {FINAL_SYNTHETIC} yet: pass its "
                         f"dataset loaded with ZCA (load_dataset({data.name!r}, zca=True)) to show its images")
    # distill lays the images out class by class; the final set confirms it once written
    labels = synthetic.labels if synthetic else _class_labels(None, num_images, data.num_classes, None)
    return data, labels


def _every_kth(snapshots: list[tuple[int, Tensor]], most: int) -> list[tuple[int, Tensor]]:
    """At most `most` snapshots, evenly spaced (every k-th, not rounded picks that skip unevenly), the last included:
    it may follow the one before sooner than k, as the final snapshot of a run can."""
    if most == 1:
        return snapshots[-1:]
    stride = math.ceil((len(snapshots) - 1) / (most - 1)) or 1
    picks = list(range(0, len(snapshots), stride))  # fewer than `most` whenever the last is not among them
    if picks[-1] != len(snapshots) - 1:
        picks.append(len(snapshots) - 1)
    return [snapshots[i] for i in picks]


def image_evolution(run_dir: PathLike, dataset: Dataset | DatasetSpec | str, classes: Sequence[int] | None = None,
                    max_columns: int = 8, path: PathLike | None = None, *, clip: float | None = 2.5) -> Figure:
    """The first image of each class (rows; default the first 10 classes) across snapshot iterations
    (columns: at most `max_columns`, every k-th snapshot so that the spacing is even, the last one included)."""
    if max_columns < 1:
        raise ValueError(f"max_columns must be >= 1, got {max_columns}")
    snapshots = _snapshots(run_dir)
    data, labels = _run_space(run_dir, dataset, len(snapshots[0][1]))
    classes = list(range(min(data.num_classes, 10)) if classes is None else classes)
    missing = [c for c in classes if not (labels == c).any()]
    if missing:
        raise ValueError(f"the run has no synthetic image of class(es) {missing}")
    rows = [int((labels == c).nonzero()[0]) for c in classes]
    columns = _every_kth(snapshots, max_columns)
    pixels = torch.cat([display_pixels(images, data, clip=clip)[rows] for _, images in columns])
    mosaic = _mosaic(pixels, [[c * len(rows) + r for c in range(len(columns))] for r in range(len(rows))])

    cell = float(np.clip(min(0.8, 14 / len(columns), 14 / len(rows)), 0.25, None))
    label_width = _text_width([data.class_names[c] for c in classes], _label_size(cell))
    fig = _figure(max(4.0, len(columns) * cell + label_width + 0.4), len(rows) * cell + 0.9)
    ax = fig.add_subplot()
    _show(ax, mosaic.image)
    ax.set_yticks([mosaic.centre(r, 0) for r in range(len(rows))], [data.class_names[c] for c in classes],
                  fontsize=_label_size(cell))
    ax.set_xticks([mosaic.centre(c, 1) for c in range(len(columns))], [str(it) for it, _ in columns],
                  fontsize=_label_size(cell))
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("iteration")
    ax.tick_params(length=0)
    several = int(torch.bincount(labels).max()) > 1
    ax.set_title("Synthetic images over distillation" + (" (the first of each class)" if several else ""), pad=4)
    return _save(fig, path)


def evolution_gif(run_dir: PathLike, dataset: Dataset | DatasetSpec | str, path: PathLike, fps: float = 4, *,
                  clip: float | None = 2.5, dpi: int = 100) -> Path:
    """An animated GIF of the whole synthetic set, one frame per snapshot (the last one held longer)."""
    from PIL import Image

    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    snapshots = _snapshots(run_dir)
    data, labels = _run_space(run_dir, dataset, len(snapshots[0][1]))
    frames = []
    for iteration, images in snapshots:
        fig = image_grid(images, data, labels, clip=clip, title=f"iteration {iteration}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        frames.append(Image.open(buffer).convert("RGB"))
    frame_ms = round(1000 / fps)
    durations = [frame_ms] * (len(frames) - 1) + [4 * frame_ms]
    return atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                         duration=durations, loop=0))


# ----------------------------------------------------------------------------- training curves

def load_history(history_or_run_dir: Mapping[str, Any] | PathLike) -> dict[str, Any]:
    """A run's history: a dict as is, a history.json, or a run folder.

    In a run folder, its history.json: a run writes it with every checkpoint, so a run still
    going, or resumed for more iterations, shows its latest state. The checkpoint holds the same
    history and stands in where history.json is missing.
    """
    if isinstance(history_or_run_dir, Mapping):
        return dict(history_or_run_dir)
    source = Path(history_or_run_dir)
    if source.is_file():
        return read_json(source, f"a run's {CHECKPOINT} holds its history too: pass the run folder")
    if (source / HISTORY).is_file():
        return read_json(source / HISTORY, f"delete it, and the history that the run's {CHECKPOINT} holds is read")
    if not (source / CHECKPOINT).is_file():
        raise FileNotFoundError(f"no history.json or {CHECKPOINT} in {source}: not a distillation run folder")
    with safe_open(str(source / CHECKPOINT), "pt") as f:
        return json.loads(f.metadata()["history"])


def _note(ax, text: str) -> None:
    """Say why a panel is empty, instead of showing bare axes."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color=GREY)
    ax.tick_params(labelbottom=False, labelleft=False, length=0)  # not set_xticks: the x axis is shared


def _loss_panel(ax, loss: np.ndarray) -> None:
    ax.set_title("Matching loss")
    ax.set_ylabel(r"$\|\theta_N-\theta^*\|^2 \;/\; \|\theta_0-\theta^*\|^2$")
    if not len(loss):
        return _note(ax, "no iterations yet")
    steps = np.arange(len(loss))
    ax.plot(steps, loss, color=SKY, lw=0.8, alpha=0.8, label="per iteration")
    window = min(len(loss), max(3, len(loss) // 20))
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color=BLUE, lw=2, label=f"mean of last {window}")
    if loss.min() > 0 and loss.max() / loss.min() > 20:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def _lr_panel(ax, syn_lr: np.ndarray) -> None:
    ax.set_title(r"Learned step size $\alpha$")
    ax.set_ylabel(r"$\alpha$")
    if not len(syn_lr):
        return _note(ax, "no iterations yet")
    ax.plot(np.arange(len(syn_lr)), syn_lr, color=VERMILLION, lw=1.5)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def _accuracy_panel(ax, evals: list[dict[str, Any]]) -> None:
    ax.set_title("Evaluation accuracy")
    ax.set_ylabel("test accuracy (%)")
    if not evals:
        return _note(ax, "no evaluations recorded")
    its = [e["iteration"] for e in evals]
    means = np.array([e["mean"] for e in evals])
    ax.errorbar(its, means, yerr=[e.get("std", 0) for e in evals], color=GREEN, marker="o", ms=4, capsize=3,
                lw=1.5, label="mean $\\pm$ std")
    best = int(means.argmax())
    at_an_end = {0: "left", len(its) - 1: "right"} if len(its) > 1 else {}  # kept inside the axes
    ax.annotate(f"best {means[best]:.1f}", (its[best], means[best]), textcoords="offset points", xytext=(0, 8),
                ha=at_an_end.get(best, "center"), fontsize=8)
    ax.legend(fontsize=8, loc="lower right")
    ax.margins(y=0.15)  # room for the "best" label


def training_curves(history_or_run_dir: Mapping[str, Any] | PathLike, path: PathLike | None = None, *,
                    title: str | None = None) -> Figure:
    """Three panels against iteration: matching loss (raw and smoothed), learned step size, and
    evaluation accuracy (mean +- std over the evaluation runs)."""
    history = load_history(history_or_run_dir)
    fig = _figure(13, 3.6)
    axes = fig.subplots(1, 3, sharex=True)  # one iteration axis, even with a single evaluation
    _loss_panel(axes[0], np.asarray(history.get("loss", []), dtype=float))
    _lr_panel(axes[1], np.asarray(history.get("syn_lr", []), dtype=float))
    _accuracy_panel(axes[2], history.get("evals", []))
    for ax in axes:
        ax.set_xlabel("iteration")
        if ax.has_data():
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# ----------------------------------------------------------------------------- the experts

def matched_epochs(run: DistillConfig | PathLike) -> tuple[int, int] | None:
    """The expert epochs a run matches (its config, or its folder's config.json): from its lowest start epoch to its
    highest target (starts from [min_start_epoch, max_start_epoch), targets expert_epochs later); None where a
    folder has no config."""
    config = asdict(run) if isinstance(run, DistillConfig) else _run_config(run)
    if not {"max_start_epoch", "expert_epochs"} <= config.keys():
        return None
    return config.get("min_start_epoch", 0), config["max_start_epoch"] - 1 + config["expert_epochs"]


def expert_accuracy(buffers: ExpertBuffers, run: DistillConfig | PathLike | None = None,
                    path: PathLike | None = None) -> Figure:
    """Each expert's test accuracy after every epoch (thin lines) and their mean, with the epochs a run matches
    shaded (given its config or folder: before it starts, or after): whether the experts learned, and where in
    their training the synthetic set learns from. Experts that recorded no accuracy (the original's files) are
    said so."""
    fig = _figure(6.5, 3.6)
    ax = fig.subplots()
    ax.set(title=f"{len(buffers)} experts' test accuracy", xlabel="expert epoch", ylabel="test accuracy (%)")
    curves = [100 * acc.double().numpy() for acc in buffers.recorded_test_acc()]
    if not curves:
        _note(ax, "these experts recorded no test accuracy")
        return _save(fig, path)
    for curve in curves:
        ax.plot(np.arange(1, len(curve) + 1), curve, color=SKY, lw=0.6, alpha=0.5)
    mean = np.mean(curves, axis=0)  # one length: the experts of one set trained as many epochs
    ax.plot(np.arange(1, len(mean) + 1), mean, color=BLUE, lw=2, label="mean")
    ax.axhline(100 / buffers.meta.num_classes, color=GREY, ls="--", lw=1, label="chance")
    window = matched_epochs(run) if run is not None else None
    if window is not None:
        ax.axvspan(*window, color=ORANGE, alpha=0.2, lw=0, label=f"matched by the run: epochs {window[0]}-{window[1]}")
    ax.set_xlim(0, len(mean))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


# ----------------------------------------------------------------------------- PCA of trajectories

@dataclass
class TrajectoryPCA:
    """A PCA fitted on expert snapshots, and those experts' trajectories in its coordinates.

    With `origins` set, every expert is placed relative to its own initialisation: experts
    start far apart (random inits) and move little, so without this the PCA mostly shows
    the distance between their starting points and each trajectory shrinks to a dot.
    """

    pca: Any                               # a fitted sklearn.decomposition.PCA
    experts: list[int]                     # buffer indices of the experts shown
    paths: list[np.ndarray]                # per expert, [epochs+1, dims]
    origins: dict[int, np.ndarray] | None  # expert -> its epoch-0 snapshot [P], when relative

    @property
    def dims(self) -> int:
        return int(self.pca.n_components_)

    def transform(self, params: Tensor | np.ndarray, expert: int | None = None) -> np.ndarray:
        """Flat parameter vectors [n, P] (or one [P]) of `expert`'s run -> coordinates [n, dims]."""
        if isinstance(params, Tensor):
            params = params.detach().cpu().numpy()
        params = np.atleast_2d(np.asarray(params, dtype=np.float32))
        if self.origins is not None:
            if expert not in self.origins:
                raise ValueError(f"this PCA places each expert relative to its own initialisation: pass expert= "
                                 f"(one of {list(self.origins)}), or fit it with relative=False")
            params = params - self.origins[expert]
        return self.pca.transform(params)

    def axis_label(self, i: int) -> str:
        return f"PC{i + 1} ({100 * self.pca.explained_variance_ratio_[i]:.3g}% of variance)"


def fit_trajectory_pca(buffers: ExpertBuffers, experts: Sequence[int] | None = None, dims: int = 2,
                       relative: bool = True, max_fit_experts: int = 5, seed: int = 0) -> TrajectoryPCA:
    """PCA on the snapshots [k * (epochs+1), P] of the first `max_fit_experts` of `experts`
    (default: the first 3 in the buffer); every expert in `experts` is then projected.

    relative: subtract each expert's initialisation first (see TrajectoryPCA). The
    randomised solver keeps the fit quick with P in the hundreds of thousands; the memory it
    needs is that of the fitted snapshots (5 CIFAR-10 ConvNet experts of 50 epochs: 330 MB).
    """
    from sklearn.decomposition import PCA

    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    experts = list(range(min(len(buffers), 3)) if experts is None else dict.fromkeys(experts))
    if not experts:
        raise ValueError("no experts to fit the PCA on")

    def snapshots_of(e: int) -> np.ndarray:  # [epochs+1, P], read when needed to bound memory
        trajectory = buffers.trajectory(e).float().numpy()
        return trajectory - trajectory[:1] if relative else trajectory

    fitted = {e: snapshots_of(e) for e in experts[:max_fit_experts]}
    stacked = np.concatenate(list(fitted.values()))
    if len(stacked) <= dims:
        raise ValueError(f"{len(stacked)} snapshots are too few for a {dims}-component PCA: use more experts")
    pca = PCA(n_components=dims, svd_solver="randomized", random_state=seed).fit(stacked)
    paths = [pca.transform(fitted[e] if e in fitted else snapshots_of(e)) for e in experts]
    origins = {e: buffers.snapshot(e, 0).float().numpy() for e in experts} if relative else None
    return TrajectoryPCA(pca, experts, paths, origins)


@dataclass
class StudentPath:
    """A student's parameters along its unroll from an expert checkpoint, and what it aims at."""

    params: Tensor     # [syn_steps + 1, P]; params[0] is the expert's snapshot at start_epoch
    expert: int
    start_epoch: int
    target_epoch: int  # start_epoch + expert_epochs
    loss: float        # the matching loss of this unroll, ||theta_N - target||^2 / ||theta_0 - target||^2


def _load_synthetic(source: SyntheticSet | PathLike) -> SyntheticSet:
    if isinstance(source, SyntheticSet):
        return source
    path = Path(source)
    return SyntheticSet.load(path / FINAL_SYNTHETIC if path.is_dir() else path)


def student_paths_for(run_dir_or_synthetic: SyntheticSet | PathLike, buffers: ExpertBuffers, dataset: Dataset,
                      expert: int, start_epoch: int, syn_steps: int | None = None, seed: int = 0,
                      device: DeviceLike = "cpu") -> StudentPath:
    """Unroll a student on the distilled images from expert `expert`'s checkpoint `start_epoch`.

    The network, syn_steps (unless given), batch_syn, DSA and expert_epochs come from the
    set's distillation config, the step size is its learned syn_lr (the experts' lr if it
    has none), and `seed` draws the minibatches and augmentations. Pass the result to
    trajectory_pca(student_paths=[...]) to see where the student lands against the target.
    """
    if not isinstance(run_dir_or_synthetic, SyntheticSet) and Path(run_dir_or_synthetic).is_dir():
        check_distilled_from(run_dir_or_synthetic, buffers)
    synthetic = _load_synthetic(run_dir_or_synthetic)
    config, meta = synthetic.config, buffers.meta
    if tuple(synthetic.images.shape[1:]) != (dataset.channels, *dataset.im_size):
        raise ValueError(f"the synthetic images are {tuple(synthetic.images.shape[1:])} but {dataset.name} "
                         f"images are {(dataset.channels, *dataset.im_size)}")
    if meta.zca != (synthetic.zca is not None):
        distilled = "with" if synthetic.zca is not None else "without"
        raise ValueError(f"the experts were trained {'with' if meta.zca else 'without'} ZCA, the set distilled "
                         f"{distilled}: pass the experts it was distilled from")
    target_epoch = start_epoch + config.get("expert_epochs", 2)
    if not 0 <= start_epoch < target_epoch <= meta.epochs:
        raise ValueError(f"start epoch {start_epoch} + expert_epochs {target_epoch - start_epoch} must lie within "
                         f"the experts' {meta.epochs} epochs")
    net = get_network(meta.model, dataset.channels, dataset.num_classes, dataset.im_size, synthetic.width,
                      synthetic.depth)
    try:
        meta.check_network(net)
    except ValueError as err:  # the network is the set's own: it is the experts that differ
        raise ValueError(f"these are not the experts the set was distilled through ({err.args[0].split('; ')[0]}):"
                         " pass the experts it was distilled from") from None
    device = resolve_device(device)
    images = synthetic.images.to(device)
    steps = config.get("syn_steps", 20) if syn_steps is None else syn_steps
    if steps < 1:
        raise ValueError(f"syn_steps must be >= 1, got {steps}")
    plans = plan_steps(len(images), steps, config.get("batch_syn"),
                       tuple(images.shape[1:]), config.get("dsa", DEFAULT_STRATEGY),
                       torch.Generator().manual_seed(seed), device)
    soft = synthetic.label_logits is not None
    params = student_path(Student(net.to(device)), buffers.snapshot(expert, start_epoch).to(device), images,
                          synthetic.syn_lr if synthetic.syn_lr is not None else meta.lr, plans,
                          labels=None if soft else synthetic.labels.to(device),
                          label_logits=synthetic.label_logits.to(device) if soft else None).cpu()
    target = buffers.snapshot(expert, target_epoch)
    loss = float((params[-1] - target).pow(2).sum() / (params[0] - target).pow(2).sum())
    return StudentPath(params, expert, start_epoch, target_epoch, loss)


def _mark(ax, points: np.ndarray, **style) -> None:
    """Plot points [n, dims] on a 2D or 3D axis."""
    ax.plot(*points.T, **style)


def _view_that_shows(ax, paths: Sequence[tuple[np.ndarray, ...]]) -> tuple[float, float]:
    """(elevation, azimuth) of the 3D view that foreshortens the worst-shown path least: a path running along the
    line of sight shows as a stub. Lengths in the axes' box, where matplotlib scales each axis to its limits."""
    box = np.asarray(ax.get_box_aspect(), dtype=float)
    low, high = (np.array(bounds) for bounds in zip(ax.get_xlim3d(), ax.get_ylim3d(), ax.get_zlim3d()))
    steps = [np.diff((np.stack(path, axis=1) - low) / (high - low) * box, axis=0) for path in paths if len(path[0]) > 1]
    steps = [s for s in steps if np.linalg.norm(s, axis=1).sum() > 0]

    def shown(view: tuple[float, float]) -> float:
        elev, azim = np.radians(view)
        eye = np.array([np.cos(elev) * np.cos(azim), np.cos(elev) * np.sin(azim), np.sin(elev)])
        return min((np.linalg.norm(s - np.outer(s @ eye, eye), axis=1).sum() / np.linalg.norm(s, axis=1).sum()
                    for s in steps), default=1.0)

    # Oblique views only (none along an axis, which would hide that component): matplotlib's default first.
    views = [(30.0, -60.0)] + [(elev, azim) for elev in (20.0, 30.0)
                               for azim in (-150, -120, -60, -30, 30, 60, 120, 150)]
    return max(views, key=shown)  # the first of the best


def trajectory_pca(buffers: ExpertBuffers, experts: Sequence[int] | None = None,
                   student_paths: Sequence[StudentPath | Tensor] = (), dims: int = 2,
                   path: PathLike | None = None, *, relative: bool = True, pca: TrajectoryPCA | None = None,
                   title: str | None = None) -> Figure:
    """Expert trajectories in the plane (or space, dims=3) of their top principal components, with
    students' unrolled paths projected on the same PCA on top, and the expert snapshot each aims at.

    experts defaults to the students' experts, else the first 3. relative: each expert drawn
    from its own initialisation (see TrajectoryPCA); a plain tensor path then cannot be
    placed, pass a StudentPath. Pass `pca` (fit_trajectory_pca) to reuse a fit.
    """
    students = [s if isinstance(s, StudentPath) else None for s in student_paths]
    if experts is None and any(students):
        experts = [s.expert for s in students if s]
    pca = pca or fit_trajectory_pca(buffers, experts, dims, relative)
    three_d = pca.dims == 3
    fig = _figure(8.8, 6) if three_d else _figure(9.6, 5.4)
    ax = fig.add_subplot(projection="3d" if three_d else None)
    for k, (expert, points) in enumerate(zip(pca.experts, pca.paths)):
        colour = EXPERT_COLOURS[k % len(EXPERT_COLOURS)]
        _mark(ax, points, color=colour, lw=1.5, marker="o", ms=3, label=f"expert {expert}")
        _mark(ax, points[:1], ls="", marker="o", ms=9, mfc="white", mec=colour, mew=2)
        _mark(ax, points[-1:], ls="", marker="s", ms=8, color=colour, mec="black")
    handles = ax.get_legend_handles_labels()[0] + [
        Line2D([], [], ls="", marker="o", ms=8, mfc="white", mec=GREY, mew=2, label="epoch 0"),
        Line2D([], [], ls="", marker="s", ms=7, color=GREY, mec="black", label=f"epoch {buffers.meta.epochs}")]

    for raw, student in zip(student_paths, students):
        if student and student.expert not in pca.experts:
            raise ValueError(f"a student path starts from expert {student.expert}, which the PCA was not fitted on "
                             f"(experts {list(pca.experts)}): include it in experts=")
        points = pca.transform(student.params if student else raw, student.expert if student else None)
        _mark(ax, points, color=STUDENT_COLOUR, lw=1.8, ls="--", marker=".", ms=5, zorder=3)
        _mark(ax, points[-1:], ls="", marker="X", ms=10, color=STUDENT_COLOUR, mec="black", zorder=4)
        label = "student"
        if student:
            label += f" from expert {student.expert}, epoch {student.start_epoch} (loss {student.loss:.2f})"
            target = pca.transform(buffers.snapshot(student.expert, student.target_epoch), student.expert)
            _mark(ax, target, ls="", marker="*", ms=18, mfc="none", mec=STUDENT_COLOUR, mew=1.5, zorder=4)
            handles.append(Line2D([], [], ls="", marker="*", ms=14, mfc="none", mec=STUDENT_COLOUR, mew=1.5,
                                  label=f"its target: epoch {student.target_epoch}"))
        handles.append(Line2D([], [], color=STUDENT_COLOUR, lw=1.8, ls="--", marker="X", ms=8, mec="black",
                              label=label))

    pad = 12 if three_d else None  # 3D: clear of the long tick labels of small values
    ax.set_xlabel(pca.axis_label(0), labelpad=pad)
    ax.set_ylabel(pca.axis_label(1), labelpad=pad)
    if three_d:
        ax.set_zlabel(pca.axis_label(2), labelpad=pad + 2)
        ax.set_box_aspect(None, zoom=0.82)  # keeps the axis labels inside the figure, from every view below
        ax.view_init(*_view_that_shows(ax, [line.get_data_3d() for line in ax.lines]))
    else:
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    one = len(pca.experts) == 1
    where = ("in parameter space" if pca.origins is None else
             "from its initialisation" if one else "from their initialisations")
    noun = "expert" if one else "experts"
    ax.set_title(title or f"{buffers.meta.model} {noun} on {buffers.meta.dataset} {where} (PCA)")
    return _save(fig, path)


# ----------------------------------------------------------------------------- evaluation

def cross_arch_bars(results: Mapping[str, Any], paper: Mapping[str, float] | None = None,
                    path: PathLike | None = None, title: str = "Cross-architecture evaluation", *,
                    label: str = "ours", chance: float | None = None) -> Figure:
    """Accuracy per architecture, `results` (named `label`) with std error bars (EvalResults, {"mean", "std"}
    dicts, (mean, std) pairs or numbers), the paper's beside it, and a dashed line at `chance` (%) if given."""
    if not results:
        raise ValueError("no results to draw")
    models = list(results)
    means, stds = zip(*(mean_and_std(results[m]) for m in models))
    fig = _figure(1.4 * len(models) + 2.5, 3.8)
    ax = fig.add_subplot()
    width = 0.38 if paper else 0.6
    xs = range(len(models))
    positions = [x - width / 2 if paper else x for x in xs]
    spreads = [0.0 if s is None else s for s in stds]
    ax.bar(positions, means, width, yerr=[float("nan") if s is None else s for s in stds], capsize=3, label=label,
           color=BLUE)
    _value_labels(ax, positions, means, [m + s for m, s in zip(means, spreads)])
    known = [(x + width / 2, paper[m]) for x, m in zip(xs, models) if paper and paper.get(m) is not None]
    if known:
        ax.bar(*zip(*known), width, label="paper", color=ORANGE)
        _value_labels(ax, *zip(*known), [acc for _, acc in known])
    if chance is not None:
        ax.axhline(chance, color=GREY, ls="--", lw=1, label=f"chance ({chance:.3g} %)")
    ax.set_xticks(list(xs), models, rotation=20 if len(models) > 5 else 0)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, min(100, max([*(m + s for m, s in zip(means, spreads)), *(acc for _, acc in known)]) * 1.18 + 2))
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _value_labels(ax, xs: Sequence[float], values: Sequence[float], tops: Sequence[float]) -> None:
    """Each bar's value just above `tops` (its error bar's cap, where it has one), not on the cap."""
    for x, value, top in zip(xs, values, tops):
        ax.annotate(f"{value:.1f}", (x, top), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    fontsize=8)


def run_figures(run_dir: PathLike, synthetic: SyntheticSet, dataset: Dataset | DatasetSpec | str, out_dir: PathLike,
                buffers: ExpertBuffers | None = None, suffix: str = ".png", seed: int = 0,
                device: DeviceLike = "cpu") -> Iterator[Path]:
    """A run's figures, as `python -m mtt plot` and the demo save them into out_dir: synthetic (the set), evolution
    (its images over the snapshots), curves (loss, step size, accuracy) and, given the experts, experts (their test
    accuracy, the epochs matched shaded) and trajectories (their PCA, with a student trained on the set from expert
    0's start; `dataset` must then be a loaded Dataset). Yields
    each path once its figure is saved, so that a failure (a full disk) leaves those before it known."""
    figures = {"synthetic": lambda path: image_grid(synthetic, dataset, path=path)}
    if load_snapshots(run_dir):
        figures["evolution"] = lambda path: image_evolution(run_dir, dataset, path=path)
    figures["curves"] = lambda path: training_curves(run_dir, path=path)
    if buffers is not None:
        figures["experts"] = lambda path: expert_accuracy(buffers, run_dir, path=path)
        figures["trajectories"] = lambda path: trajectory_pca(buffers, experts=[0], student_paths=[
            student_paths_for(synthetic, buffers, dataset, expert=0, start_epoch=0, seed=seed, device=device)],
            path=path)
    for name, draw in figures.items():
        draw(path := Path(out_dir) / f"{name}{suffix}")
        yield path
