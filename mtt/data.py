"""Datasets: load by name into normalised tensors, ZCA whitening, per-class sampling.

Every dataset ends up the same way: float32 images [N, C, H, W] normalised with the
per-channel mean/std of the original MTT code, int64 labels, and class names. Files are
read from the official formats (IDX for MNIST-likes, python pickles for CIFAR, .mat for
SVHN, the folder layout for Tiny ImageNet); pickles go through a restricted unpickler so
a doctored file cannot run code.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtt.io import atomic_save_safetensors, load_safetensors, reachable


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing here and could not be downloaded."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    im_size: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# Means and stds are the original MTT code's (utils.get_dataset), CIFAR-100's included: it normalises CIFAR-100 with
# CIFAR-10's statistics, and its presets and experts are tuned on and trained in that space. digits' are measured on
# its training split after scaling pixels from [0, 16] to [0, 1].
SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec("digits", 1, (8, 8), 10, (0.3052,), (0.3760,)),
        DatasetSpec("mnist", 1, (28, 28), 10, (0.1307,), (0.3081,)),
        DatasetSpec("fashion-mnist", 1, (28, 28), 10, (0.2861,), (0.3530,)),
        DatasetSpec("cifar10", 3, (32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        DatasetSpec("cifar100", 3, (32, 32), 100, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        DatasetSpec("svhn", 3, (32, 32), 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
        DatasetSpec("tiny-imagenet", 3, (64, 64), 200, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ]
}
DATASET_NAMES = tuple(SPECS)

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# ----------------------------------------------------------------------------- ZCA

@dataclass
class ZCA:
    """ZCA whitening as the paper uses it (kornia's ZCAWhitening, eps 0.1, unbiased cov), of [0, 1] pixels.

    transform(x) = (x - mean) @ W with W = U diag(1/sqrt(S + eps)) U^T, inverse undoes it
    exactly (up to round-off) with U diag(sqrt(S + eps)) U^T, then adds the mean back.
    """

    mean: Tensor     # [D]
    matrix: Tensor   # [D, D]
    inverse_matrix: Tensor  # [D, D]
    eps: float

    @classmethod
    def fit(cls, images: Tensor, eps: float = 0.1, chunk: int = 4096) -> ZCA:
        """Fit on [N, C, H, W] images; accumulates the covariance in float64 by chunks."""
        if images.dim() != 4 or images.shape[0] < 2:
            raise ValueError(f"ZCA.fit needs a batch of images [N>=2, C, H, W], got shape {tuple(images.shape)}")
        flat = images.reshape(images.shape[0], -1)
        mean = flat.mean(0, dtype=torch.float64)
        cov = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
        for start in range(0, flat.shape[0], chunk):
            centred = flat[start:start + chunk].double() - mean
            cov += centred.T @ centred
        cov /= flat.shape[0] - 1
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues = eigenvalues.clamp_min(0)  # tiny negative round-off on a PSD matrix
        whiten = (eigenvectors * torch.rsqrt(eigenvalues + eps)) @ eigenvectors.T
        colour = (eigenvectors * torch.sqrt(eigenvalues + eps)) @ eigenvectors.T
        return cls(mean.float(), whiten.float(), colour.float(), eps)

    def _apply(self, x: Tensor, matrix: Tensor, inverse: bool) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.mean.numel():
            raise ValueError(f"ZCA was fitted on {self.mean.numel()} features per image, got images {tuple(x.shape)}")
        mean, matrix = self.mean.to(x), matrix.to(x)
        out = flat @ matrix + mean if inverse else (flat - mean) @ matrix
        return out.reshape(x.shape)

    def transform(self, x: Tensor) -> Tensor:
        return self._apply(x, self.matrix, inverse=False)

    def inverse(self, x: Tensor) -> Tensor:
        return self._apply(x, self.inverse_matrix, inverse=True)

    def state_dict(self) -> dict[str, Tensor]:
        return {"zca.mean": self.mean, "zca.matrix": self.matrix,
                "zca.inverse_matrix": self.inverse_matrix,
                "zca.eps": torch.tensor(self.eps, dtype=torch.float64)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ZCA:
        missing = {"zca.mean", "zca.matrix", "zca.inverse_matrix", "zca.eps"} - set(state)
        if missing:
            raise ValueError(f"not a ZCA state: missing {sorted(missing)}")
        return cls(state["zca.mean"], state["zca.matrix"], state["zca.inverse_matrix"], float(state["zca.eps"]))

    def save(self, path: str | os.PathLike) -> None:
        atomic_save_safetensors(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ZCA:
        return cls.from_state_dict(load_safetensors(path))


# ----------------------------------------------------------------------------- Dataset

@dataclass
class Dataset:
    """Train and test tensors of one dataset, in the space the networks see."""

    spec: DatasetSpec
    class_names: list[str]
    train_images: Tensor  # [N, C, H, W] float32: normalised, or the ZCA-whitened pixels when zca is set
    train_labels: Tensor  # [N] int64
    test_images: Tensor
    test_labels: Tensor
    zca: ZCA | None = None
    _class_indices: list[Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def channels(self) -> int:
        return self.spec.channels

    @property
    def im_size(self) -> tuple[int, int]:
        return self.spec.im_size

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def class_indices(self, c: int) -> Tensor:
        """Indices into the training set of every image of class c."""
        if not 0 <= c < self.num_classes:
            raise ValueError(f"class {c} out of range for {self.name} ({self.num_classes} classes)")
        if self._class_indices is None:
            order = torch.argsort(self.train_labels, stable=True)
            counts = torch.bincount(self.train_labels, minlength=self.num_classes).tolist()
            self._class_indices = list(torch.split(order, counts))
        return self._class_indices[c]

    def check_ipc(self, ipc: int, classes: Sequence[int] | None = None) -> None:
        """Fail, naming the class, where a class has fewer than ipc training images (before any work)."""
        classes = range(self.num_classes) if classes is None else classes
        fewest = min(classes, key=lambda c: len(self.class_indices(c)), default=None)
        if fewest is not None and ipc > (have := len(self.class_indices(fewest))):
            name = "" if self.class_names[fewest] == str(fewest) else f" ({self.class_names[fewest]})"
            raise ValueError(f"asked for {ipc} images per class, but class {fewest}{name} of {self.name} has only "
                             f"{have} in its training set: use an IPC of at most {have}")

    def sample_real(self, c: int, n: int, generator: torch.Generator | int | None = None) -> Tensor:
        """n distinct training images of class c, drawn with a seeded generator."""
        self.check_ipc(n, [c])
        indices = self.class_indices(c)
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        pick = torch.randperm(len(indices), generator=generator)[:n]
        return self.train_images[indices[pick]]

    def take_per_class(self, n: int, seed: int = 0) -> Dataset:
        """A copy whose training set keeps n random images per class (for quick runs)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"images per class to keep must be an int >= 1, got {n!r}")
        generator = torch.Generator().manual_seed(seed)
        keep = torch.cat([self.class_indices(c)[torch.randperm(len(self.class_indices(c)), generator=generator)[:n]]
                          for c in range(self.num_classes)]).sort().values
        return replace(self, train_images=self.train_images[keep], train_labels=self.train_labels[keep],
                       _class_indices=None)

    def with_zca(self, eps: float = 0.1) -> Dataset:
        """A copy with both splits ZCA-whitened by a ZCA fitted on the training set. As the original code, the
        whitening is of [0, 1] pixels, not normalised ones: after normalising, eps 0.1 would regularise as an eps
        of 0.1 * std^2 on pixels (0.004 on CIFAR-10), a space the paper's presets and experts were not made in."""
        if self.zca is not None:
            return self
        train_pixels = _chunked(self.denormalize, self.train_images)
        zca = ZCA.fit(train_pixels, eps)
        return replace(self, train_images=_chunked(zca.transform, train_pixels),
                       test_images=_chunked(lambda x: zca.transform(self.denormalize(x)), self.test_images),
                       zca=zca, _class_indices=None)

    def resized(self, size: int) -> Dataset:
        """A copy with both splits resized to size x size, so that networks needing larger inputs
        (ResNet18, VGG11 on 8x8 digits) can be trained and tested on it."""
        if self.zca is not None:
            raise ValueError("resize the dataset before ZCA-whitening it: a ZCA is fitted at one image size")
        spec = replace(self.spec, im_size=(size, size))
        return replace(self, spec=spec, train_images=resize_images(self.train_images, size),
                       test_images=resize_images(self.test_images, size), _class_indices=None)

    def denormalize(self, images: Tensor) -> Tensor:
        """Images in the training space -> [0, 1] pixels (ZCA undone, or the normalisation); not clipped."""
        if self.zca is not None:
            return self.zca.inverse(images)
        return images * self._stat(self.spec.std, images) + self._stat(self.spec.mean, images)

    @staticmethod
    def _stat(values: tuple[float, ...], like: Tensor) -> Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)


