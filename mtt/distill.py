"""The MTT optimisation loop: learn synthetic images and a step size by matching expert trajectories.

Each iteration draws `segments` (expert, start epoch t) pairs, t from [min_start_epoch, max_start_epoch) (DATM
widens it as the run goes), unrolls the student from each expert's checkpoint t for `syn_steps` SGD steps on the
synthetic set (mtt.unroll), and moves the images, the step size (and the label logits, when they are learned) down
the gradient of the normalised distance to checkpoint t + expert_epochs, averaged over the segments, with SGD
(momentum 0.5) as the paper.

Everything needed to continue is checkpointed atomically (the learned variables and their momenta, the labels,
the generator, the iteration, the history, FTD's EMA, TESLA's teacher labels, `auto`'s choice), so a killed run
resumes exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm.auto import tqdm

from mtt import __version__
from mtt.augment import DEFAULT_STRATEGY, parse_strategy
from mtt.buffers import ExpertBuffers, holds_experts
from mtt.data import Dataset, check_same_space, dataset_key
from mtt.device import out_of_memory_reason, resolve_device
from mtt.distributed import Ranks, ranks
from mtt.interrupt import GracefulStop, Interrupted, graceful_stop
from mtt.io import atomic_save_safetensors, atomic_write_json, held_folder, load_safetensors
from mtt.initialise import (correctly_classified_images, experts_label_logits, first_expert_label_logits,
                            teacher_logits)
from mtt.networks import check_network_name, get_network
from mtt.recipes import METHODS, apply_recipe
from mtt.seeds import check_seed
from mtt.synthetic import MAX_DEPTH, MAX_WIDTH, SyntheticSet
from mtt.unroll import (APPROXIMATE_MODES, BACKWARD_MODES, MATCH_MODES, BackwardChoice, StepPlan, Student, UnrollResult,
                        backward_name, checkpointed_after_out_of_memory, choose_backward, full_graph_bytes,
                        plan_steps, shallow_layer_mask, unroll)


COMPILE_BACKEND = "inductor"  # torch.compile's backend with compile=True (tests swap in one that generates no code)


class DistillationDiverged(ValueError):
    """The matching loss or the learned step size went bad; the last good state is saved."""


class OutOfMemory(ValueError):
    """An iteration did not fit in the device's memory; the state before it is saved."""


class EvaluationFailed(ValueError):
    """Evaluating the set during a run failed (its networks diverged, or did not fit); the state is saved."""


# ----------------------------------------------------------------------------- config

