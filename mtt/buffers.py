"""Expert trajectories on disk: safetensors shards, the original MTT .pt layout, the Hub.

Native format ("mtt-buffer/1"): a folder of safetensors shards. Each shard holds one tensor
per expert, `expert_{id:05d}` shaped [epochs+1, P] (float32, index 0 = initialisation,
parameters flattened in `.parameters()` order), optionally `test_acc_{id:05d}` shaped
[epochs], and the BufferMeta as string metadata. `index.json` lists the shards and their
experts. Readers open shards lazily (one expert, or one row of it, at a time) and never
unpickle anything.

Legacy format (read only): `{root}/{dataset}[_NO_ZCA]/{model}/replay_buffer_{n}.pt`, each a
list of trajectories, each a list of snapshots, each a list of per-parameter tensors. These
are loaded with `torch.load(weights_only=True)`, which refuses anything but tensors and
containers.
"""
from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from torch import Tensor

from mtt import __version__
from mtt.data import SPECS, check_same_space
from mtt.io import atomic_save_safetensors, atomic_write_json, load_plain_torch_file, reachable
from mtt.networks import NETWORK_NAMES, get_network

FORMAT = "mtt-buffer/1"
INDEX = "index.json"
EXPERTS_CONFIG = "config.json"  # how the folder's experts were trained (mtt.experts writes it)
TRAIN_HINT = "train them with `python -m mtt experts ... --out DIR` and pass that folder (--buffers DIR)"

# The original code names its buffer folders after its own dataset names.
LEGACY_DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST",
                   "fashion-mnist": "FashionMNIST", "svhn": "SVHN", "tiny-imagenet": "Tiny"}


def _canonical_dataset(name: str) -> str:
    """Our name for a dataset given either our name or the original code's ('CIFAR10' -> 'cifar10')."""
    return next((ours for ours, theirs in LEGACY_DATASETS.items() if name == theirs), name)


def _hw(im_size: int | Sequence[int]) -> tuple[int, int]:
    return (im_size, im_size) if isinstance(im_size, int) else tuple(int(s) for s in im_size)


# ----------------------------------------------------------------------------- metadata

@dataclass(frozen=True)
class BufferMeta:
    """What a set of expert trajectories was made from; stored with every shard."""

    dataset: str
    model: str
    channels: int
    im_size: tuple[int, int]
    num_classes: int
    zca: bool
    lr: float
    epochs: int
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    version: str = __version__

    def __post_init__(self) -> None:
        _check_meta_types(self)
        # Accept lists (from JSON) and an int im_size; store tuples so metas compare and hash.
        object.__setattr__(self, "im_size", _hw(self.im_size))
        object.__setattr__(self, "param_names", tuple(self.param_names))
        object.__setattr__(self, "param_shapes", tuple(tuple(int(d) for d in s) for s in self.param_shapes))
        if len(self.param_names) != len(self.param_shapes):
            raise ValueError(f"{len(self.param_names)} parameter names but {len(self.param_shapes)} shapes")

    @property
    def num_params(self) -> int:
        """P, the number of scalars in one snapshot."""
        return sum(math.prod(s) for s in self.param_shapes)

    @classmethod
    def for_network(cls, net: nn.Module, *, dataset: str, model: str, channels: int,
                    im_size: int | tuple[int, int], num_classes: int, zca: bool, lr: float,
                    epochs: int) -> BufferMeta:
        """The meta of trajectories of `net` (names and shapes in `.parameters()` order)."""
        named = list(net.named_parameters())
        return cls(dataset=dataset, model=model, channels=channels, im_size=_hw(im_size),
                   num_classes=num_classes, zca=bool(zca), lr=float(lr), epochs=int(epochs),
                   param_names=tuple(n for n, _ in named), param_shapes=tuple(tuple(p.shape) for _, p in named))

    def describe(self) -> str:
        h, w = self.im_size
        return (f"model {self.model} on {self.dataset} ({self.channels}x{h}x{w}, {self.num_classes} classes, "
                f"zca={self.zca}, lr={self.lr}, {self.epochs} epochs)")

    def check_network(self, net: nn.Module) -> None:
        """Raise ValueError unless `net` has exactly this buffer's parameter names and shapes."""
        found = [(n, tuple(p.shape)) for n, p in net.named_parameters()]
        expected = list(zip(self.param_names, self.param_shapes))
        where = f"the buffer was made for {self.describe()}"
        for j, (exp, got) in enumerate(zip(expected, found)):
            if exp != got:
                raise ValueError(f"{where}, but the network differs at parameter {j}: buffer has {exp[0]!r} {exp[1]}, "
                                 f"network has {got[0]!r} {got[1]}; use the experts' network (leave out --model, --width and "
                                 "--depth to take them from the experts)")
        if len(found) != len(expected):
            raise ValueError(f"{where}, which has {len(expected)} parameters, but the network has {len(found)}; "
                             "use the experts' network (leave out --model, --width and --depth to take them from "
                             "the experts)")

    def convnet_size(self) -> tuple[int, int] | None:
        """(width, depth) of a ConvNet-family model, read from its parameter shapes; None for others."""
        return _infer_convnet_size(self.param_shapes) if self.model.startswith("ConvNet") else None

    def network(self, width: int | None = None, depth: int | None = None) -> nn.Module:
        """A fresh network of the architecture these trajectories were made with (width/depth: ConvNets)."""
        found_width, found_depth = self.convnet_size() or (128, 3)
        return get_network(self.model, self.channels, self.num_classes, self.im_size, width or found_width,
                           depth or found_depth)

    def _same_experts(self, other: BufferMeta) -> bool:
        """Equal up to the library version that wrote them."""
        return replace(self, version="") == replace(other, version="")


_STR_FIELDS = {f.name for f in fields(BufferMeta) if f.type == "str"}