def resize_images(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of [N, C, H, W] images to size x size (antialiased when shrinking)."""
    if size < 1:
        raise ValueError(f"image size must be a positive number of pixels, got {size}")
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return _chunked(lambda x: F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=size < min(x.shape[-2:])), images)


def _chunked(fn, x: Tensor, chunk: int = 8192) -> Tensor:
    return torch.cat([fn(x[i:i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else x


# ----------------------------------------------------------------------------- loading

def dataset_key(name: str) -> str:
    """The name a dataset goes by here ('CIFAR-10' -> 'cifar10', 'FashionMNIST' -> 'fashion-mnist')."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, one of {', '.join(DATASET_NAMES)}; got {name!r}")
    key = name.lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100",
           "tinyimagenet": "tiny-imagenet", "tiny": "tiny-imagenet"}.get(key, key)  # "Tiny": the original's name
    if key not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASET_NAMES)}")
    return key


def load_dataset(name: str, root: str | os.PathLike | None = None, *, zca: bool = False,
                 download: bool = True) -> Dataset:
    """Load a dataset by name: `digits`, `fashion-mnist`, `mnist`, `cifar10`, `cifar100`, `svhn`, `tiny-imagenet`.

    Files are looked for in `root`, `$MTT_DATA`, `./data` and `/usr/share/datasets/<name>`
    (each directly and in the dataset's usual sub-folder); if absent and `download` is set,
    torchvision's mirrors are tried. zca=True whitens both splits (eps 0.1) as the paper does.
    """
    key = dataset_key(name)
    if not isinstance(zca, bool):
        raise TypeError(f"zca must be True or False, got {zca!r}")
    spec = SPECS[key]
    if key == "digits":
        train_x, train_y, test_x, test_y, classes = _read_digits()
    else:
        reader, marker, subfolders = _READERS[key]
        folder = _find_or_download(key, root, marker, subfolders, download)
        train_x, train_y, test_x, test_y, classes = _read(reader, key, folder)
        _check_arrays(spec, folder, train_x, train_y, test_x, test_y)
    dataset = Dataset(spec, classes, _normalise(train_x, spec), train_y.long(),
                      _normalise(test_x, spec), test_y.long())
    return dataset.with_zca() if zca else dataset


