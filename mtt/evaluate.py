"""The evaluation protocol of MTT: train fresh networks on a (synthetic) set, test on real data.

Follows the original code (GeorgeCazenavette/mtt-distillation, utils.evaluate_synset):
SGD with momentum 0.9 and weight decay 5e-4, batch 256 reshuffled every pass, DSA on every
training batch, `epochs + 1` passes (its `range(Epoch + 1)`), the learning rate divided by 10
after pass `epochs // 2 + 1` with a fresh optimizer (so the momentum restarts), and one test
pass in eval mode without augmentation at the end. Accuracies are in percent.

Baselines (random real subset, herding, full training set) go through the same protocol.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mtt.augment import DEFAULT_STRATEGY, DSA
from mtt.data import Dataset, _chunked
from mtt.device import DeviceLike, resolve_device, to_device
from mtt.networks import get_network
from mtt.seeds import check_seed, stream
from mtt.synthetic import SyntheticSet

BASELINE_METHODS = ("random", "herding", "full")
BASELINE_LR = 0.01  # the lr_net the DC/DSA code trains real-image baselines with
# Passes between checks that the training loss is finite. Each check waits for the GPU to finish the pass; a
# diverged network's loss stays NaN from then on, so a later check still catches it, at most this many passes late.
FINITE_CHECK_EVERY = 50


@dataclass
class EvalConfig:
    model: str = "ConvNet"
    epochs: int = 1000
    lr: float | None = None  # None: the synthetic set's learned syn_lr
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dsa: str = DEFAULT_STRATEGY
    repeats: int = 5
    seed: int = 0  # in [0, 65536): network j draws from stream seed * 65536 + j (mtt.seeds)
    width: int = 128  # ConvNet family only
    depth: int = 3
    progress: bool = True  # a progress bar over the runs' training passes

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.repeats < 1 or self.batch_size < 1:
            raise ValueError(f"need epochs >= 0, repeats >= 1 and batch_size >= 1, got epochs={self.epochs}, "
                             f"repeats={self.repeats}, batch_size={self.batch_size}")
        check_seed(self.seed)


@dataclass
class EvalResult:
    mean: float  # test accuracy, %
    std: float   # population std over runs (np.std, as the original reports)
    runs: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, runs: Iterable[float]) -> EvalResult:
        runs = [float(r) for r in runs]
        return cls(float(np.mean(runs)), float(np.std(runs)), runs)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        """'mean +- std % over N networks'; one network has no spread to show."""
        if len(self.runs) == 1:
            return f"{self.mean:.2f} % (one network)"
        return f"{self.mean:.2f} +- {self.std:.2f} %" + (f" over {len(self.runs)} networks" if self.runs else "")


# ----------------------------------------------------------------------------- protocol

def lr_at(epoch: int, epochs: int, lr: float) -> float:
    """Learning rate of pass `epoch` (0..epochs): the original drops it after pass epochs//2 + 1."""
    return lr if epoch <= epochs // 2 + 1 else lr * 0.1


EpochHook = Callable[[int, float, nn.Module], None]  # (pass, lr, net) after each training pass


def build_network(config: EvalConfig, channels: int, num_classes: int, im_size: tuple[int, int]) -> nn.Module:
    return get_network(config.model, channels, num_classes, im_size, config.width, config.depth)