def _check_meta_types(meta: BufferMeta) -> None:
    """Metadata as mtt writes it (another tool's shard may say zca "no" or epochs "3"): ValueError otherwise."""
    def count(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    wrong = [name for name, ok in (
        ("dataset", isinstance(meta.dataset, str)), ("model", isinstance(meta.model, str)),
        ("channels", count(meta.channels)), ("num_classes", count(meta.num_classes)), ("epochs", count(meta.epochs)),
        ("zca", isinstance(meta.zca, bool)),
        ("lr", isinstance(meta.lr, (int, float)) and not isinstance(meta.lr, bool) and math.isfinite(meta.lr)
         and meta.lr > 0),
        ("param_shapes", isinstance(meta.param_shapes, (list, tuple))
         and all(isinstance(s, (list, tuple)) and all(isinstance(d, int) and d >= 0 for d in s)
                 for s in meta.param_shapes)),
        ("param_names", isinstance(meta.param_names, (list, tuple))
         and all(isinstance(n, str) for n in meta.param_names)),
    ) if not ok]
    if wrong:
        raise ValueError(f"{', '.join(f'{name}={getattr(meta, name)!r}' for name in wrong)} is not what mtt writes "
                         f"there (counts >= 1, zca true/false, a learning rate > 0)")


def _meta_to_strings(meta: BufferMeta) -> dict[str, str]:
    # safetensors metadata is str -> str: strings as they are, everything else as JSON
    return {k: v if k in _STR_FIELDS else json.dumps(v) for k, v in asdict(meta).items()} | {"format": FORMAT}


def _meta_from_strings(d: dict[str, str], source: Path) -> BufferMeta:
    try:
        kwargs = {f.name: d[f.name] if f.name in _STR_FIELDS else json.loads(d[f.name])
                  for f in fields(BufferMeta) if f.name in d}
        return BufferMeta(**kwargs)
    except (TypeError, ValueError, RecursionError) as err:  # a missing field, a value that is not JSON or not mtt's
        raise ValueError(f"{source} has unreadable buffer metadata ({err}); "
                         "re-create it with this version of mtt") from None


# ----------------------------------------------------------------------------- flat parameters

def flatten_params(net_or_tensors: nn.Module | Iterable[Tensor] | dict[str, Tensor]) -> Tensor:
    """All parameters as one detached vector [P], in `.parameters()` order."""
    if isinstance(net_or_tensors, nn.Module):
        tensors = list(net_or_tensors.parameters())
    elif isinstance(net_or_tensors, dict):
        tensors = list(net_or_tensors.values())
    else:
        tensors = list(net_or_tensors)
    if not tensors:
        raise ValueError("nothing to flatten: no parameters given")
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten_params(flat: Tensor, meta: BufferMeta) -> dict[str, Tensor]:
    """name -> shaped tensor, for torch.func.functional_call; views of `flat` when it is [P].

    Leading batch dimensions are kept ([K, P] gives [K, *shape] per parameter).
    """
    if flat.shape[-1:] != (meta.num_params,):
        raise ValueError(f"a flat parameter vector of {meta.describe()} has {meta.num_params} entries, "
                         f"got a tensor of shape {tuple(flat.shape)}")
    lead = flat.shape[:-1]
    chunks = flat.split([math.prod(s) for s in meta.param_shapes], dim=-1)
    return {n: c.reshape(*lead, *s) for n, c, s in zip(meta.param_names, chunks, meta.param_shapes)}


# ----------------------------------------------------------------------------- native shards

def _expert_key(i: int) -> str:
    return f"expert_{i:05d}"


def _acc_key(i: int) -> str:
    return f"test_acc_{i:05d}"


def write_shard(path: str | os.PathLike, trajectories: Tensor, meta: BufferMeta, expert_ids: Sequence[int],
                test_acc: Tensor | None = None) -> Path:
    """Write K trajectories [K, epochs+1, P] (and their test accuracies [K, epochs]) as one shard, atomically."""
    ids = [int(i) for i in expert_ids]
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise ValueError(f"expert ids must be distinct non-negative ints, at least one, got {ids}")
    want = (len(ids), meta.epochs + 1, meta.num_params)
    if tuple(trajectories.shape) != want:
        raise ValueError(f"trajectories for {len(ids)} experts of {meta.describe()} must be shaped "
                         f"[K, epochs+1, P] = {list(want)}, got {list(trajectories.shape)}")
    if test_acc is not None and tuple(test_acc.shape) != (len(ids), meta.epochs):
        raise ValueError(f"test_acc must be shaped [K, epochs] = {[len(ids), meta.epochs]}, got {list(test_acc.shape)}")
    tensors = {_expert_key(i): t.float() for i, t in zip(ids, trajectories)}
    if test_acc is not None:
        tensors |= {_acc_key(i): a.float() for i, a in zip(ids, test_acc)}
    return atomic_save_safetensors(tensors, path, metadata=_meta_to_strings(meta))


@dataclass(frozen=True)
class _Shard:
    path: Path
    meta: BufferMeta
    ids: tuple[int, ...]
    with_acc: frozenset[int]


def _broken(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} is truncated or corrupt ({err}): delete it, then re-train those experts "
                      "(`python -m mtt experts` skips finished ones) or download the buffers again")