def _read(reader: Callable, name: str, folder: Path) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """reader(folder), with whatever a damaged or incomplete download raises said in one line naming the folder (the
    readers' own ValueErrors name their file already)."""
    try:
        return reader(folder)
    except FileNotFoundError as err:
        raise ValueError(f"{folder} holds an incomplete copy of {name}: {err.filename} is missing; put back the whole "
                         f"folder ({_HOW_TO_GET[name]})") from None
    except (OSError, EOFError, KeyError, IndexError, AttributeError, TypeError, struct.error, zlib.error) as err:
        raise ValueError(f"{folder} holds a damaged copy of {name} ({type(err).__name__}: {err}); put back the "
                         f"whole folder ({_HOW_TO_GET[name]})") from None


# The first ten training labels of each MNIST-format set: their files look alike, so each is told by these.
_FIRST_LABELS = {"mnist": [5, 0, 4, 1, 9, 2, 1, 3, 1, 4], "fashion-mnist": [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]}


def _check_arrays(spec: DatasetSpec, folder: Path, train_x: Tensor, train_y: Tensor, test_x: Tensor,
                  test_y: Tensor) -> None:
    """Refuse files that read but cannot be the dataset asked for: another set's, other image sizes, a label for
    every image or none, labels out of range."""
    for split, images, labels in (("training", train_x, train_y), ("test", test_x, test_y)):
        if tuple(images.shape[1:]) != (spec.channels, *spec.im_size) or len(images) != len(labels) or not len(images):
            raise ValueError(f"{folder}: its {split} set holds {len(images)} images of "
                             f"{'x'.join(map(str, images.shape[1:]))} and {len(labels)} labels, where {spec.name} has "
                             f"{spec.channels}x{'x'.join(map(str, spec.im_size))} images, one label each: these are "
                             f"not {spec.name}'s files, or a damaged copy")
        if labels.min() < 0 or labels.max() >= spec.num_classes:
            raise ValueError(f"{folder}: its {split} labels run from {int(labels.min())} to {int(labels.max())}, "
                             f"where {spec.name} has classes 0..{spec.num_classes - 1}: not {spec.name}'s files")
    if spec.name in _FIRST_LABELS:  # an MNIST-format set: not the other one's files
        other = next((name for name, first in _FIRST_LABELS.items() if first == train_y[:10].tolist()), spec.name)
        if other != spec.name:
            raise ValueError(f"{folder} holds {other}, not {spec.name} (their files look alike; its labels are "
                             f"{other}'s): point --data-root at {spec.name}'s folder")