def train_network(net: nn.Module, images: Tensor, targets: Tensor, config: EvalConfig,
                  generator: torch.Generator, on_epoch: EpochHook | None = None) -> nn.Module:
    """Train `net` in place with the protocol; targets are class indices [N] or soft-label logits [N, K]."""
    if config.lr is None or not 0 < config.lr < math.inf:
        raise ValueError(f"evaluation needs a positive learning rate, got {config.lr!r}: pass --lr (lr=) "
                         "(the synthetic set holds no usable learned syn_lr)")
    if not (torch.isfinite(images).all() and torch.isfinite(targets.float()).all()):
        raise ValueError("the synthetic images (or label logits) are not all finite: the set is damaged, or was "
                         "saved from a run that diverged; evaluate an earlier snapshot or best set instead")
    device = next(net.parameters()).device
    images, targets = images.to(device), targets.to(device)
    if targets.dim() == 2:  # soft labels: cross-entropy against the softmax of the logits
        targets = targets.float().softmax(1)
    dsa = DSA(config.dsa)
    lr = None
    net.train()
    for epoch in range(config.epochs + 1):
        if lr != lr_at(epoch, config.epochs, config.lr):
            lr = lr_at(epoch, config.epochs, config.lr)
            # A new optimizer, as the original makes at the drop: the momentum restarts from zero.
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=config.momentum,
                                        weight_decay=config.weight_decay)
        order = to_device(torch.randperm(len(images), generator=generator), device)
        for batch in order.split(config.batch_size):
            loss = F.cross_entropy(net(dsa(images[batch], generator)), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if (epoch % FINITE_CHECK_EVERY == 0 or epoch == config.epochs) and not torch.isfinite(loss):
            raise ValueError(f"training loss became {loss.item()} by pass {epoch} of training with lr {config.lr}: "
                             f"the learning rate is too large for {config.model}")
        if on_epoch is not None:
            on_epoch(epoch, lr, net)
    return net


@torch.no_grad()
def accuracy(net: nn.Module, images: Tensor, labels: Tensor, chunk: int = 1000) -> float:
    """Accuracy in % of `net` in eval mode on plain (un-augmented) images."""
    device = next(net.parameters()).device
    net.eval()
    correct = sum(int((net(images[i:i + chunk].to(device)).argmax(1) == labels[i:i + chunk].to(device)).sum())
                  for i in range(0, len(images), chunk))
    return 100.0 * correct / len(images)


def train_and_test(images: Tensor, labels_or_logits: Tensor, test_images: Tensor, test_labels: Tensor,
                   config: EvalConfig, seed: int, device: DeviceLike = "auto",
                   on_epoch: EpochHook | None = None) -> float:
    """One run of the protocol: a fresh network seeded by `seed`, trained, then tested (accuracy %).

    `seed` fixes the initial weights, the batch order, the DSA draws and any dropout, without
    touching the caller's global RNG state.
    """
    device = resolve_device(device)
    num_classes = (labels_or_logits.shape[1] if labels_or_logits.dim() == 2
                   else int(max(labels_or_logits.max(), test_labels.max())) + 1)
    with _seeded(seed, device) as generator:
        net = build_network(config, images.shape[1], num_classes, tuple(images.shape[2:])).to(device)
        train_network(net, images, labels_or_logits, config, generator, on_epoch)
        return accuracy(net, test_images, test_labels)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """Seed torch's global RNG (initial weights, dropout) inside a fork of it; yield a seeded generator."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def evaluate(images: Tensor, labels: Tensor, test_images: Tensor, test_labels: Tensor,
             config: EvalConfig, device: DeviceLike = "auto", networks: range | None = None) -> EvalResult:
    """`config.repeats` runs, network j from stream j of config.seed; mean +- std of test accuracy.
    `networks`: only those of the repeats (under torchrun, a rank's share)."""
    return _repeat(lambda network: (images, labels), test_images, test_labels, config, device, networks)


def _repeat(train_set: Callable[[int], tuple[Tensor, Tensor]], test_images: Tensor, test_labels: Tensor,
            config: EvalConfig, device: DeviceLike, networks: range | None = None) -> EvalResult:
    """Network j (of `networks`, default all the repeats) trained on train_set(j) from stream j of config.seed."""
    networks = range(config.repeats) if networks is None else networks
    runs: list[float] = []
    with tqdm(total=len(networks) * (config.epochs + 1), desc=config.model, unit="pass", leave=False,
              disable=not config.progress) as bar:
        for network in networks:
            images, labels = train_set(network)
            runs.append(train_and_test(images, labels, test_images, test_labels, config,
                                       stream(config.seed, network), device, on_epoch=lambda *_: bar.update()))
            bar.set_postfix(acc=f"{runs[-1]:.2f}")
    return EvalResult.of(runs)


def check_models(models: list[str], config: EvalConfig, channels: int, num_classes: int,
                 im_size: tuple[int, int]) -> None:
    """Build every model once so that a bad name or a too-small image fails before any training."""
    if not models:
        raise ValueError("no models to evaluate")
    problems = []
    for model in models:
        try:
            build_network(replace(config, model=model), channels, num_classes, im_size)
        except ValueError as err:
            problems.append(f"{model}: {err}")
    if problems:
        raise ValueError("cannot evaluate on these models:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- synthetic sets

def _canonical(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def matching_test_images(synthetic: SyntheticSet, dataset: Dataset) -> Tensor:
    """The dataset's test images in the synthetic images' space.

    A synthetic set that carries a ZCA state gets the test set whitened with *that* state (a
    ZCA re-fitted here could differ); one without is assumed to share the dataset's space.
    """
    if synthetic.dataset and _canonical(synthetic.dataset) != _canonical(dataset.name):
        raise ValueError(f"the synthetic set was distilled from {synthetic.dataset!r}, not {dataset.name!r}")
    if tuple(synthetic.images.shape[1:]) != (dataset.channels, *dataset.im_size):
        raise ValueError(f"synthetic images are {tuple(synthetic.images.shape[1:])} but {dataset.name} images "
                         f"are {(dataset.channels, *dataset.im_size)}")
    if synthetic.zca is None:
        if dataset.zca is not None:
            raise ValueError("the synthetic set was distilled without ZCA but the dataset is ZCA-whitened: load it "
                             "with zca=False")
        return dataset.test_images
    if dataset.zca is not None:
        if not torch.equal(dataset.zca.matrix, synthetic.zca.matrix):
            raise ValueError("the dataset is whitened with another ZCA than the synthetic set's: "
                             "load it with zca=False and the set's own ZCA is applied")
        return dataset.test_images
    return _chunked(lambda x: synthetic.zca.transform(dataset.denormalize(x)), dataset.test_images)  # of pixels


def evaluate_synthetic(synthetic: SyntheticSet, dataset: Dataset, models: list[str],
                       config: EvalConfig | None = None, device: DeviceLike = "auto") -> dict[str, EvalResult]:
    """Evaluate a synthetic set on each model; lr = config.lr, else the set's learned syn_lr."""
    config = config or EvalConfig()
    models = [models] if isinstance(models, str) else models  # "ConvNet" is one name, not seven
    lr = config.lr if config.lr is not None else synthetic.syn_lr
    if lr is None:
        raise ValueError("no learning rate: the synthetic set holds no syn_lr, so pass one (--lr)")
    config = replace(config, lr=lr)
    test_images = matching_test_images(synthetic, dataset)
    targets = synthetic.label_logits if synthetic.label_logits is not None else synthetic.labels
    classes = int(synthetic.labels.max()) + 1 if synthetic.label_logits is None else synthetic.label_logits.shape[1]
    if classes > dataset.num_classes or (synthetic.label_logits is not None and classes != dataset.num_classes):
        raise ValueError(f"the synthetic set's labels name {classes} classes but {dataset.name} has "
                         f"{dataset.num_classes}: is it a set of another dataset?")
    check_models(models, config, dataset.channels, dataset.num_classes, dataset.im_size)
    return {m: evaluate(synthetic.images, targets, test_images, dataset.test_labels, replace(config, model=m), device)
            for m in models}


# ----------------------------------------------------------------------------- baselines

def baseline_images(dataset: Dataset, ipc: int | None, method: str, seed: int = 0,
                    device: DeviceLike = "auto", features: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Real training images standing in for a distilled set: `random`, `herding` or `full`.

    random: ipc images per class drawn with `seed`. herding: per class, the ipc images whose
    running mean greedily tracks the class mean in `features` of the training images (default:
    `herding_features(dataset, seed)`; pass them to reuse one feature network for several ipc).
    full: the whole training set.
    """
    check_baseline(dataset, method, ipc)
    if method == "full":
        return dataset.train_images, dataset.train_labels
    labels = torch.arange(dataset.num_classes).repeat_interleave(ipc)
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.cat([dataset.sample_real(c, ipc, generator) for c in range(dataset.num_classes)]), labels
    if features is None:
        features = herding_features(dataset, seed, device)
    if len(features) != len(dataset.train_images):
        raise ValueError(f"herding needs one feature row per training image ({len(dataset.train_images)}), "
                         f"got {len(features)}")
    picks = []
    for c in range(dataset.num_classes):
        indices = dataset.class_indices(c)
        picks.append(indices[herding(features[indices], ipc)])
    return dataset.train_images[torch.cat(picks)], labels


def check_baseline(dataset: Dataset, method: str, ipc: int | None) -> None:
    if method not in BASELINE_METHODS:
        raise ValueError(f"unknown baseline {method!r}: use one of {', '.join(BASELINE_METHODS)}")
    if method == "full" and ipc is not None:
        raise ValueError(f"the full baseline trains on the whole training set: drop the ipc ({ipc}), which only "
                         "the random and herding baselines take")
    if method != "full":
        if ipc is None or ipc < 1:
            raise ValueError(f"the {method} baseline needs a positive ipc (images per class; --ipc), got {ipc!r}")
        dataset.check_ipc(ipc)


def herding(features: Tensor, n: int) -> Tensor:
    """Indices of n rows, chosen greedily so that their running mean best matches the mean row."""
    target = features.mean(0)
    total = torch.zeros_like(target)
    taken = torch.zeros(len(features), dtype=torch.bool)
    chosen = []
    for k in range(1, n + 1):
        distance = ((target - (total + features) / k) ** 2).sum(1)
        distance[taken] = float("inf")
        i = int(distance.argmin())
        chosen.append(i)
        taken[i] = True
        total += features[i]
    return torch.tensor(chosen)


def herding_features(dataset: Dataset, seed: int = 0, device: DeviceLike = "auto", epochs: int = 3) -> Tensor:
    """Penultimate features (input of the classifier) of every training image, from a ConvNet
    trained `epochs` epochs on the real data without augmentation (seeded)."""
    config = EvalConfig(epochs=epochs, lr=BASELINE_LR, dsa="none")
    device = resolve_device(device)
    # minutes per pass over a full training set on a CPU: a bar on terminals (disable=None: not in logs)
    with _seeded(seed, device) as generator, tqdm(total=epochs + 1, desc="herding features", unit="pass",
                                                  leave=False, disable=None) as bar:
        net = build_network(config, dataset.channels, dataset.num_classes, dataset.im_size).to(device)
        train_network(net, dataset.train_images, dataset.train_labels, config, generator,
                      on_epoch=lambda *_: bar.update())
    net.eval()
    with torch.no_grad():
        return _chunked(lambda x: net.features(x.to(device)).flatten(1).cpu(), dataset.train_images, 1000)


def evaluate_baseline(dataset: Dataset, ipc: int | None, method: str, models: list[str],
                      config: EvalConfig | None = None, device: DeviceLike = "auto") -> dict[str, EvalResult]:
    """A baseline on each model; repeat r draws its own subset (from stream r of the seed) and its own network."""
    config = config or EvalConfig()
    if config.lr is None:
        config = replace(config, lr=BASELINE_LR)
    check_baseline(dataset, method, ipc)
    check_models(models, config, dataset.channels, dataset.num_classes, dataset.im_size)
    cache: dict[int, tuple[Tensor, Tensor]] = {}

    def train_set(repeat: int) -> tuple[Tensor, Tensor]:  # the same subsets for every model
        if repeat not in cache:
            cache[repeat] = baseline_images(dataset, ipc, method, stream(config.seed, repeat), device)
        return cache[repeat]

    return {m: _repeat(train_set, dataset.test_images, dataset.test_labels, replace(config, model=m), device)
            for m in models}