def _read_shard(path: Path) -> _Shard:
    """Header only: meta, expert ids and tensor shapes, checked against each other."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: (tuple(part.get_shape()), part.get_dtype()) for k in f.keys() for part in [f.get_slice(k)]}
    except (SafetensorError, OSError) as err:
        raise _broken(path, err) from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mtt expert-buffer shard (format {metadata.get('format')!r}, "
                         f"expected {FORMAT!r}): a folder of experts holds their shards and {INDEX} alone, so "
                         f"point --buffers (experts: --out) at such a folder, not at a run's")
    meta = _meta_from_strings(metadata, path)
    ids, accs = [], set()
    for key, (shape, dtype) in shapes.items():
        kind, _, num = key.rpartition("_")
        want = {"expert": (meta.epochs + 1, meta.num_params), "test_acc": (meta.epochs,)}.get(kind)
        if want is None or not num.isdigit():
            raise ValueError(f"{path} holds an unexpected tensor {key!r}; is it an mtt buffer shard?")
        if shape != want:
            raise ValueError(f"{path}: {key} has shape {list(shape)} but {meta.describe()} needs {list(want)}")
        if dtype not in _FLOAT_DTYPES:  # the others are read as float32
            raise ValueError(f"{path}: {key} holds {dtype} numbers, where mtt writes float32 (F32): convert it, or "
                             f"train the experts again (python -m mtt experts)")
        if kind == "expert":
            ids.append(int(num))
        else:
            accs.add(int(num))
    if not ids:
        raise ValueError(f"{path} holds no expert trajectory (no expert_* tensor): delete it, or train the experts "
                         f"again (python -m mtt experts)")
    return _Shard(path, meta, tuple(sorted(ids)), frozenset(accs))


_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}  # safetensors' names


def shard_paths(folder: Path) -> list[Path]:
    # atomic writes leave ".name.XXXX.tmp" files while in progress: never shards; nor is what is no file (a named
    # pipe would block the reading forever)
    return sorted(p for p in folder.glob("*.safetensors")
                  if not p.name.startswith(".") and (p.is_file() or p.is_symlink()))  # a dangling link: broken


def _check_shards(shards: list[_Shard]) -> tuple[BufferMeta, dict[int, _Shard]]:
    """The one meta the shards share and where each expert lives; clear errors otherwise."""
    meta = shards[0].meta
    where: dict[int, _Shard] = {}
    for s in shards:
        if not s.meta._same_experts(meta):
            raise ValueError(f"shards disagree: {shards[0].path.name} was made for {meta.describe()}, "
                             f"{s.path.name} for {s.meta.describe()}; keep one kind of expert per folder")
        for i in s.ids:
            if i in where:
                raise ValueError(f"expert {i} is in both {where[i].path.name} and {s.path.name} in "
                                 f"{s.path.parent}: delete one of the two shards")
            where[i] = s
    return meta, where


def write_index(folder: str | os.PathLike) -> Path:
    """Check the shards in `folder` (one meta, no duplicate experts) and list them in index.json."""
    folder = Path(folder)
    shards = [_read_shard(p) for p in shard_paths(folder)]
    if not shards:
        raise FileNotFoundError(f"no *.safetensors shards in {folder} to index")
    meta, _ = _check_shards(shards)
    index = {"format": FORMAT, "meta": asdict(meta), "shards": {s.path.name: list(s.ids) for s in shards}}
    return atomic_write_json(folder / INDEX, index)


def holds_experts(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds expert trajectories (an index, or a shard), which nothing else may write into."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        return True
    for path in shard_paths(folder) if folder.is_dir() else ():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("format") == FORMAT:
                    return True
        except (SafetensorError, OSError):
            continue
    return False


def finished_experts(folder: str | os.PathLike) -> set[int]:
    """Ids of the experts in complete shards in `folder` (empty if it does not exist)."""
    folder = Path(folder)
    return {i for p in shard_paths(folder) for i in _read_shard(p).ids} if folder.is_dir() else set()


def _check_index(folder: Path, shards: list[_Shard]) -> None:
    """A partial download shows as shards listed in index.json but missing on disk."""
    path = folder / INDEX
    try:
        listed = json.loads(path.read_text())["shards"]
        if not isinstance(listed, (dict, list)) or not all(isinstance(name, str) for name in listed):
            raise TypeError(f"'shards' is {type(listed).__name__}, not the shards' names")
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise ValueError(f"{path} is not a valid buffer index ({err}): delete it (the shards are read without "
                         "it; `python -m mtt experts` into the folder writes it again)") from None
    on_disk = {s.path.name for s in shards}
    missing = sorted(set(listed) - on_disk)
    if missing:
        raise ValueError(f"{path} lists shards that are not in {folder}: {missing}. The copy is incomplete: "
                         "download it again, or delete index.json to use the shards that are there")
    extra = sorted(on_disk - set(listed))
    if extra:
        warnings.warn(f"{folder}: {extra} are not listed in {INDEX} (stale index); using them anyway. "
                      "Run mtt.buffers.write_index to update it.", stacklevel=3)


class _ShardReader:
    """Reads single experts or rows from shards; safe_open maps files, so nothing else is read."""

    def __init__(self, where: dict[int, _Shard]) -> None:
        self.where = where
        self.handles: dict[Path, object] = {}

    def _file(self, i: int):
        path = self.where[i].path
        if path not in self.handles:
            self.handles[path] = safe_open(str(path), "pt")
        return self.handles[path]

    def trajectory(self, i: int) -> Tensor:
        return self._file(i).get_tensor(_expert_key(i)).float()  # float32 as mtt writes it: no copy

    def snapshot(self, i: int, epoch: int) -> Tensor:
        return self._file(i).get_slice(_expert_key(i))[epoch].float()

    def test_acc(self, i: int) -> Tensor | None:
        return self._file(i).get_tensor(_acc_key(i)).float() if i in self.where[i].with_acc else None

    def locate(self, i: int) -> str:
        return f"expert {i} in {self.where[i].path}"


# ----------------------------------------------------------------------------- legacy .pt files

@dataclass(frozen=True)
class _LegacyLayout:
    """replay_buffer_{n}.pt files found in the original layout, and what the folder names tell."""

    files: tuple[Path, ...]
    folder: Path         # the model folder (named after the model in the original's layout)
    model: str | None    # the model folder's name, when it is one of ours
    zca: bool | None     # from the dataset folder's name: CIFAR10 (ZCA) or CIFAR10_NO_ZCA
    dataset: str | None  # from the dataset folder's name, when it is one of the original's (ours: 'fashion-mnist')


# The original code's model names (its get_network): a folder named so holds that model's experts.
_ORIGINAL_MODEL_PREFIXES = ("ConvNet", "MLP", "LeNet", "AlexNet", "VGG", "ResNet", "ViT")


def _replay_files(folder: Path) -> tuple[Path, ...]:
    """replay_buffer_{n}.pt in the order of n (2 before 10); other names (replay_buffer_old.pt) are no part."""
    files = [p for p in folder.glob("replay_buffer_*.pt")
             if p.stem.removeprefix("replay_buffer_").isdigit() and p.is_file()] if folder.is_dir() else []
    return tuple(sorted(files, key=lambda p: int(p.stem.removeprefix("replay_buffer_"))))


def _zca_of_folder(name: str) -> bool | None:
    """The original adds _NO_ZCA only for CIFAR, where ZCA is its default; other names say nothing."""
    if name.endswith("_NO_ZCA"):
        return False
    return True if _canonical_dataset(name) in ("cifar10", "cifar100") else None


def _dataset_folders(path: Path, dataset: str | None, zca: bool | None) -> list[Path]:
    """Where {dataset}[_NO_ZCA] folders may be: `path` itself, or its children named after the dataset."""
    if dataset is None or _canonical_dataset(path.name.removesuffix("_NO_ZCA")) == _canonical_dataset(dataset):
        return [path]
    ours = _canonical_dataset(dataset)
    names = dict.fromkeys([dataset, ours, LEGACY_DATASETS.get(ours, dataset)])
    suffixes = {None: ["", "_NO_ZCA"], True: [""], False: ["_NO_ZCA", ""]}[zca]
    folders = [path / (name + suffix) for name in names for suffix in suffixes]
    # A plain CIFAR folder holds ZCA experts: not what zca=False asks for.
    return [f for f in folders if not (zca is False and _zca_of_folder(f.name))]


def _legacy_layouts(path: Path, dataset: str | None, model: str | None, zca: bool | None) -> list[_LegacyLayout]:
    """Every set of original-MTT buffers at `path`: a replay_buffer file, a model folder, a dataset folder, or the
    root of `{root}/{dataset}[_NO_ZCA]/{model}/replay_buffer_{n}.pt`."""
    def layout(files: tuple[Path, ...], model_folder: Path) -> _LegacyLayout:
        name, data_folder = model_folder.name, model_folder.parent.name
        named = _canonical_dataset(data_folder.removesuffix("_NO_ZCA"))
        return _LegacyLayout(files, model_folder, name if name in NETWORK_NAMES else None, _zca_of_folder(data_folder),
                             named if named in LEGACY_DATASETS else None)

    if path.is_file():
        return [layout((path,), path.parent)] if path.suffix in (".pt", ".pth") else []
    if _replay_files(path):
        return [layout(_replay_files(path), path)]
    found = []
    for folder in _dataset_folders(path, dataset, zca):
        models = [folder / model] if model else sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        found += [layout(_replay_files(m), m) for m in models if _replay_files(m)]
    return found


def _find_legacy(path: Path, dataset: str | None, model: str | None, zca: bool | None) -> _LegacyLayout | None:
    """The one set of original-MTT buffers at `path` (see _legacy_layouts); None when there are none."""
    found = _legacy_layouts(path, dataset, model, zca)
    if len(found) > 1:
        raise ValueError(f"{path} holds several sets of original-MTT experts ({_where(found, path)}): name the model "
                         "(--model, model=) or point at one of these folders")
    name = found[0].folder.name if found else ""
    if model is None and found and found[0].model is None and name.startswith(_ORIGINAL_MODEL_PREFIXES):
        raise ValueError(f"{found[0].folder} holds experts of the original code's {name}, a network mtt does not "
                         f"build ({', '.join(NETWORK_NAMES)}): pass --model if they are one of these")
    return found[0] if found else None


def _where(layouts: list[_LegacyLayout], root: Path) -> str:
    return ", ".join(str(f.folder.relative_to(root)) if f.folder.is_relative_to(root) else str(f.folder)
                     for f in layouts)


def _find_legacy_any_zca(path: Path, dataset: str | None, model: str | None,
                         zca: bool | None) -> _LegacyLayout | None:
    """_find_legacy for `zca`, else for either: experts of the other setting are found, for open_legacy to refuse
    them naming the flag, rather than not found at all."""
    return _find_legacy(path, dataset, model, zca) or (_find_legacy(path, dataset, model, None) if zca is not None
                                                       else None)


def _folders_with_experts_below(path: Path, levels: int = 3) -> list[str]:
    """The folders up to `levels` below `path` that hold experts (mtt's shards, or the original's files), relative
    to it: where a user who named a parent (a repo's root) should point."""
    if not path.is_dir():
        return []
    below = {p.parent for depth in range(1, levels + 1) for pattern in ("*.safetensors", "replay_buffer_*.pt")
             for p in path.glob("/".join(["*"] * depth + [pattern]))}
    return sorted(str(folder.relative_to(path)) for folder in below if holds_experts(folder) or _replay_files(folder))


def _infer_convnet_size(shapes: Sequence[tuple[int, ...]]) -> tuple[int, int]:
    """(width, depth) of a ConvNet from its parameter shapes: the first conv's output channels, and the
    number of convolutions (the only 4-d parameters)."""
    return shapes[0][0], sum(len(s) == 4 for s in shapes)


def _load_legacy(path: Path) -> object:
    # Zip checkpoints (torch >= 1.6) are memory-mapped: only the pickled structure is read
    # until a tensor's values are used, so checking a file's shapes is cheap.
    if not zipfile.is_zipfile(path):
        return load_plain_torch_file(path)
    loaded = load_plain_torch_file(path, mmap=True)
    _check_records(path, loaded)
    return loaded


def _check_records(path: Path, loaded: object) -> None:
    """Memory-mapped, torch does not check that each tensor's record in the zip holds all of its bytes: a damaged
    record would read the next one's. The records' sizes must add up to the tensors' storages."""
    with zipfile.ZipFile(path) as archive:
        recorded = sum(info.file_size for info in archive.infolist() if "/data/" in info.filename)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors_in(loaded)}
    if sum(storages.values()) != recorded:
        raise ValueError(f"{path} is truncated or corrupt: its tensors need {sum(storages.values())} bytes but its "
                         f"records hold {recorded}; copy or download it again")