# mtt 0.2 puts the images in the original code's space where 0.1 had its own: ZCA of [0, 1] pixels (0.1 whitened
# normalised ones), CIFAR-100 normalised with CIFAR-10's statistics, Tiny ImageNet's classes in sorted order. Files
# that 0.1 wrote for those datasets and settings are in another space; the others are unchanged.
_SPACE_CHANGED = {"cifar100", "tiny-imagenet"}


def check_same_space(version: str | None, dataset: str, zca: bool, what: str, remedy: str) -> None:
    """Refuse `what` (experts, a set, a run), written by mtt `version`, where its images were in another space than
    this version's for (dataset, zca)."""
    if not (zca or dataset in _SPACE_CHANGED) or not _before_0_2(version):
        return
    setting = "ZCA-whitened " if zca else ""
    raise ValueError(f"{what}: written by mtt {version or '< 0.2'}, whose {setting}{dataset} images lived in "
                     f"another space than now (mtt 0.2 follows the original code: ZCA of [0, 1] pixels, CIFAR-100 "
                     f"normalised with CIFAR-10's statistics, Tiny ImageNet's classes sorted); {remedy}")


def _before_0_2(version: str | None) -> bool:
    release = re.match(r"(\d+)\.(\d+)", version or "")
    return release is None or (int(release[1]), int(release[2])) < (0, 2)  # none recorded: before 0.2