@dataclass
class DistillConfig:
    dataset: str
    ipc: int
    model: str = "ConvNet"
    width: int = 128
    depth: int = 3
    zca: bool = False
    syn_steps: int = 20          # N: student steps per iteration
    expert_epochs: int = 2       # M: target = expert checkpoint t + M
    max_start_epoch: int = 20    # T: t drawn uniformly from [0, T)
    segments: int = 1            # K (expert, start) segments per iteration, unrolled together; gradients averaged
    batch_syn: int | None = None  # minibatch of synthetic images per student step; None = all
    lr_img: float = 1000.0
    lr_lr: float = 1e-5
    lr_teacher: float = 0.01     # the step size alpha starts here
    soft_labels: bool = False    # learn label logits (TESLA/DATM); off in the paper presets
    lr_labels: float = 10.0
    init: str = "real"           # "real": random real images of each class; "noise": N(0, 1);
                                 # "correct": real images the experts classify correctly (DATM)
    dsa: str = DEFAULT_STRATEGY
    iterations: int = 5000
    backward: str = "auto"       # "full" or "checkpointed" (both exact), "auto": the faster that fits, measured
                                 # (full not fitting: checkpointed keeping the step graphs that fit);
                                 # "tesla": TESLA's constant-memory backward, APPROXIMATE (no Hessian term)
    compile: bool = False        # torch.compile the student's steps, in any backward mode (a GPU's speed, a
                                 # minute or more to compile; "auto" times both modes compiled and eager and
                                 # keeps the fastest)
    match: str = "final"         # matching loss at step N; "closest": at the step closest to the target (ATT)
    pad_fraction: float = 0.0    # PAD: share of the shallow layers' parameters the matching loss ignores
    # The successors' options (mtt/recipes.py switches them on by --method); all off in plain MTT.
    method: str = "mtt"          # the recipe these settings started from (recorded; the fields below act)
    min_start_epoch: int = 0     # DATM: start epochs are drawn from [min_start_epoch, upper), where upper is
    current_max_start_epoch: int | None = None  # max_start_epoch, or (DATM) grows from this value ...
    expansion_end: int = 1000    # ... linearly to max_start_epoch by this iteration
    loss_threshold: float | None = None  # DATM: an iteration whose matching loss exceeds this changes nothing
    label_init: str = "onehot"   # soft labels start "onehot" (0.9 on the class), "experts" or "first-expert" (DATM)
    label_momentum: float = 0.5  # SGD momentum of the learned label logits (DATM: 0.9)
    teacher_labels: bool = False  # TESLA: soft targets = the target checkpoint's logits, recomputed, not learned
    ema_decay: float = 0.0       # FTD: keep an EMA of the images, which is what is evaluated and saved; 0 = off
    seed: int = 0                # in [0, 65536): the run's draws; evaluation network j: stream j (mtt.seeds)
    device: str = "auto"
    eval_every: int = 500        # 0 = only at the end (and never when eval_repeats is 0, unless given an evaluator)
    eval_repeats: int = 5
    eval_epochs: int = 1000
    checkpoint_every: int = 100
    snapshot_every: int = 100

    def __post_init__(self) -> None:
        self.dataset = dataset_key(self.dataset)  # 'CIFAR-10' is cifar10, for the recipes' tables and the experts

    def validate(self) -> None:
        positive = ["ipc", "syn_steps", "expert_epochs", "max_start_epoch", "segments", "iterations",
                    "checkpoint_every", "snapshot_every", "width", "depth"]
        for name in positive + ["seed", "min_start_epoch", "eval_every", "eval_repeats", "eval_epochs"]:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):  # 2.5 steps would fail deep inside torch
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, most in (("width", MAX_WIDTH), ("depth", MAX_DEPTH)):  # what a saved set may say (SyntheticSet)
            if getattr(self, name) > most:
                raise ValueError(f"{name} must be at most {most}, got {getattr(self, name)}")
        for name in ["lr_img", "lr_lr", "lr_teacher", "lr_labels"]:
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be > 0 and finite, got {getattr(self, name)}")
        if self.batch_syn is not None and self.batch_syn < 1:
            raise ValueError(f"batch_syn must be >= 1 or None (the whole set), got {self.batch_syn}")
        if self.backward not in BACKWARD_MODES + APPROXIMATE_MODES:
            raise ValueError(f"backward must be one of {BACKWARD_MODES + APPROXIMATE_MODES}, got {self.backward!r}")
        if self.match not in MATCH_MODES:
            raise ValueError(f"match must be one of {MATCH_MODES}, got {self.match!r}")
        if not 0 <= self.pad_fraction < 1:
            raise ValueError(f"pad_fraction must be in [0, 1), got {self.pad_fraction!r}")
        check_network_name(self.model)  # before the experts are opened, which would call it a mismatch
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        self._validate_successors()
        if self.eval_every < 0 or self.eval_repeats < 0 or self.eval_epochs < 1:
            raise ValueError("eval_every and eval_repeats must be >= 0 and eval_epochs >= 1")
        check_seed(self.seed)  # it numbers the evaluation networks' streams
        for name in ("zca", "soft_labels", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        parse_strategy(self.dsa)

    def _validate_successors(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0 <= self.min_start_epoch < self.max_start_epoch:
            raise ValueError(f"min_start_epoch must be in [0, max_start_epoch={self.max_start_epoch}), "
                             f"got {self.min_start_epoch}")
        if self.current_max_start_epoch is not None and not (
                self.min_start_epoch < self.current_max_start_epoch <= self.max_start_epoch):
            raise ValueError(f"current_max_start_epoch must be in (min_start_epoch={self.min_start_epoch}, "
                             f"max_start_epoch={self.max_start_epoch}], got {self.current_max_start_epoch}")
        if self.expansion_end < 1:
            raise ValueError(f"expansion_end must be >= 1, got {self.expansion_end}")
        if self.loss_threshold is not None and not self.loss_threshold > 0:
            raise ValueError(f"loss_threshold must be > 0 or None (off), got {self.loss_threshold!r}")
        if self.label_init not in LABEL_INITS:
            raise ValueError(f"label_init must be one of {LABEL_INITS}, got {self.label_init!r}")
        if self.label_init != "onehot" and not self.soft_labels:
            raise ValueError(f"label_init={self.label_init!r} (--label-init; DATM's recipe sets it) initialises "
                             f"learned soft labels, which are off: add --soft-labels, or, to keep the labels "
                             f"fixed, --label-init onehot")
        if self.teacher_labels and self.soft_labels:
            raise ValueError("teacher_labels (TESLA: fixed targets from the expert) and soft_labels (learned "
                             "targets) exclude each other: choose one")
        for name in ("label_momentum", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")


INITS = ("real", "noise", "correct")
LABEL_INITS = ("onehot", "experts", "first-expert")


# (dataset, ipc) -> settings. Paper: the authors' table (DESIGN.md); "full" batch = None.
_PAPER = {
    ("cifar10", 1): dict(syn_steps=50, expert_epochs=2, max_start_epoch=2, zca=True, lr_img=100, lr_lr=1e-7, lr_teacher=0.01),
    ("cifar10", 10): dict(syn_steps=30, expert_epochs=2, max_start_epoch=20, zca=True, lr_img=100, lr_lr=1e-5, lr_teacher=0.001),
    ("cifar10", 50): dict(syn_steps=30, expert_epochs=2, max_start_epoch=40, zca=False, lr_img=1000, lr_lr=1e-5, lr_teacher=0.001),
    ("cifar100", 1): dict(syn_steps=20, expert_epochs=3, max_start_epoch=20, zca=True, lr_img=1000, lr_lr=1e-5, lr_teacher=0.01),
    ("cifar100", 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=20, zca=False, lr_img=1000, lr_lr=1e-5, lr_teacher=0.01),
    ("cifar100", 50): dict(syn_steps=80, expert_epochs=2, max_start_epoch=40, batch_syn=125, zca=True, lr_img=1000, lr_lr=1e-5, lr_teacher=0.01),
    ("tiny-imagenet", 1): dict(model="ConvNetD4", syn_steps=10, expert_epochs=2, max_start_epoch=10, lr_img=1e4, lr_lr=1e-4, lr_teacher=0.01),
    ("tiny-imagenet", 10): dict(model="ConvNetD4", syn_steps=20, expert_epochs=2, max_start_epoch=40, batch_syn=200, lr_img=1e4, lr_lr=1e-4, lr_teacher=0.01),
    ("tiny-imagenet", 50): dict(model="ConvNetD4", syn_steps=20, expert_epochs=2, max_start_epoch=40, batch_syn=300, lr_img=1e4, lr_lr=1e-4, lr_teacher=0.01),
}
# Ours, for the offline datasets: small enough for a CPU (see BENCHMARKS.md for what they give).
_OURS = {
    # 20 student steps overshoot two digits epochs (12 real SGD steps) so far that alpha is
    # driven below zero within a few iterations; 10 steps and lr_lr 1e-6 stay stable.
    ("digits", 1): dict(syn_steps=10, expert_epochs=2, max_start_epoch=5, lr_img=100, lr_lr=1e-6, lr_teacher=0.01,
                        iterations=200, eval_every=100, eval_epochs=300, checkpoint_every=50, snapshot_every=10),
    ("digits", 10): dict(syn_steps=10, expert_epochs=2, max_start_epoch=5, lr_img=100, lr_lr=1e-6, lr_teacher=0.01,
                         iterations=200, eval_every=100, eval_epochs=300, checkpoint_every=50, snapshot_every=10),
    # Full-size Fashion-MNIST (experts on all 60k images, 235 SGD steps an epoch): the CIFAR-10
    # settings without ZCA. IPC 1 checked on a CPU with ConvNet-64 experts (BENCHMARKS.md): starts up to
    # epoch 2, as CIFAR-10's, and lr_img 1000, as its un-whitened IPC 50, give 74.8 % in 100 iterations
    # (lr_img 100: 70.5 %; starts up to epoch 10: 61.7 % in 300). With 3 ConvNet-128 experts: 75.2 %
    # in 100 iterations, 72.0 % in 300 (3 experts, 6 segments: likely overfitted; not isolated).
    # IPC 10 checked likewise (experts of 22 epochs): CIFAR-10's settings give 83.5 % in 100 iterations;
    # IPC 1's changes do not carry over (lr_img 1000: 81.0 %; with starts up to epoch 5 too: 82.2 %).
    ("fashion-mnist", 1): dict(syn_steps=50, expert_epochs=2, max_start_epoch=2, lr_img=1000, lr_lr=1e-7,
                               lr_teacher=0.01),
    ("fashion-mnist", 10): dict(syn_steps=30, expert_epochs=2, max_start_epoch=20, lr_img=100, lr_lr=1e-5,
                                lr_teacher=0.01),
}
PRESETS: dict[tuple[str, int], dict[str, Any]] = {**_PAPER, **_OURS}


def preset(dataset: str, ipc: int, method: str = "mtt", **overrides: Any) -> DistillConfig:
    """The preset for (dataset, ipc) — the paper's where it has one — with `method`'s recipe
    (mtt.recipes: mtt, tesla, ftd, datm, att, pad) and then the overrides applied."""
    if not isinstance(dataset, str) or isinstance(ipc, bool) or not isinstance(ipc, numbers.Integral):
        raise TypeError(f"preset(dataset, ipc) takes a dataset name and an int, got {dataset!r}, {ipc!r}")
    ipc = int(ipc)  # a numpy integer finds its preset and is recorded as a plain int
    dataset = dataset_key(dataset)  # 'CIFAR-10' finds cifar10's preset; an unknown name is said to be one
    if (dataset, ipc) not in PRESETS:
        known = ", ".join(f"{d}:{i}" for d, i in PRESETS)
        raise ValueError(f"no preset for {dataset} at IPC {ipc}. Use --preset none (library defaults; "
                         f"DistillConfig(...) in Python) and set the hyper-parameters, or borrow one with "
                         f"--preset DATASET:IPC, one of {known}")
    return apply_recipe(DistillConfig(dataset=dataset, ipc=ipc, **PRESETS[(dataset, ipc)]), method, overrides)


def network_from_buffers(config: DistillConfig, buffers: ExpertBuffers, keep: Iterable[str] = ()) -> DistillConfig:
    """`config` with the student network the experts were trained as (the model, and a ConvNet's width and
    depth read from the parameter shapes), except the fields named in `keep` (those the user set)."""
    found: dict[str, Any] = {"model": buffers.meta.model}
    if (size := buffers.meta.convnet_size()) is not None:
        found |= {"width": size[0], "depth": size[1]}
    return dataclasses.replace(config, **{k: v for k, v in found.items() if k not in keep})


# ----------------------------------------------------------------------------- state

DERIVED = ("ema_images", "teacher_logits")


@dataclass
class DistillState:
    """Everything that changes during distillation; what a checkpoint holds."""

    images: Tensor                   # [K * ipc, C, H, W], the synthetic set
    labels: Tensor                   # [K * ipc] int64
    syn_lr: Tensor                   # 0-d, the learned step size alpha
    label_logits: Tensor | None      # [K * ipc, K] when soft labels are on
    momenta: dict[str, Tensor]       # SGD momentum buffers, by variable name
    generator: torch.Generator       # draws experts, start epochs, minibatches, DSA
    iteration: int = 0
    history: dict[str, list] = field(default_factory=lambda: {"loss": [], "syn_lr": [], "seconds": [], "evals": []})
    backward: str | None = None      # the mode in use (under `auto`, what it chose), once known
    kept_graphs: int = 0             # and, `checkpointed` under `auto`, how many steps' graphs its walk keeps
    compiled: bool = False           # and whether its steps run compiled (under `auto` with compile: if faster)
    ema_images: Tensor | None = None      # FTD: the EMA of the images, when ema_decay > 0
    teacher_logits: Tensor | None = None  # TESLA: the last iteration's teacher labels (for evaluation)

    def variables(self) -> dict[str, Tensor]:
        found = {"images": self.images, "syn_lr": self.syn_lr}
        if self.label_logits is not None:
            found["label_logits"] = self.label_logits
        return found

    def derived(self) -> dict[str, Tensor]:
        """The state computed from the variables, not learned (FTD's EMA, TESLA's teacher labels), where present:
        checkpointed and snapshotted under these names (DERIVED)."""
        return {name: getattr(self, name) for name in DERIVED if getattr(self, name) is not None}

    def result(self) -> tuple[Tensor, Tensor]:
        """What is evaluated and saved: the images (their EMA under FTD) and the targets (class indices, or
        label logits when they are learned or read off the teacher)."""
        images = self.images if self.ema_images is None else self.ema_images
        targets = next(t for t in (self.label_logits, self.teacher_logits, self.labels) if t is not None)
        return images.detach(), targets.detach()


def class_labels(dataset: Dataset, ipc: int) -> Tensor:
    """The synthetic images' classes, in the order they are kept: ipc images of class 0, then of class 1, ..."""
    return torch.arange(dataset.num_classes).repeat_interleave(ipc)


def initial_state(config: DistillConfig, dataset: Dataset, device: torch.device, student: Student | None = None,
                  buffers: ExpertBuffers | None = None) -> DistillState:
    """The state at iteration 0. init="correct" and label_init="experts" or "first-expert" (DATM) read the experts:
    give `student` (the network they were trained as) and `buffers`."""
    reads_experts = config.init == "correct" or config.soft_labels and config.label_init != "onehot"
    if reads_experts and (student is None or buffers is None):
        raise ValueError(f"init={config.init!r} and label_init={config.label_init!r} read the experts: pass student "
                         "and buffers")
    generator = torch.Generator().manual_seed(config.seed)
    labels = class_labels(dataset, config.ipc).to(device)
    if config.init == "real":
        images = torch.cat([dataset.sample_real(c, config.ipc, generator) for c in range(dataset.num_classes)])
    elif config.init == "correct":
        images = correctly_classified_images(dataset, config.ipc, student, buffers, generator, device)
    else:
        images = torch.randn(len(labels), dataset.channels, *dataset.im_size, generator=generator)
    images = images.to(device)
    label_logits = None
    if config.soft_labels and config.label_init == "experts":
        label_logits = experts_label_logits(student, buffers, images, labels)
    elif config.soft_labels and config.label_init == "first-expert":
        label_logits = first_expert_label_logits(student, buffers, images)
    elif config.soft_labels:
        # Start from confident one-hot targets: softmax gives the true class 0.9.
        k = dataset.num_classes
        label_logits = F.one_hot(labels, k).float() * math.log(0.9 * (k - 1) / 0.1)
    state = DistillState(images, labels, torch.tensor(config.lr_teacher, device=device), label_logits, {}, generator)
    state.momenta = {name: torch.zeros_like(v) for name, v in state.variables().items()}
    if config.ema_decay:
        state.ema_images = images.clone()
    return state


def save_checkpoint(state: DistillState, config: DistillConfig, path: Path,
                    experts: dict[str, Any] | None = None) -> None:
    """Write the state atomically to `path`, and the history beside it (history.json) for plots.

    `experts` is ExpertBuffers.identity(): resuming with other experts is refused.
    """
    tensors = {f"var.{k}": v for k, v in state.variables().items()}
    tensors |= {f"momentum.{k}": v for k, v in state.momenta.items()}
    tensors |= {"labels": state.labels, "generator": state.generator.get_state()}
    tensors |= state.derived()
    metadata = {"iteration": str(state.iteration), "config": json.dumps(dataclasses.asdict(config)),
                "history": json.dumps(state.history), "experts": json.dumps(experts), "backward": state.backward or "",
                "kept_graphs": str(state.kept_graphs), "compiled": "1" if state.compiled else "",
                "chosen_on": chosen_on(state.images.device),
                "mtt_version": __version__}
    atomic_save_safetensors(tensors, path, metadata)
    atomic_write_json(path.parent / HISTORY, state.history)  # after: a history never runs ahead of its checkpoint


# What must stay as it was when a run is resumed: the shape and meaning of the learned state.
# Everything else (learning rates, unroll length, evaluation, ...) may change; the change is
# recorded in history["changes"].
FIXED_ON_RESUME = ("dataset", "ipc", "model", "width", "depth", "zca", "soft_labels", "teacher_labels",
                   "init", "label_init", "seed")  # the last three made iteration 0's state: recorded as they were
# What `auto`'s choice was timed and sized under: a resume that changes any of these, or the hardware (chosen_on),
# chooses again.
CHOSEN_UNDER = ("backward", "compile", "syn_steps", "batch_syn", "segments")


def chosen_on(device: torch.device) -> str:
    """The device `auto` timed and sized its choice on: the GPU's model (its memory with it), else the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


_FLAGS = {"ipc": "--ipc", "model": "--model", "width": "--width", "depth": "--depth", "zca": "--zca/--no-zca",
          "soft_labels": "--soft-labels", "dataset": "--dataset", "teacher_labels": "--teacher-labels",
          "init": "--init", "label_init": "--label-init", "seed": "--seed"}


START_AFRESH = "to start afresh, choose another --out (the folder's other files are that run's)"


def _unreadable(path: Path, err: Exception, advice: str = "") -> ValueError:
    return ValueError(f"{path} is not a checkpoint mtt can read ({err}){advice}")


def checkpoint_settings(out_dir: str | Path) -> dict[str, Any] | None:
    """The settings of the run whose checkpoint `out_dir` holds (None: no checkpoint there): on resume, what a
    setting not given again stays at."""
    path = Path(out_dir) / CHECKPOINT
    return _known_settings(json.loads(_checkpoint_metadata(path)["config"])) if path.is_file() else None


def checkpoint_progress(out_dir: str | Path) -> tuple[int, int] | None:
    """(iteration, iterations) of the run whose checkpoint `out_dir` holds: where it is, and where it was to end."""
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        return None
    metadata = _checkpoint_metadata(path)
    return int(metadata["iteration"]), int(json.loads(metadata["config"])["iterations"])


def _checkpoint_metadata(path: Path, advice: str = "") -> dict[str, str]:
    """A checkpoint's metadata, read and checked (its config and iteration, the space its images are in); `advice`
    ends the message on an unreadable one."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        saved = json.loads(metadata["config"])
        int(metadata["iteration"])  # both read, or it is no checkpoint of ours
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise _unreadable(path, err, advice) from None
    _check_run_space(metadata.get("mtt_version"), saved, path.parent)
    return metadata


def _check_run_space(version: str | None, saved: dict[str, Any], run: Path) -> None:
    check_same_space(version, str(saved.get("dataset")), bool(saved.get("zca")), f"the run in {run}",
                     "distil it again with this version, or go on with the version that wrote it")


def _known_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A recorded config without the settings an older version had and this one lacks."""
    known = {f.name for f in dataclasses.fields(DistillConfig)}
    return {k: v for k, v in saved.items() if k in known}


def check_fixed_on_resume(saved: dict[str, Any], config: DistillConfig, path: Path) -> None:
    """Refuse to resume the checkpoint at `path`, whose config was `saved`, with other FIXED_ON_RESUME settings."""
    fixed = [k for k in FIXED_ON_RESUME if saved.get(k) != getattr(config, k)]
    if fixed:
        diffs = ", ".join(f"{_FLAGS[k]}: checkpoint {saved.get(k)!r} vs now {getattr(config, k)!r}" for k in fixed)
        raise ValueError(f"cannot resume {path}: the run was started with other settings ({diffs}). "
                         f"Use the checkpoint's values (leave the flags out), or another --out to start afresh.")


def load_checkpoint(path: Path, config: DistillConfig, device: torch.device,
                    experts: dict[str, Any] | None = None) -> DistillState:
    """The state saved at `path`; refuses a checkpoint of another kind of run or of other experts."""
    metadata = _checkpoint_metadata(path, f"; {START_AFRESH}")
    saved = json.loads(metadata["config"])
    try:
        tensors = load_safetensors(path)
        for name in ("generator", "labels", "var.images", "var.syn_lr"):
            if name not in tensors:
                raise KeyError(f"it holds no {name!r}")
    except (ValueError, KeyError) as err:
        raise _unreadable(path, err, f"; {START_AFRESH}") from None
    check_fixed_on_resume(saved, config, path)
    saved_experts = json.loads(metadata.get("experts", "null"))
    if saved_experts is not None and experts is not None and saved_experts != experts:
        raise ValueError(f"cannot resume {path}: it was distilled from other experts ({_describe(saved_experts)}; "
                         f"now {_describe(experts)}). Pass the same --buffers as that run, or another --out "
                         "to start afresh with these experts.")
    generator = torch.Generator()
    generator.set_state(tensors["generator"])
    variables = {k.removeprefix("var."): v.to(device) for k, v in tensors.items() if k.startswith("var.")}
    momenta = {k.removeprefix("momentum."): v.to(device) for k, v in tensors.items() if k.startswith("momentum.")}
    state = DistillState(variables["images"], tensors["labels"].to(device), variables["syn_lr"],
                         variables.get("label_logits"), momenta, generator, int(metadata["iteration"]),
                         json.loads(metadata["history"]), metadata.get("backward") or None,
                         int(metadata.get("kept_graphs", 0)),
                         # saved before `auto` chose whether to compile: its modes ran compiled with compile on
                         metadata.get("compiled", "1" if saved.get("compile") else "") == "1",
                         **{k: tensors[k].to(device) for k in DERIVED if k in tensors})
    if config.ema_decay and state.ema_images is None:  # EMA switched on at resume: it starts from here
        state.ema_images = state.images.clone()
    changed = {k: [saved[k], v] for k, v in dataclasses.asdict(config).items() if k in saved and saved[k] != v}
    saved_on, now_on = metadata.get("chosen_on"), chosen_on(device)
    if saved_on is not None and saved_on != now_on:  # e.g. a run started on a CPU, resumed on a GPU
        changed["hardware"] = [saved_on, now_on]
    if changed:
        state.history.setdefault("changes", []).append({"iteration": state.iteration, "changed": changed})
    if any(k in changed for k in (*CHOSEN_UNDER, "hardware")):  # e.g. a `full` run resumed under `auto`
        state.backward, state.kept_graphs, state.compiled = None, 0, False
    return state


def check_distilled_from(run_dir: str | Path, buffers: ExpertBuffers) -> None:
    """Refuse experts other than those the run in `run_dir` was distilled from (what its checkpoint records: those of
    them that had not diverged), for figures that set its images against them; a run copied without its checkpoint
    cannot be checked."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return
    saved = json.loads(_checkpoint_metadata(path).get("experts", "null"))
    if saved is not None and saved != (given := buffers.without_diverged().identity()):
        raise ValueError(f"{run_dir} was distilled from other experts ({_describe(saved)}) than {buffers.source} "
                         f"({_describe(given)}): pass the --buffers the run was distilled from")


def _describe(experts: dict[str, Any]) -> str:
    return (f"{experts['experts']} {experts['model']} experts on {experts['dataset']}, {experts['epochs']} epochs, "
            f"hash {experts['hash']}")


# ----------------------------------------------------------------------------- loop

@dataclass
class IterationInfo:
    """What callbacks see after each iteration."""

    iteration: int
    loss: float
    syn_lr: float
    state: DistillState
    evaluation: dict[str, Any] | None = None


Callback = Callable[[IterationInfo], None]
Evaluator = Callable[[DistillState], dict[str, Any]]  # at least {"mean": test accuracy %}: the best is kept by it


CHECKPOINT = "checkpoint.safetensors"           # the state that --resume continues from
FINAL_SYNTHETIC = "synthetic.safetensors"      # the set as the run ends
BEST_SYNTHETIC = "synthetic_best.safetensors"  # the set that scored best of those evaluated
SNAPSHOTS = "snapshots"                         # the images every snapshot_every iterations, for plots
HISTORY = "history.json"                        # loss, step size, evaluations per iteration, written with checkpoints
RUN_CONFIG = "config.json"                      # the settings the run was last started or resumed with


class RunFolder:
    """A run's files: checkpoint.safetensors, history.json, config.json, snapshots/, synthetic.safetensors and,
    when the run evaluates, synthetic_best.safetensors.

    Under torchrun every rank holds the same state and rank 0 writes for all (`writes=False` elsewhere).
    """

    def __init__(self, path: str | Path, experts: dict[str, Any], writes: bool = True) -> None:
        self.path, self.experts, self.writes = Path(path), experts, writes
        self.checkpoint = self.path / CHECKPOINT
        self.best_candidates: dict[int, SyntheticSet] = {}  # by iteration, the sets evaluated best so far
        if writes:
            if holds_experts(self.path):  # its config.json and *.safetensors would spoil the experts
                raise ValueError(f"--out {self.path} holds expert trajectories: give the run a folder of its own "
                                 f"(e.g. runs/NAME), not the experts' (--buffers)")

    def save(self, state: DistillState, config: DistillConfig) -> None:
        """The checkpoint, and with it the best set when the history it holds names that set's evaluation best: an
        evaluation whose iteration an interrupt dropped (it is redone on resume, on CUDA perhaps scoring otherwise)
        leaves synthetic_best.safetensors as the history says."""
        if self.writes:
            save_checkpoint(state, config, self.checkpoint, self.experts)
            best = best_evaluation(state.history)
            if best and best["iteration"] in self.best_candidates:
                self.save_synthetic(self.best_candidates[best["iteration"]], BEST_SYNTHETIC)
        self.best_candidates.clear()  # written, beaten, or of an iteration the stop dropped

    def save_snapshot(self, state: DistillState) -> None:
        if self.writes:
            tensors = state.variables() | state.derived()
            atomic_save_safetensors(tensors, self.path / SNAPSHOTS / f"iter_{state.iteration:06d}.safetensors")

    def clear_for_a_fresh_run(self) -> int:
        """Refuse a folder holding an earlier run's sets without its checkpoint (results, not to be overwritten);
        delete the snapshots a run killed before its first checkpoint left, so that a fresh run's plots show its
        own alone. Returns how many were removed."""
        if not self.writes:
            return 0
        # A run's history is written with its checkpoints: one without the other is a run whose checkpoint was moved
        results = [name for name in (FINAL_SYNTHETIC, BEST_SYNTHETIC, HISTORY) if (self.path / name).is_file()]
        if results:
            raise ValueError(f"--out {self.path} holds an earlier run's {' and '.join(results)} but no {CHECKPOINT} "
                             f"to resume from: choose another --out, or move them away to start afresh there")
        snapshots = list((self.path / SNAPSHOTS).glob("iter_*.safetensors"))
        for path in snapshots:
            path.unlink()
        return len(snapshots)

    def save_json(self, name: str, obj: Any) -> None:
        if self.writes:
            atomic_write_json(self.path / name, obj)

    def save_synthetic(self, synthetic: SyntheticSet, name: str = FINAL_SYNTHETIC) -> None:
        if self.writes:
            synthetic.save(self.path / name)


def distill(config: DistillConfig, dataset: Dataset, buffers: ExpertBuffers, out_dir: str | Path, *,
            resume: bool = False, callbacks: list[Callback] = (), evaluator: Evaluator | None = None,
            progress: bool = True) -> SyntheticSet:
    """Run (or resume) distillation; writes checkpoint, snapshots, history.json and synthetic.safetensors.

    SIGINT/SIGTERM (Ctrl-C) drop the iteration in progress, save a checkpoint and raise
    `Interrupted`; `resume=True` then continues exactly as if nothing had happened. Under
    torchrun the K segments of each iteration are split over the ranks and their gradients
    summed, so every rank takes the same step; the default evaluation's networks are split
    over the ranks too (an `evaluator` given here runs on rank 0 alone); rank 0 reports and writes.
    """
    config.validate()
    with ranks(resolve_device(config.device)) as procs, ExitStack() as held:
        if config.segments % procs.world:
            raise ValueError(f"--segments ({config.segments}) must be a multiple of the number of processes "
                             f"({procs.world}): each unrolls an equal share")
        if evaluator is None and config.eval_repeats > 0:  # the default one, its networks split over the ranks
            evaluator = _default_evaluator(config, dataset, progress and procs.is_main, procs)
        elif not procs.is_main:
            evaluator = None  # the caller's runs on rank 0 alone
        if not procs.is_main:
            callbacks, progress = (), False
        buffers = _without_diverged(buffers, say=procs.is_main)
        student = _student_for(config, dataset, buffers, procs.device)
        folder = RunFolder(out_dir, buffers.identity(), writes=procs.is_main)
        if folder.writes:
            held.enter_context(held_folder(out_dir))  # the run's alone while it runs
        state = _start_or_resume(config, dataset, folder, procs.device, resume, student, buffers)
        # rank 0's say on whether `auto` chooses again (the ranks' GPUs may differ): all choose together, or none
        state.backward, state.kept_graphs, state.compiled = procs.from_main((state.backward, state.kept_graphs,
                                                                             state.compiled))
        folder.save_json(RUN_CONFIG, dataclasses.asdict(config) | _provenance(buffers.source, folder.experts,
                                                                                procs.device))
        if evaluator is not None:
            evaluator = _keeping_the_best(_saving_if_it_fails(evaluator, folder, config), folder, config, dataset)
        _loop(state, config, student, buffers, folder, procs, callbacks, evaluator, progress)
    synthetic = _synthetic_set(state, config, dataset)
    folder.save_synthetic(synthetic)
    return synthetic


def _without_diverged(buffers: ExpertBuffers, say: bool) -> ExpertBuffers:
    """The experts but those whose training diverged (their last snapshot not finite), left out with a warning:
    drawn, one would stop the run with a non-finite loss, hours in. A resume leaves out the same ones."""
    diverged = buffers.diverged()
    if len(diverged) == len(buffers):
        raise ValueError(f"every expert in {buffers.source} diverged (its last epoch's parameters are not finite): "
                         f"train them again with a lower --lr (python -m mtt experts), or use other --buffers")
    if diverged and say:
        print(f"warning: {len(diverged)} of the {len(buffers)} experts diverged (their last epoch's parameters are "
              f"not finite): {', '.join(map(buffers.locate, diverged))}; distilling from the other "
              f"{len(buffers) - len(diverged)}", file=sys.stderr)
    return buffers.without(diverged) if diverged else buffers


def _provenance(source: Path, experts: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """What config.json records beside the settings, to tell later how the run was made: the experts (where they
    were read, and what the checkpoint checks on resume: ExpertBuffers.identity()), the versions, the hardware."""
    return {"experts": {"source": str(source), **experts}, "mtt_version": __version__,
            "torch_version": torch.__version__, "ran_on": chosen_on(device)}


def _synthetic_set(state: DistillState, config: DistillConfig, dataset: Dataset) -> SyntheticSet:
    """The set as the state holds it now: a copy, which the state's later updates leave as it is."""
    images, targets = (t.to("cpu", copy=True) for t in state.result())
    return SyntheticSet(images, state.labels.cpu(), state.syn_lr.item(), config.dataset, config.model,
                        None if targets.dtype == torch.long else targets, dataset.zca, dataclasses.asdict(config))


def _keeping_the_best(evaluator: Evaluator, folder: RunFolder, config: DistillConfig, dataset: Dataset) -> Evaluator:
    """The evaluator, keeping the set it scores best so far (by mean accuracy) for synthetic_best.safetensors, which
    the run folder writes with the checkpoint whose history names it, as the original code keeps images_best.pt:
    accuracy can peak and then fall as a run goes on (BENCHMARKS.md). The choice is made on the test set, so the
    best set's accuracy flatters it; the final set's is the unbiased number."""
    def run(state: DistillState) -> dict[str, Any]:
        evaluation, best = evaluator(state), best_evaluation(state.history)
        if best is None or evaluation["mean"] > best["mean"]:
            folder.best_candidates[state.iteration] = _synthetic_set(state, config, dataset)
        return evaluation
    return run


def _saving_if_it_fails(evaluator: Evaluator, folder: RunFolder, config: DistillConfig) -> Evaluator:
    """The evaluator, saving the state and saying how to go on when an evaluation fails: a learned step size too
    large for the evaluation's networks, or their memory, is no fault of the distillation, which can go on."""
    def run(state: DistillState) -> dict[str, Any]:
        try:
            return evaluator(state)
        except (ValueError, torch.OutOfMemoryError) as err:
            folder.save(state, config)
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise EvaluationFailed(
                f"evaluating the set at iteration {state.iteration} failed: {reason}. The distillation is saved in "
                f"{folder.checkpoint}: run the same command with --resume and --eval-repeats 0 (no evaluations; "
                f"these settings may change on resume), then evaluate its sets with python -m mtt evaluate, whose "
                f"--lr sets the networks' learning rate (here the learned step size, {state.syn_lr.item():.3g})"
            ) from None
    return run


def best_evaluation(history: dict[str, list]) -> dict[str, Any] | None:
    """The evaluation whose set synthetic_best.safetensors holds (the first of the highest mean), if any."""
    evals = history["evals"]
    return max(evals, key=lambda e: e["mean"]) if evals else None


def _loop(state: DistillState, config: DistillConfig, student: Student, buffers: ExpertBuffers, folder: RunFolder,
          procs: Ranks, callbacks: list[Callback], evaluator: Evaluator | None, progress: bool) -> None:
    """Iterate up to config.iterations, then evaluate the final images and save everything."""
    mask = shallow_layer_mask(student, config.pad_fraction).to(procs.device) if config.pad_fraction else None
    # The bar is closed however the loop ends, so that what is printed then is not written on its line.
    with graceful_stop() as stop, tqdm(total=config.iterations, initial=state.iteration, disable=not progress,
                                       desc="distill") as bar:
        def say(line: str) -> None:  # rank 0 reports, on its own line above the bar
            if procs.is_main:
                bar.write(line, file=sys.stderr)

        if config.compile and state.iteration < config.iterations:  # or it looks hung
            say(f"backward {config.backward}, compiled: the first iteration compiles it (a minute or more)"
                + ("; auto times both modes compiled and eager, and keeps the fastest" if config.backward == "auto"
                   else ""))
        while state.iteration < config.iterations:
            rng = state.generator.get_state()
            try:
                with stop.abandonable():  # Ctrl-C here drops this iteration; it is redone on resume
                    evaluation = None
                    if _evaluation_due(state, config, evaluator):
                        evaluation = {"iteration": state.iteration, **evaluator(state)}
                    if state.iteration % config.snapshot_every == 0:
                        folder.save_snapshot(state)
                    started = time.perf_counter()
                    update = _iteration(state, config, student, buffers, procs, folder, mask)
            except KeyboardInterrupt:
                state.generator.set_state(rng)
                _interrupted(state, config, folder, stop)
            except torch.OutOfMemoryError as err:
                state.generator.set_state(rng)
                _out_of_memory(state, config, folder, err)
            _apply(state, update, evaluation, time.perf_counter() - started)
            if update.choice is not None:
                say(f"backward auto: {_describe_choice(update.choice)}")
            if evaluation is not None:  # its own progress bar is gone: one line to keep
                say(_describe_evaluation(evaluation, state.history))
            if config.teacher_labels and state.iteration == 1:
                _check_teacher(state.teacher_logits, say)
            if state.iteration % config.checkpoint_every == 0:
                folder.save(state, config)
            bar.update()
            bar.set_postfix(loss=f"{update.loss:.4f}", syn_lr=f"{state.syn_lr.item():.2e}")
            for callback in callbacks:
                callback(IterationInfo(state.iteration, update.loss, state.syn_lr.item(), state, evaluation))
            if stop.requested:
                _interrupted(state, config, folder, stop)
        bar.close()  # before the final evaluation's own bar

        if evaluator is not None and not _evaluated_already(state):
            try:
                with stop.abandonable():
                    evaluation = {"iteration": state.iteration, **evaluator(state)}
            except KeyboardInterrupt:
                _interrupted(state, config, folder, stop)
            state.history["evals"].append(evaluation)
            say(_describe_evaluation(evaluation, state.history))  # the bar is closed: a plain line
        folder.save_snapshot(state)
        folder.save(state, config)


def _evaluated_already(state: DistillState) -> bool:
    """This state was evaluated: the run that reached this iteration ended here, and is now resumed for more."""
    evals = state.history["evals"]
    return bool(evals) and evals[-1]["iteration"] == state.iteration


def _evaluation_due(state: DistillState, config: DistillConfig, evaluator: Evaluator | None) -> bool:
    return (evaluator is not None and config.eval_every > 0 and state.iteration % config.eval_every == 0
            and not _evaluated_already(state))


def _start_or_resume(config: DistillConfig, dataset: Dataset, folder: RunFolder, device: torch.device,
                     resume: bool, student: Student, buffers: ExpertBuffers) -> DistillState:
    if folder.checkpoint.exists():
        if not resume:
            raise ValueError(f"{folder.path} already holds a run ({CHECKPOINT}): add --resume to continue it "
                             f"(the flags given then change its settings), or choose another --out to start afresh")
        state = load_checkpoint(folder.checkpoint, config, device, folder.experts)
        if state.iteration > config.iterations:  # or config.json and the saved set would say it ran fewer
            raise ValueError(f"{folder.path} holds a run of {state.iteration} iterations, more than --iterations "
                             f"{config.iterations}: raise --iterations to go on with it")
        changes = state.history.get("changes", [])
        if folder.writes and changes and changes[-1]["iteration"] == state.iteration:
            said = ", ".join(f"{k} {before} -> {now}" for k, (before, now) in changes[-1]["changed"].items())
            print(f"resuming at iteration {state.iteration} with settings other than the checkpoint's: {said}",
                  file=sys.stderr)
        return state
    if resume and folder.writes:
        print(f"--resume: no checkpoint in {folder.path} yet, starting afresh", file=sys.stderr)
    if removed := folder.clear_for_a_fresh_run():
        print(f"starting afresh in {folder.path}: removed the {removed} snapshots of an earlier run that left no "
              f"checkpoint", file=sys.stderr)
    return initial_state(config, dataset, device, student, buffers)


def _interrupted(state: DistillState, config: DistillConfig, folder: RunFolder, stop: GracefulStop) -> None:
    stop.finish()
    folder.save(state, config)
    raise Interrupted(f"interrupted at iteration {state.iteration} of {config.iterations}: checkpoint saved in "
                      f"{folder.path}, from which a resumed run continues exactly") from None


def _out_of_memory(state: DistillState, config: DistillConfig, folder: RunFolder, err: torch.OutOfMemoryError) -> None:
    folder.save(state, config)  # the state before this iteration: nothing of it is lost
    raise OutOfMemory(f"the device ran out of memory at iteration {state.iteration} ({out_of_memory_reason(err)}). "
                      f"The state before it is saved in {folder.checkpoint}: run the same command with --resume and "
                      f"less to hold per iteration: --backward checkpointed (memory constant in --syn-steps; now "
                      f"{config.backward}), a smaller --batch-syn (now {config.batch_syn or 'all'}) or fewer "
                      f"--segments (now {config.segments}), or free the device of other jobs") from None


def _student_for(config: DistillConfig, dataset: Dataset, buffers: ExpertBuffers, device: torch.device) -> Student:
    meta = buffers.meta
    if meta.dataset != config.dataset or dataset_key(dataset.name) != config.dataset:
        raise ValueError(f"the experts were trained on {meta.dataset} and the data is {dataset.name}, but this run "
                         f"distils {config.dataset}: use the experts and data of the dataset it distils")
    if meta.zca != config.zca or (dataset.zca is not None) != config.zca:
        raise ValueError(f"the experts were trained with zca={meta.zca} but this run distils with zca={config.zca} "
                         f"(dataset loaded with zca={dataset.zca is not None}); use matching experts, or set zca "
                         "to match them")
    last_target = config.max_start_epoch - 1 + config.expert_epochs  # start epochs are drawn below max_start_epoch
    if last_target > meta.epochs:
        expert_epochs = min(config.expert_epochs, meta.epochs)
        raise ValueError(f"--max-start-epoch {config.max_start_epoch} and --expert-epochs {config.expert_epochs} "
                         f"(the preset's, where not given) match up to epoch {last_target}, beyond the {meta.epochs} "
                         f"epochs the experts were trained for: pass e.g. --max-start-epoch "
                         f"{meta.epochs + 1 - expert_epochs} --expert-epochs {expert_epochs}, or train experts for "
                         f"{last_target} epochs or more")
    net = get_network(config.model, dataset.channels, dataset.num_classes, dataset.im_size, config.width, config.depth)
    meta.check_network(net)
    return Student(net.to(device))


@dataclass
class Update:
    """One iteration's result, computed without touching the state (so it can be dropped)."""

    loss: float
    variables: dict[str, Tensor]
    momenta: dict[str, Tensor]
    backward: str                        # the exact mode this iteration used
    kept_graphs: int                     # and the steps whose graphs its walk kept (`checkpointed` under `auto`)
    compiled: bool                       # and whether its steps ran compiled
    choice: BackwardChoice | None = None  # when `auto` chose it in this iteration
    skipped: bool = False                # DATM: the loss exceeded loss_threshold, nothing was updated
    ema_images: Tensor | None = None
    teacher_logits: Tensor | None = None


def _iteration(state: DistillState, config: DistillConfig, student: Student, buffers: ExpertBuffers,
               procs: Ranks, folder: RunFolder, mask: Tensor | None) -> Update:
    """One MTT iteration, computed without touching the state: draw the segments, unroll the student on them,
    and take an SGD step down the matching loss's gradient."""
    segments = _draw_segments(state, config, buffers, procs)
    labels = _unroll_labels(state, config, student, segments.theta_target)
    result, used = _unroll(state, config, student, segments, labels, mask, procs)
    loss, grads = _mean_over_ranks(result, state, procs)
    _check_finite(loss, grads, state, config, folder, buffers, segments)
    teacher = _teacher_for_evaluation(config, labels, procs)
    if config.loss_threshold is not None and loss > config.loss_threshold:  # DATM: too far to learn from
        return Update(loss, state.variables(), state.momenta, *used, skipped=True, ema_images=state.ema_images,
                      teacher_logits=teacher)
    momenta, updated = _sgd_step(state, config, grads)
    if not (torch.isfinite(updated["syn_lr"]) and updated["syn_lr"] > 0):
        _diverged(state, config, folder, f"this update would make the learned step size "
                                       f"{updated['syn_lr'].item():.3g} (from {state.syn_lr.item():.3g}) "
                                       f"{segments.where}")
    ema = None if state.ema_images is None else ema_update(state.ema_images, updated["images"], config.ema_decay)
    return Update(loss, updated, momenta, *used, ema_images=ema, teacher_logits=teacher)


@dataclass
class Segments:
    """This iteration's (expert, start epoch) pairs, drawn alike on every rank, and this rank's share of them:
    its step plans and its experts' parameters at the start and target epochs ([P], or [K, P] for K > 1)."""

    experts: list[int]
    starts: list[int]
    mine: slice
    plans: list[StepPlan]
    theta_start: Tensor
    theta_target: Tensor

    @property
    def where(self) -> str:
        return f"(experts {self.experts}, start epochs {self.starts})"


def _draw_segments(state: DistillState, config: DistillConfig, buffers: ExpertBuffers, procs: Ranks) -> Segments:
    g = state.generator
    experts = torch.randint(len(buffers), (config.segments,), generator=g).tolist()
    starts = torch.randint(*start_epoch_range(config, state.iteration), (config.segments,), generator=g).tolist()
    plans = plan_steps(len(state.images), config.syn_steps, config.batch_syn, tuple(state.images.shape[1:]),
                       config.dsa, g, procs.device, config.segments)
    # Every rank drew the same K segments; it reads and unrolls its own share of them.
    share = config.segments // procs.world
    mine = slice(procs.rank * share, (procs.rank + 1) * share)
    if procs.world > 1:
        plans = [p.select(mine) for p in plans]
    theta_start, theta_target = (torch.stack([buffers.snapshot(e, s + offset)
                                              for e, s in zip(experts[mine], starts[mine])]).to(procs.device)
                                 for offset in (0, config.expert_epochs))
    if config.segments == 1:  # one segment: plain [P] vectors, no vmap
        theta_start, theta_target = theta_start[0], theta_target[0]
    return Segments(experts, starts, mine, plans, theta_start, theta_target)


def _unroll_labels(state: DistillState, config: DistillConfig, student: Student, theta_target: Tensor) -> Tensor | None:
    """What the student trains on: class indices, the learned label logits (None: unroll takes them as a variable),
    or TESLA's teacher labels, the logits of this iteration's target checkpoint(s), fixed."""
    if config.teacher_labels:
        return teacher_logits(student, theta_target, state.images)
    return None if config.soft_labels else state.labels


def _unroll(state: DistillState, config: DistillConfig, student: Student, segments: Segments,
            labels: Tensor | None, mask: Tensor | None, procs: Ranks) -> tuple[UnrollResult, tuple]:
    """Unroll in the run's backward mode, `auto`'s choice made on the first iteration; should `auto`'s graphs no
    longer fit (another job took memory), the iteration is redone with `checkpointed`, keeping the graphs of half
    of the steps after eager `full` (where they fit), then none. Returns the result and (mode, kept graphs,
    compiled, the choice made in this iteration or None)."""
    compiler = COMPILE_BACKEND if config.compile else None
    if config.backward != "auto":
        mode, kept, compiled = config.backward, 0, config.compile
    else:
        mode, kept, compiled = state.backward, state.kept_graphs, state.compiled
    choice = None
    if mode is None:  # `auto`, and nothing chosen yet in this run: measure on this very segment
        choice = procs.from_main(choose_backward(student, segments.theta_start, segments.theta_target,
                                                 state.images, state.syn_lr, segments.plans, labels,
                                                 state.label_logits, compiler=compiler))  # one for all
        mode, kept, compiled = choice.mode, choice.kept_graphs, choice.compiled

    def run(mode: str, kept: int, compiled: bool) -> UnrollResult:
        return unroll(student, segments.theta_start, segments.theta_target, state.images, state.syn_lr,
                      segments.plans, labels=labels, label_logits=state.label_logits, mode=mode, match=config.match,
                      param_mask=mask, allow_approximate=mode in APPROXIMATE_MODES,
                      compiler=compiler if compiled else None, kept_graphs=kept)

    failed = []  # what ran out of memory in this iteration
    while True:
        try:
            return run(mode, kept, compiled), (mode, kept, compiled, choice)
        except torch.OutOfMemoryError:
            if not (config.backward == "auto" and (mode == "full" or kept)):
                raise
        failed.append(backward_name(mode, compiled) if mode == "full" else f"checkpointed keeping {kept} steps' graphs")
        # After eager `full`, half of its graph is kept (compiled steps are all recomputed); after kept graphs, none.
        graph = _full_graph_bytes(state, student, segments, labels) if mode == "full" and not compiled else 0
        choice = checkpointed_after_out_of_memory(procs.device, f"{', then '.join(failed)} ran out of memory at "
                                                                f"iteration {state.iteration}: checkpointed from "
                                                                f"here on", graph, len(segments.plans),
                                                  compiled=compiled)
        mode, kept, compiled = choice.mode, choice.kept_graphs, choice.compiled


def _full_graph_bytes(state: DistillState, student: Student, segments: Segments, labels: Tensor | None) -> int:
    targets = labels if state.label_logits is None else state.label_logits.detach()
    return full_graph_bytes(student, segments.theta_start, state.images, state.syn_lr, segments.plans, targets)


def _mean_over_ranks(result: UnrollResult, state: DistillState, procs: Ranks) -> tuple[float, dict[str, Tensor]]:
    """The loss and the learned variables' gradients, averaged over all K segments: each rank averaged over its
    share, so the mean over all is the sum of the shares / world."""
    grads = {"images": result.grad_images, "syn_lr": result.grad_lr, "label_logits": result.grad_label_logits}
    loss = result.loss
    if procs.world > 1:
        summed = [grads[k].div_(procs.world) for k in state.momenta] + [torch.tensor(loss / procs.world,
                                                                                   device=procs.device)]
        procs.sum_(*summed)
        loss = summed[-1].item()
    return loss, grads


def _check_finite(loss: float, grads: dict[str, Tensor], state: DistillState, config: DistillConfig,
                  folder: RunFolder, buffers: ExpertBuffers, segments: Segments) -> None:
    """A loss or gradient that is not finite stops the run, saving the state before this iteration; from damaged
    experts it names them, since no distillation setting mends those."""
    if math.isfinite(loss) and all(torch.isfinite(grads[k]).all() for k in state.momenta):
        return
    if not (torch.isfinite(segments.theta_start).all() and torch.isfinite(segments.theta_target).all()):
        mine = zip(segments.experts[segments.mine], segments.starts[segments.mine])
        damaged = sorted({buffers.locate(e) for e, s in mine
                          if not all(torch.isfinite(buffers.snapshot(e, s + offset)).all()
                                     for offset in (0, config.expert_epochs))})
        raise ValueError(f"the experts' parameters are not finite {segments.where}: {', '.join(damaged)} diverged or "
                         f"is damaged, which no distillation setting mends; train the experts again with a lower "
                         f"--lr (python -m mtt experts), or use other --buffers")
    _diverged(state, config, folder, f"the matching loss or its gradient is not finite (loss {loss:.3g}) "
                                   f"{segments.where}")


def _teacher_for_evaluation(config: DistillConfig, labels: Tensor | None, procs: Ranks) -> Tensor | None:
    """What a TESLA set is evaluated with: this iteration's teacher labels (K segments: their mean over every
    rank's)."""
    if not config.teacher_labels:
        return None
    teacher = labels.sum(0) / config.segments if labels.dim() == 3 else labels
    procs.sum_(teacher)
    return teacher


def _sgd_step(state: DistillState, config: DistillConfig,
              grads: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """torch.optim.SGD(momentum=...) written out, so its buffers are plain checkpointable tensors: the new momenta
    and the updated variables."""
    rates = {"images": config.lr_img, "syn_lr": config.lr_lr, "label_logits": config.lr_labels}
    momentum = {"images": 0.5, "syn_lr": 0.5, "label_logits": config.label_momentum}
    momenta = {name: momentum[name] * state.momenta[name] + grads[name] for name in state.momenta}
    updated = {name: v.detach() - rates[name] * momenta[name] for name, v in state.variables().items()}
    return momenta, updated


def start_epoch_range(config: DistillConfig, iteration: int) -> tuple[int, int]:
    """[low, high) of this iteration's start epochs: [0, max_start_epoch) in MTT. DATM's sequential
    generation: [min_start_epoch, upper) with upper growing linearly from current_max_start_epoch at
    iteration 0 to max_start_epoch at iteration expansion_end (its formula, int() included)."""
    upper = config.max_start_epoch
    if config.current_max_start_epoch is not None:
        grown = config.current_max_start_epoch + int(
            (config.max_start_epoch - config.current_max_start_epoch) * iteration / config.expansion_end)
        upper = min(grown, config.max_start_epoch)
    return config.min_start_epoch, upper


def ema_update(average: Tensor, images: Tensor, decay: float) -> Tensor:
    """FTD: the EMA of the images after an update, decay * average + (1 - decay) * images."""
    return decay * average + (1 - decay) * images


def _apply(state: DistillState, update: Update, evaluation: dict[str, Any] | None, seconds: float) -> None:
    """Commit an iteration: the only place the state changes (signals are deferred here)."""
    if evaluation is not None:
        state.history["evals"].append(evaluation)
    state.momenta = update.momenta
    state.images, state.syn_lr = update.variables["images"], update.variables["syn_lr"]
    state.label_logits = update.variables.get("label_logits")
    state.history["loss"].append(update.loss)
    state.history["syn_lr"].append(state.syn_lr.item())
    state.history["seconds"].append(seconds)
    if update.skipped:
        state.history.setdefault("skipped", []).append(state.iteration)
    state.ema_images, state.teacher_logits = update.ema_images, update.teacher_logits
    state.backward, state.kept_graphs, state.compiled = update.backward, update.kept_graphs, update.compiled
    if update.choice is not None:  # the earlier choices (a resume chose again) stay on record: they made the set
        if "backward" in state.history:
            state.history.setdefault("backward_before", []).append(state.history["backward"])
        state.history["backward"] = {"iteration": state.iteration, **dataclasses.asdict(update.choice)}
    state.iteration += 1


def _diverged(state: DistillState, config: DistillConfig, folder: RunFolder, what: str) -> None:
    folder.save(state, config)  # the state before this iteration's update: the last good one
    raise DistillationDiverged(
        f"distillation diverged at iteration {state.iteration}: {what}. The last good state is saved in "
        f"{folder.checkpoint}. To go on from it, run the same command with --resume and a smaller --lr-img "
        f"(now {config.lr_img:g}) or --lr-lr "
        f"(now {config.lr_lr:g}), or fewer --syn-steps (now {config.syn_steps}); these may change on resume. "
        f"Or start afresh in another --out with a smaller --lr-teacher (now {config.lr_teacher:g}).")


UNINFORMATIVE_TEACHER = 0.3  # mean top softmax probability below which TESLA's labels teach next to nothing


def _check_teacher(teacher_logits: Tensor, say: Callable[[str], None]) -> None:
    """Warn when TESLA's teacher labels are close to uniform (measured: digits experts at epochs 2-6 give a
    top probability of 0.13-0.20, and a set evaluated with such labels stays at chance)."""
    confidence = teacher_logits.softmax(-1).max(-1).values.mean().item()
    if confidence < UNINFORMATIVE_TEACHER:
        say(f"warning: the teacher labels are nearly uniform (mean top probability {confidence:.2f}): the target "
            f"checkpoints barely classify the images, so a set trained on these labels learns little. Use later "
            f"start epochs (--min-start-epoch) or better-trained experts, or --no-teacher-labels")


def _describe_choice(choice: BackwardChoice) -> str:
    timed = ", ".join(f"{mode} {seconds:.3g} s" for mode, seconds in choice.seconds.items())
    return f"{backward_name(choice.mode, choice.compiled)} ({choice.reason}{'; per unroll: ' + timed if timed else ''})"


def accuracy_text(evaluation: dict[str, Any]) -> str:
    """An evaluation's accuracy as runs report it: 'mean +- std %' (the spread where the evaluator gives one, of
    more than one network)."""
    runs = evaluation.get("runs")  # unknown: an evaluator that gives a spread has it from several
    spread = f" +- {evaluation['std']:.2f}" if "std" in evaluation and (runs is None or len(runs) > 1) else ""
    return f"{evaluation['mean']:.2f}{spread} %"


def _describe_evaluation(evaluation: dict[str, Any], history: dict[str, list]) -> str:
    best = best_evaluation(history)
    where = (f"best so far, saved as {BEST_SYNTHETIC}" if best is evaluation else
             f"best {best['mean']:.2f} % at iteration {best['iteration']}")
    return f"evaluation at iteration {evaluation['iteration']}: {accuracy_text(evaluation)} ({where})"


def _default_evaluator(config: DistillConfig, dataset: Dataset, progress: bool, procs: Ranks) -> Evaluator:
    """ConvNets trained on the current synthetic set with the paper's protocol (mtt.evaluate), eval_repeats of
    them, network j from stream j of config.seed. Under torchrun each rank trains a contiguous block of the
    networks and every rank gathers all the accuracies, in network order: the same result as one process."""
    from mtt.evaluate import EvalConfig, EvalResult, evaluate

    # This rank's block of the networks; none where there are fewer networks than ranks.
    mine = range(*(config.eval_repeats * r // procs.world for r in (procs.rank, procs.rank + 1)))
    eval_config = EvalConfig(model=config.model, epochs=config.eval_epochs, repeats=config.eval_repeats,
                             seed=config.seed, width=config.width, depth=config.depth, dsa=config.dsa,
                             progress=progress)

    def run(state: DistillState) -> dict[str, Any]:
        images, targets = state.result()
        runs = [] if not mine else evaluate(images, targets, dataset.test_images, dataset.test_labels,
                                            dataclasses.replace(eval_config, lr=state.syn_lr.item()),
                                            device=procs.device, networks=mine).runs
        result = EvalResult.of(run for share in procs.gather(runs) for run in share)
        return {"mean": result.mean, "std": result.std, "runs": result.runs}

    return run


def load_snapshots(run_dir: str | Path) -> list[tuple[int, Tensor]]:
    """(iteration, images) of every snapshot a run saved, in order (for the image-evolution plots): the images its
    set would hold there (FTD's EMA of them, when it keeps one)."""
    paths = sorted((Path(run_dir) / SNAPSHOTS).glob("iter_*.safetensors"))
    snapshots = [(int(p.stem.removeprefix("iter_")), load_safetensors(p)) for p in paths]
    return [(iteration, tensors.get("ema_images", tensors["images"])) for iteration, tensors in snapshots]


def stored_config(path: str | Path) -> DistillConfig:
    """The settings of the run a checkpoint or a snapshot (snapshots/iter_*.safetensors) belongs to."""
    path = Path(path)
    if path.name == CHECKPOINT:
        return DistillConfig(**checkpoint_settings(path.parent))
    record = path.parent.parent / RUN_CONFIG
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is a run's snapshot, read with the run's {record}, which is unreadable "
                         f"({err})") from None
    _check_run_space(saved.get("mtt_version"), saved, path.parent.parent)
    return DistillConfig(**_known_settings(saved))


def stored_set(path: str | Path, config: DistillConfig, dataset: Dataset) -> tuple[SyntheticSet, int]:
    """The set a run's checkpoint or snapshot holds, as synthetic.safetensors would hold it had the run ended there,
    and that iteration: to evaluate a run that was stopped, or an earlier point of one. `config` is
    stored_config(path); `dataset` is config.dataset, loaded with config.zca."""
    path = Path(path)
    if path.name == CHECKPOINT:
        state = load_checkpoint(path, config, torch.device("cpu"))
        return _synthetic_set(state, config, dataset), state.iteration
    tensors = load_safetensors(path)  # a snapshot: the variables and derived state; the labels are fixed
    if "images" not in tensors or "syn_lr" not in tensors:
        raise ValueError(f"{path} is not a snapshot mtt wrote (it holds no images and step size)")
    state = DistillState(tensors["images"], class_labels(dataset, config.ipc), tensors["syn_lr"],
                         tensors.get("label_logits"), {}, torch.Generator(),
                         **{k: tensors[k] for k in DERIVED if k in tensors})
    return _synthetic_set(state, config, dataset), int(path.stem.removeprefix("iter_"))