def _tensors_in(obj: object) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item)


def _looks_like_trajectories(obj: object) -> bool:
    return (isinstance(obj, list) and obj and isinstance(obj[0], (list, tuple)) and obj[0]
            and isinstance(obj[0][0], (list, tuple)) and obj[0][0] and all(isinstance(t, Tensor) for t in obj[0][0]))


def _check_legacy(path: Path, trajectories: object, shapes: list[tuple[int, ...]], what: str,
                  sizes_given: str = "") -> int:
    """Check a loaded replay_buffer file snapshot by snapshot; return its number of epochs. `sizes_given`: the
    network sizes the caller gave (otherwise read from the files), named where the network does not fit."""
    def not_a_buffer(msg: str) -> ValueError:
        return ValueError(f"{path.name} is not a replay buffer of the original code: {msg} ({path})")

    def other_network(msg: str) -> ValueError:
        remedy = f"leave out {sizes_given}: the network's sizes are otherwise read from the files" if sizes_given else \
            "was it made for another model or dataset?"
        return ValueError(f"{path.name}: {msg}; {remedy} ({path})")

    def kind(obj: object) -> str:
        name = type(obj).__name__
        return f"an empty {name}" if isinstance(obj, (list, tuple, dict)) and not obj else \
            f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"

    if not isinstance(trajectories, list) or not trajectories:
        raise not_a_buffer(f"it holds {kind(trajectories)}, not a list of trajectories")
    epochs = None
    for k, traj in enumerate(trajectories):
        if not isinstance(traj, (list, tuple)):
            raise not_a_buffer(f"trajectory {k} is {kind(traj)}, not a list of snapshots")
        if len(traj) < 2:
            raise not_a_buffer(f"trajectory {k} holds {len(traj)} snapshot(s), where a trajectory has at least 2 "
                               "(epoch 0 and the ones after)")
        if epochs is None:
            epochs = len(traj) - 1
        elif len(traj) != epochs + 1:
            raise not_a_buffer(f"trajectory {k} has {len(traj)} snapshots, trajectory 0 has {epochs + 1}")
        for t, snap in enumerate(traj):
            if not isinstance(snap, (list, tuple)):
                raise not_a_buffer(f"trajectory {k}, snapshot {t} is {kind(snap)}, not a list of parameters")
            if len(snap) != len(shapes):
                raise other_network(f"it holds {len(snap)} tensors per snapshot but {what} has {len(shapes)} "
                                    "parameters")
            for j, (p, shape) in enumerate(zip(snap, shapes)):
                if not isinstance(p, Tensor) or tuple(p.shape) != shape:
                    found = tuple(p.shape) if isinstance(p, Tensor) else kind(p)
                    raise other_network(f"trajectory {k}, snapshot {t}, parameter {j} is {found} but {what} "
                                        f"expects {shape}")
        if all(torch.equal(first, last) for first, last in zip(traj[0], traj[-1])):
            raise ValueError(f"{path.name}: trajectory {k} holds the same parameters at epoch 0 and epoch "
                             f"{len(traj) - 1}, so there is nothing to match: they were saved without being copied "
                             f"(the original's buffer.py on a CPU keeps the live parameters, p.detach().cpu()); train "
                             f"them again saving copies (.clone()), or with python -m mtt experts ({path})")
    return epochs