def _normalise(pixels_uint8: Tensor, spec: DatasetSpec) -> Tensor:
    """uint8 [N, C, H, W] (or float in [0, 1]) -> float32 normalised, in chunks to bound memory."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    scale = 255.0 if pixels_uint8.dtype == torch.uint8 else 1.0
    return _chunked(lambda x: (x.float() / scale - mean) / std, pixels_uint8)


def _search_roots(root: str | os.PathLike | None) -> list[Path]:
    roots = [Path(root)] if root is not None else []
    if os.environ.get("MTT_DATA"):
        roots.append(Path(os.environ["MTT_DATA"]))
    roots.append(Path("data"))
    return roots


def _find_or_download(name: str, root, marker: str, subfolders: list[str], download: bool) -> Path:
    """The first folder holding `marker` (a file name, `.gz` variant accepted), else download."""
    roots = _search_roots(root)
    candidates = [r / sub for r in roots for sub in ["", name, *subfolders]]
    candidates.append(Path("/usr/share/datasets") / name)
    for folder in candidates:
        if (folder / marker).is_file() or (folder / (marker + ".gz")).is_file():
            if root is not None and not folder.is_relative_to(root):  # a mistyped root would go unnoticed
                warnings.warn(f"{name} is not in {root} (the data root given): using the copy in {folder}",
                              stacklevel=3)
            return folder
    target = roots[0]
    problem = "downloading is off (download=False)"
    if download:
        try:
            return _download(name, target)
        except OSError as err:  # network errors from urllib are OSErrors too
            problem = f"downloading into {target} failed: {err}"
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise DatasetNotFoundError(  # one line: the CLI's errors are one `error:` line each
        f"dataset {name!r} not found and {problem}. Looked for {marker!r} in: {looked}. Provide the files in the "
        f"official format: put them in ./data/{name} or in a folder named by --data-root (root= in Python) or "
        f"$MTT_DATA ({_HOW_TO_GET[name]})."
    )


_HOW_TO_GET = {
    "mnist": "the four IDX files train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), t10k-...",
    "fashion-mnist": "the four IDX files; on Debian/Ubuntu `apt-get install dataset-fashion-mnist`",
    "cifar10": "the python version, folder cifar-10-batches-py",
    "cifar100": "the python version, folder cifar-100-python",
    "svhn": "train_32x32.mat and test_32x32.mat",
    "tiny-imagenet": "the unzipped tiny-imagenet-200 folder with train/, val/ and wnids.txt",
}


def _download(name: str, target: Path) -> Path:
    """Fetch through torchvision's mirrors after a quick reachability check.

    The check makes an offline machine fail in seconds instead of waiting on retries. Only
    the archives are downloaded with torchvision; they are read by our own safe readers.
    """
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_and_extract_archive, download_url

    if name in ("mnist", "fashion-mnist"):
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        mirror = cls.mirrors[0]
        if not reachable(mirror):
            raise OSError(f"cannot reach {urlparse(mirror).hostname}")
        folder = target / name
        for filename, md5 in cls.resources:
            download_url(mirror + filename, folder, filename, md5)
        return folder
    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        if not reachable(cls.url):
            raise OSError(f"cannot reach {urlparse(cls.url).hostname}")
        download_and_extract_archive(cls.url, target, filename=cls.filename, md5=cls.tgz_md5)
        return target / cls.base_folder
    if name == "svhn":
        folder = target / "svhn"
        for url, filename, md5 in [tvd.SVHN.split_list["train"], tvd.SVHN.split_list["test"]]:
            if not reachable(url):
                raise OSError(f"cannot reach {urlparse(url).hostname}")
            download_url(url, folder, filename, md5)
        return folder
    raise OSError("no public mirror is known for this dataset")


# ----------------------------------------------------------------------------- readers

def _open_maybe_gz(path: Path) -> bytes:
    if path.exists():
        return path.read_bytes()
    return gzip.decompress(path.with_name(path.name + ".gz").read_bytes())


def read_idx(path: Path) -> Tensor:
    """Read an IDX file (`.gz` or not): magic 0x0000_08_NN = unsigned bytes with NN dims."""
    raw = _open_maybe_gz(path)
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    expected = int(np.prod(shape))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != expected:
        raise ValueError(f"{path} is truncated or corrupt: header says {shape} ({expected} bytes), found {body.size}")
    return torch.from_numpy(body.reshape(shape).copy())


def _read_mnist_like(folder: Path, classes: list[str]):
    def split(prefix):
        images = read_idx(folder / f"{prefix}-images-idx3-ubyte").unsqueeze(1)
        labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte")
        if len(images) != len(labels):
            raise ValueError(f"{folder}: {len(images)} {prefix} images but {len(labels)} labels")
        return images, labels
    return (*split("train"), *split("t10k"), classes)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global.

    CIFAR ships as pickles: this is what lets us read them without trusting them.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 stores bytes when Python 3 wrote the file
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _RefusedGlobal(
            f"refusing to load {module}.{name}: this file asks to run code, which a CIFAR batch never does")


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle that asks for a global _ArraysOnlyUnpickler does not allow."""


def safe_unpickle(path: Path) -> object:
    try:
        return _ArraysOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except _RefusedGlobal as err:
        raise ValueError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        reason = " ".join(str(err).split())  # one line: pickle's messages may have several
        raise ValueError(f"{path} is truncated or not a CIFAR pickle ({reason})") from None


def _decoded(d: dict) -> dict:
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_batch(path: Path, label_key: str) -> tuple[Tensor, Tensor]:
    batch = _decoded(safe_unpickle(path))
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path} has no 'data'/'{label_key}' entries: not a CIFAR python batch")
    images = torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
    return images, torch.as_tensor(np.asarray(batch[label_key]), dtype=torch.long)


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _read_cifar10(folder: Path):
    parts = [_cifar_batch(folder / f"data_batch_{i}", "labels") for i in range(1, 6)]
    test_x, test_y = _cifar_batch(folder / "test_batch", "labels")
    meta = folder / "batches.meta"
    classes = _names(_decoded(safe_unpickle(meta))["label_names"]) if meta.exists() else [str(i) for i in range(10)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), test_x, test_y, classes


def _read_cifar100(folder: Path):
    train_x, train_y = _cifar_batch(folder / "train", "fine_labels")
    test_x, test_y = _cifar_batch(folder / "test", "fine_labels")
    meta = folder / "meta"
    classes = _names(_decoded(safe_unpickle(meta))["fine_label_names"]) if meta.exists() else [str(i) for i in range(100)]
    return train_x, train_y, test_x, test_y, classes


def _read_svhn(folder: Path):
    from scipy.io import loadmat

    def split(filename):
        if not (folder / filename).is_file():  # scipy's own error would not name it
            raise FileNotFoundError(2, "no such file", str(folder / filename))
        mat = loadmat(folder / filename)
        images = torch.from_numpy(np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1)))
        labels = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1)) % 10  # SVHN stores digit 0 as 10
        return images, labels
    return (*split("train_32x32.mat"), *split("test_32x32.mat"), [str(i) for i in range(10)])


def _read_tiny_imagenet(folder: Path):
    from PIL import Image

    def load(paths):
        return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])).permute(0, 3, 1, 2)

    wnids = sorted((folder / "wnids.txt").read_text().split())  # the original's ImageFolder numbers them sorted
    words = dict(line.split("\t", 1) for line in (folder / "words.txt").read_text().splitlines()) \
        if (folder / "words.txt").exists() else {}
    index = {w: i for i, w in enumerate(wnids)}

    def by_class(folders: list[Path]) -> tuple[list[Path], list[int]]:
        missing = [f for f in folders if not f.is_dir()]
        if missing:
            raise FileNotFoundError(2, "no such folder", str(missing[0]))
        files = [sorted(f.glob("*.JPEG")) for f in folders]
        return [p for fs in files for p in fs], [index[w] for w, fs in zip(wnids, files) for _ in fs]

    train_paths, train_labels = by_class([folder / "train" / w / "images" for w in wnids])
    if (folder / "val" / "images" / wnids[0]).is_dir():  # in class folders, as the original's ImageFolder reads it
        test_paths, test_labels = by_class([folder / "val" / "images" / w for w in wnids])
    else:  # as downloaded: one folder, the classes in val_annotations.txt
        lines = (folder / "val" / "val_annotations.txt").read_text().split("\n")
        annotations = [line.split("\t")[:2] for line in lines if line.strip()]
        test_paths = [folder / "val" / "images" / f for f, _ in annotations]
        test_labels = [index[w] for _, w in annotations]
    classes = [words.get(w, w).split(",")[0].strip() for w in wnids]
    return (load(train_paths), torch.tensor(train_labels), load(test_paths), torch.tensor(test_labels), classes)


def _read_digits():
    """scikit-learn's 8x8 digits (1797 images), split 75/25 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    train_idx, test_idx = train_test_split(np.arange(len(images)), test_size=0.25, random_state=0,
                                           stratify=digits.target)
    labels = torch.from_numpy(digits.target)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], [str(i) for i in range(10)]


# name -> (reader, a file that marks the folder, usual sub-folders under a root)
_READERS = {
    "mnist": (lambda f: _read_mnist_like(f, [str(i) for i in range(10)]), "train-images-idx3-ubyte",
              ["MNIST/raw"]),
    "fashion-mnist": (lambda f: _read_mnist_like(f, FASHION_CLASSES), "train-images-idx3-ubyte",
                      ["FashionMNIST/raw", "fashion_mnist"]),
    "cifar10": (_read_cifar10, "data_batch_1", ["cifar-10-batches-py"]),
    "cifar100": (_read_cifar100, "train", ["cifar-100-python"]),
    "svhn": (_read_svhn, "train_32x32.mat", ["SVHN"]),
    "tiny-imagenet": (_read_tiny_imagenet, "wnids.txt", ["tiny-imagenet-200"]),
}