class _LegacyReader:
    """Loads one replay_buffer file at a time, when one of its experts is asked for."""

    def __init__(self, where: dict[int, tuple[Path, int]]) -> None:
        self.where = where
        self.cached: tuple[Path, list] | None = None

    def _trajectory(self, i: int) -> list:
        path, k = self.where[i]
        if self.cached is None or self.cached[0] != path:
            self.cached = (path, _load_legacy(path))
        return self.cached[1][k]

    def trajectory(self, i: int) -> Tensor:
        return torch.stack([flatten_params(s) for s in self._trajectory(i)]).float()

    def snapshot(self, i: int, epoch: int) -> Tensor:
        return flatten_params(self._trajectory(i)[epoch]).float()

    def test_acc(self, i: int) -> Tensor | None:
        return None  # the original format does not store it

    def locate(self, i: int) -> str:
        path, k = self.where[i]
        return f"trajectory {k} of {path}"


# ----------------------------------------------------------------------------- reading

class ExpertBuffers:
    """A set of expert trajectories, read lazily: `trajectory(i)`, `snapshot(i, epoch)`, `test_acc(i)`.

    `i` indexes 0..len-1 over the sorted expert ids.
    """

    def __init__(self, meta: BufferMeta, reader: _ShardReader | _LegacyReader, source: Path) -> None:
        self.meta = meta
        self.source = source
        self._reader = reader
        self._ids = sorted(reader.where)

    @classmethod
    def open(cls, path: str | os.PathLike, *, dataset: str | None = None, model: str | None = None,
             channels: int | None = None, im_size: int | tuple[int, int] | None = None,
             num_classes: int | None = None, zca: bool | None = None, width: int | None = None,
             depth: int | None = None, network: nn.Module | None = None) -> ExpertBuffers:
        """Open a shard folder, one shard, or original MTT .pt files, and check every given keyword
        against what the buffer was made for.

        Original files record nothing about how they were made: `dataset` is needed, the model is
        read from the folder name (else `model`, else ConvNet), ZCA from the dataset folder's name
        (else `zca`), a ConvNet's width and depth from the tensors (else `width`, `depth`).
        """
        _check_where(path)
        if zca is not None and not isinstance(zca, bool):
            raise TypeError(f"zca must be True, False or None, got {zca!r}")
        path = Path(path)
        if path.name == INDEX:
            path = path.parent
        if not path.exists():
            raise FileNotFoundError(f"no expert buffers at {path}: {TRAIN_HINT}")
        native = path.suffix == ".safetensors" or path.is_dir() and (shard_paths(path) or (path / INDEX).exists())
        if native:
            buffers = cls._open_native(path)
        elif layout := _find_legacy_any_zca(path, dataset, model, zca):
            buffers = cls._open_layout(path, layout, network=network, dataset=dataset, model=model, zca=zca,
                                       width=width, depth=depth, channels=channels, im_size=im_size,
                                       num_classes=num_classes)
        else:
            if model is not None and (others := _legacy_layouts(path, dataset, None, None)):
                raise FileNotFoundError(f"no experts of {model} in {path}: it holds original-MTT experts in "
                                        f"{_where(others, path)}; pass that model (--model), or leave --model out")
            if below := _folders_with_experts_below(path):
                raise FileNotFoundError(f"no expert buffers in {path} itself, but in {len(below)} folder(s) below it: "
                                        f"{', '.join(below[:5])}: pass one of those")
            raise FileNotFoundError(f"no expert buffers in {path}: looked for *.safetensors shards and "
                                    f"replay_buffer_*.pt files (also in {{dataset}}[_NO_ZCA]/{{model}}/ below it); "
                                    f"{TRAIN_HINT}")
        buffers._check_request(dataset=dataset, model=model, channels=channels, im_size=im_size,
                               num_classes=num_classes, zca=zca)
        if network is not None:
            buffers.meta.check_network(network)
        elif width is not None or depth is not None:
            buffers.meta.check_network(buffers.meta.network(width, depth))
        return buffers

    @classmethod
    def _open_native(cls, path: Path) -> ExpertBuffers:
        folder = path.parent if path.is_file() else path
        shards = [_read_shard(p) for p in ([path] if path.is_file() else shard_paths(path))]
        if not shards:
            raise ValueError(f"{folder / INDEX} lists shards but {folder} holds none: download the buffers again")
        if path.is_dir() and (path / INDEX).exists():
            _check_index(path, shards)
        meta, where = _check_shards(shards)
        for shard in shards:  # each: shards of one folder may come from two versions
            check_same_space(shard.meta.version, meta.dataset, meta.zca, f"{shard.path}",
                             "train these experts again with this version, into another folder")
        return cls(meta, _ShardReader(where), path)

    @classmethod
    def open_legacy(cls, root_or_file: str | os.PathLike, *, dataset: str | None, network: nn.Module | None = None,
                    model: str | None = None, zca: bool | None = None, width: int | None = None,
                    depth: int | None = None, lr: float = 0.01, channels: int | None = None,
                    im_size: int | tuple[int, int] | None = None, num_classes: int | None = None) -> ExpertBuffers:
        """Open original MTT replay_buffer_{n}.pt files, checking every snapshot against the network.

        The network is `network`, else built from the dataset, the model and the ConvNet size read
        from the files (see `open`). channels, im_size and num_classes default to the dataset's.
        """
        path = Path(root_or_file)
        layout = _find_legacy_any_zca(path, dataset, model, zca)
        if layout is None:
            raise FileNotFoundError(f"no replay_buffer_*.pt files at {path} or in "
                                    f"{path}/{dataset}{'' if zca else '_NO_ZCA'}/{model or '{model}'}; {TRAIN_HINT}")
        return cls._open_layout(path, layout, dataset=dataset, network=network, model=model, zca=zca, width=width,
                                depth=depth, lr=lr, channels=channels, im_size=im_size, num_classes=num_classes)

    @classmethod
    def _open_layout(cls, path: Path, layout: _LegacyLayout, *, dataset: str | None, network: nn.Module | None = None,
                     model: str | None = None, zca: bool | None = None, width: int | None = None,
                     depth: int | None = None, lr: float = 0.01, channels: int | None = None,
                     im_size: int | tuple[int, int] | None = None, num_classes: int | None = None) -> ExpertBuffers:
        """open_legacy for the files `layout` found under `path`."""
        if dataset is None:
            raise ValueError(f"{path} holds experts in the original MTT format, which does not record the dataset: "
                             "name it (--dataset, dataset=)")
        if layout.dataset is not None and layout.dataset != _canonical_dataset(dataset):
            raise ValueError(f"{layout.folder} holds experts of {layout.dataset} (its folder name says so), "
                             f"not {_canonical_dataset(dataset)}: pass --dataset {layout.dataset}, or other --buffers")
        model = model or layout.model or "ConvNet"
        if zca is not None and layout.zca is not None and zca != layout.zca:
            raise ValueError(f"{layout.folder} holds experts trained {'with' if layout.zca else 'without'} "
                             f"ZCA (its folder name says so), but this run asks for zca={zca} (by the preset, or "
                             f"--zca/--no-zca): pass {'--zca' if layout.zca else '--no-zca'} to use them, or other "
                             f"experts")
        zca = layout.zca if zca is None else zca
        if zca is None:
            raise ValueError(f"{path}: original-MTT experts of {dataset} do not say whether they were trained with "
                             "ZCA: pass --zca or --no-zca (zca=True/False)")
        dataset = _canonical_dataset(dataset)
        spec = SPECS.get(dataset)
        channels = channels or (spec and spec.channels)
        im_size = im_size or (spec and spec.im_size)
        num_classes = num_classes or (spec and spec.num_classes)
        if not (channels and im_size and num_classes):
            raise ValueError(f"unknown dataset {dataset!r}: pass channels=, im_size= and num_classes=")
        h, w = _hw(im_size)
        sizes_given = " and ".join(f"--{name} {value}" for name, value in (("width", width), ("depth", depth))
                                   if value is not None and network is None)
        if network is None:
            if model.startswith("ConvNet") and (width is None or depth is None):
                first = _load_legacy(layout.files[0])
                shapes = [tuple(t.shape) for t in first[0][0]] if _looks_like_trajectories(first) else [(128,)]
                found_width, found_depth = _infer_convnet_size(shapes)
                width, depth = width or found_width, depth or found_depth
            network = get_network(model, channels, num_classes, (h, w), width or 128, depth or 3)
        shapes = [tuple(p.shape) for p in network.parameters()]
        where: dict[int, tuple[Path, int]] = {}
        epochs = set()
        for f in layout.files:
            trajectories = _load_legacy(f)
            epochs.add(_check_legacy(f, trajectories, shapes, f"{model} on {channels}x{h}x{w}", sizes_given))
            where |= {len(where) + k: (f, k) for k in range(len(trajectories))}
        if len(epochs) > 1:
            raise ValueError(f"the files in {path} hold trajectories of different lengths ({sorted(epochs)} epochs); "
                             "open them one by one")
        meta = BufferMeta.for_network(network, dataset=dataset, model=model, channels=channels, im_size=(h, w),
                                      num_classes=num_classes, zca=zca, lr=lr, epochs=epochs.pop())
        return cls(meta, _LegacyReader(where), path)

    def _check_request(self, **requested) -> None:
        wrong = []
        for field, value in requested.items():
            if value is None:
                continue
            value = {"im_size": _hw, "dataset": _canonical_dataset, "zca": bool}.get(field, lambda v: v)(value)
            have = getattr(self.meta, field)
            if value != have:
                flag = f" (--{'zca' if have else 'no-zca'} to match)" if field == "zca" else ""
                wrong.append(f"{field}={value!r} (buffer has {have!r}{flag})")
        if wrong:
            raise ValueError(f"{self.source}: the buffer was made for {self.meta.describe()}, requested "
                             f"{', '.join(wrong)}; use buffers made for this setting or {TRAIN_HINT}")

    def __len__(self) -> int:
        return len(self._ids)

    def identity(self) -> dict[str, Any]:
        """What a distillation checkpoint records of its experts, so that resuming with other ones is refused:
        dataset, model, number of experts, and a hash of the meta and of every expert's final parameters
        (cheap: one row per expert; it tells apart experts trained with another seed or for longer)."""
        digest = hashlib.sha256(json.dumps(asdict(replace(self.meta, version=""))).encode())
        for i in range(len(self)):
            digest.update(self.snapshot(i, self.meta.epochs)[:4096].float().numpy().tobytes())
        return {"dataset": self.meta.dataset, "model": self.meta.model, "experts": len(self),
                "epochs": self.meta.epochs, "hash": digest.hexdigest()[:16]}

    @property
    def expert_ids(self) -> list[int]:
        return list(self._ids)

    def __repr__(self) -> str:
        return f"ExpertBuffers({len(self)} experts, {self.meta.describe()}, from {self.source})"

    def _id(self, i: int) -> int:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"expert index {i} out of range: {self.source} holds {len(self)} experts "
                             f"(indices 0..{len(self) - 1})")
        return self._ids[i]

    def trajectory(self, i: int) -> Tensor:
        """Expert i's whole trajectory [epochs+1, P]; reads only that expert."""
        return self._reader.trajectory(self._id(i))

    def snapshot(self, i: int, epoch: int) -> Tensor:
        """Expert i's parameters [P] after `epoch` epochs (0 = initialisation); reads only that row."""
        eid, epoch = self._id(i), operator.index(epoch)
        if not -(self.meta.epochs + 1) <= epoch <= self.meta.epochs:
            raise IndexError(f"epoch {epoch} out of range: these experts were trained {self.meta.epochs} "
                             f"epochs (snapshots 0..{self.meta.epochs})")
        return self._reader.snapshot(eid, epoch % (self.meta.epochs + 1))

    def test_acc(self, i: int) -> Tensor | None:
        """Expert i's test accuracy (a fraction) after each epoch [epochs], or None if not recorded."""
        return self._reader.test_acc(self._id(i))

    def first(self, n: int) -> ExpertBuffers:
        """The first n of these experts alone (for ablations over their number)."""
        if not 1 <= n <= len(self):
            raise ValueError(f"cannot take the first {n} experts of {self.source}: it holds {len(self)}")
        return self._only(self._ids[:n])

    def diverged(self) -> list[int]:
        """The indices of the experts whose last snapshot is not finite: their training diverged. mtt does not save
        such experts; other code's files (the original's, a download) may hold them."""
        return [i for i in range(len(self)) if not torch.isfinite(self.snapshot(i, self.meta.epochs)).all()]

    def without_diverged(self) -> ExpertBuffers:
        """These experts but those that diverged: the ones a distillation draws from (mtt.distill leaves the others
        out), and so the ones a run's figures and checks are made with."""
        return self.without(self.diverged())

    def without(self, indices: Iterable[int]) -> ExpertBuffers:
        """These experts but those at `indices`."""
        left_out = {self._id(i) for i in indices}
        return self._only([eid for eid in self._ids if eid not in left_out])

    def _only(self, ids: list[int]) -> ExpertBuffers:
        subset = ExpertBuffers(self.meta, self._reader, self.source)
        subset._ids = ids
        return subset

    def recorded_test_acc(self) -> list[Tensor]:
        """The test accuracy curves [epochs] of the experts that recorded one (the original's files record none)."""
        return [acc for acc in map(self.test_acc, range(len(self))) if acc is not None and len(acc)]

    def final_accuracy(self) -> float | None:
        """The experts' mean test accuracy after their last epoch, in % (test_acc holds fractions); None where it is
        not recorded."""
        finals = [float(acc[-1]) for acc in self.recorded_test_acc()]
        return 100 * sum(finals) / len(finals) if finals else None

    def locate(self, i: int) -> str:
        """Where expert i is stored, in words: its id and file (to name a damaged one)."""
        return self._reader.locate(self._id(i))

    def training(self) -> dict[str, Any]:
        """How these experts were trained, as their folder's config.json records it (mtt.experts writes it); {}
        where there is none (the original's files, a shard on its own)."""
        folder = self.source if self.source.is_dir() else self.source.parent
        try:
            record = json.loads((folder / EXPERTS_CONFIG).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}


# ----------------------------------------------------------------------------- Hugging Face Hub

class BufferDownloadError(FileNotFoundError):
    """Expert buffers could not be found in the Hub cache nor downloaded."""


class BufferUploadError(OSError):
    """Expert buffers could not be pushed to the Hub."""


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: read it again so a later setting counts
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _hub_where(repo_id: str, revision: str | None, sub: str) -> str:
    return f"repo {repo_id!r}, revision {revision or 'main'!r}, sub-path {sub or '(root)'!r}"


def _holds_buffers(folder: Path) -> bool:
    return folder.is_dir() and any(any(folder.rglob(pattern)) for pattern in ("*.safetensors", "replay_buffer_*.pt"))


def download_buffers(repo_id: str, subpath: str = "", revision: str | None = None,
                     cache_dir: str | os.PathLike | None = None, local_dir: str | os.PathLike | None = None,
                     repo_type: str = "model") -> Path:
    """Fetch a buffer folder from a Hugging Face repo into the cache and return its local path.

    Online, the Hub is asked every time (a complete cache costs one request; a branch moved on, or a download
    cut short, is brought up to date); offline (HF_HUB_OFFLINE, or no route to the Hub) the cached copy is used.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import HFValidationError

    sub = _check_subpath(subpath)
    where = _hub_where(repo_id, revision, sub) + ("" if repo_type == "model" else f", a {repo_type} repo")

    def error(reason: str) -> BufferDownloadError:
        return BufferDownloadError(f"cannot get expert buffers from the Hugging Face Hub ({where}): {reason}. "
                                   f"Alternatively, {TRAIN_HINT}")

    kwargs = dict(repo_id=repo_id, repo_type=repo_type, revision=revision, cache_dir=cache_dir, local_dir=local_dir,
                  allow_patterns=[f"{sub}/*"] if sub else None)

    def cached() -> Path | None:
        try:
            folder = Path(snapshot_download(**kwargs, local_files_only=True)) / sub
        except OSError:  # LocalEntryNotFoundError, IncompleteSnapshotError: not (all) cached
            return None
        except ValueError as err:  # HFValidationError: a malformed repo id or revision
            raise error(str(err).rstrip(".")) from None
        return folder if _holds_buffers(folder) else None

    host = urlparse(constants.ENDPOINT).hostname
    if _hub_offline() or not reachable(constants.ENDPOINT):
        if (folder := cached()) is None:
            raise error(f"they are not in the local cache and "
                        f"{'HF_HUB_OFFLINE is set' if _hub_offline() else f'{host} cannot be reached'}")
        return folder
    try:  # the Hub answered the check: its own timeouts (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT) apply
        folder = Path(snapshot_download(**kwargs)) / sub
    except HFValidationError as err:  # a malformed repo id or revision: no cached copy has such a name
        raise error(str(err).rstrip(".")) from None
    # huggingface_hub raises its own, OSError and httpx errors, which share no base class
    except Exception as err:
        if (folder := cached()) is None:
            raise error(f"{type(err).__name__}: {err}") from err
        warnings.warn(f"asking the Hugging Face Hub for {where} failed ({type(err).__name__}: {err}): using the "
                      f"cached copy, which may be older than the repo's")
        return folder
    if not _holds_buffers(folder):
        raise error("the repo has no *.safetensors or replay_buffer_*.pt files there")
    return folder


def _check_subpath(subpath: str) -> str:
    """The folder inside the repo, refused where it would lead out of it."""
    sub = subpath.strip("/")
    if any(part in ("..", ".") for part in sub.split("/")) or "\\" in sub:
        raise ValueError(f"sub-path {subpath!r} may not hold '.' or '..' parts (nor backslashes): name the folder "
                         f"inside the repo, as hf://OWNER/REPO/dataset/model")
    return sub


def push_buffers(folder: str | os.PathLike, repo_id: str, subpath: str = "", revision: str | None = None,
                 token: str | None = None, private: bool = False, repo_type: str = "model") -> str:
    """Upload a shard folder (its *.safetensors and a fresh index.json) to a Hub repo (a model repo, or
    repo_type="dataset"); return the commit URL."""
    from huggingface_hub import HfApi, constants

    folder = Path(folder)
    write_index(folder)  # refuses an inconsistent folder, and lists the shards for downloaders
    buffers = ExpertBuffers.open(folder)
    sub = _check_subpath(subpath)
    where = _hub_where(repo_id, revision, sub)
    if _hub_offline() or not reachable(constants.ENDPOINT):
        raise BufferUploadError(f"cannot push {folder} to the Hugging Face Hub ({where}): offline "
                                f"(HF_HUB_OFFLINE is set or {urlparse(constants.ENDPOINT).hostname} cannot be reached)")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, repo_type=repo_type, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=folder, path_in_repo=sub or None,
                                 revision=revision,
                                 allow_patterns=["*.safetensors", INDEX, EXPERTS_CONFIG],
                                 commit_message=f"Expert buffers: {len(buffers)} experts, {buffers.meta.describe()}")
    except Exception as err:  # see download_buffers
        raise BufferUploadError(f"cannot push {folder} to the Hugging Face Hub ({where}): {type(err).__name__}: "
                                f"{err}. Check the token (`hf auth login` or token=) and write access") from err
    return info.commit_url


def _hub_address(url: str) -> str:
    """hf://[datasets/]OWNER/REPO/SUBPATH@REVISION for a repo's web address (.../OWNER/REPO/tree/REVISION/SUBPATH,
    or a file's: .../blob/ or /resolve/REVISION/SUBPATH/FILE, whose folder it names) or HF://."""
    parts = url.split("://", 1)[1].removeprefix("huggingface.co/").strip("/").split("/")
    kind = [parts.pop(0)] if parts[0] == "datasets" else []
    if len(parts) > 3 and parts[2] in ("tree", "blob", "resolve"):
        inside = parts[4:-1] if parts[2] != "tree" else parts[4:]  # a file's address: its folder
        return f"hf://{'/'.join(kind + parts[:2] + inside)}@{parts[3]}"
    return f"hf://{'/'.join(kind + parts)}"


def _check_where(where: object) -> None:
    if not isinstance(where, (str, os.PathLike)):
        raise TypeError(f"buffers must be a folder, a file or an 'hf://OWNER/REPO' address, "
                        f"got {type(where).__name__} {where!r}")


def open_buffers(where: str | os.PathLike, **expected) -> ExpertBuffers:
    """ExpertBuffers from a local path or `hf://OWNER/REPO[/SUBPATH][@REVISION]` (downloaded into the cache).

    `expected` is passed to ExpertBuffers.open (dataset=, zca=, network=, ...) to check the buffer.
    """
    _check_where(where)
    text = str(where)
    if text.lower().startswith(("https://huggingface.co/", "http://huggingface.co/", "hf://")) \
            and not text.startswith("hf://"):
        raise ValueError(f"{text} is no path: name a Hub repo as {_hub_address(text)} "
                         "(hf://OWNER/REPO[/SUBPATH][@REVISION])")
    if text.startswith("hf://"):
        location, _, revision = text.removeprefix("hf://").partition("@")
        parts = [part for part in location.split("/") if part]
        repo_type = "dataset" if parts[:1] == ["datasets"] else "model"  # hf://datasets/OWNER/REPO, as fsspec's
        parts = parts[1:] if repo_type == "dataset" else parts
        if len(parts) < 2:
            raise ValueError(f"{text!r} is not a Hub address: use hf://OWNER/REPO[/SUBPATH][@REVISION] "
                             f"(hf://datasets/OWNER/REPO/... for a dataset repo)")
        where = download_buffers("/".join(parts[:2]), "/".join(parts[2:]), revision or None, repo_type=repo_type)
        try:
            return ExpertBuffers.open(where, **expected)
        except FileNotFoundError as err:  # said of the cache's copy: said of the address too
            raise FileNotFoundError(f"{text}: {err}") from None
    return ExpertBuffers.open(where, **expected)
