"""The distilled set on disk: `synthetic.safetensors`, and the original MTT's saved tensors.

Native file: tensors `images` [N, C, H, W] (in the training space: normalised, and
ZCA-whitened when `zca.*` tensors are present), `labels` [N] int64 (hard labels) or
`label_logits` [N, K] (soft labels), `syn_lr` (the learned step size, a 0-d tensor), plus
the ZCA state when ZCA was on; string metadata `format`, `dataset`, `ipc`, `model`,
`config` (JSON of the distillation config) and `mtt_version`. Evaluation reads back
everything it needs to be exact from this one file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtt import __version__
from mtt.data import ZCA, check_same_space, resize_images
from mtt.io import atomic_save_safetensors, load_plain_torch_file, load_safetensors

FORMAT = "mtt-synthetic/1"


@dataclass
class SyntheticSet:
    images: Tensor                 # [N, C, H, W] in the training space
    labels: Tensor                 # [N] int64 class of each image
    syn_lr: float | None           # learned step size (None for sets from elsewhere without one)
    dataset: str
    model: str = "ConvNet"
    label_logits: Tensor | None = None  # [N, K] learned soft labels, when they were on
    zca: ZCA | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """A set evaluation can use: images [N, C, H, W] with N >= 1, a class index >= 0 per image, and soft labels
        (when present) one row per image."""
        n = len(self.images)
        if self.images.dim() != 4 or n == 0 or not self.images.is_floating_point():
            raise ValueError(f"synthetic images must be float [N, C, H, W] with N >= 1, got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if (self.labels.shape != (n,) or self.labels.is_floating_point() or self.labels.dtype == torch.bool
                or (n and int(self.labels.min()) < 0)):
            raise ValueError(f"synthetic labels must be one class index >= 0 per image ({n}), got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}")
        if self.label_logits is not None and (self.label_logits.dim() != 2 or len(self.label_logits) != n):
            raise ValueError(f"label logits must be [N, classes] with N = {n} images, got "
                             f"{tuple(self.label_logits.shape)}")

    @property
    def ipc(self) -> int:
        return int(torch.bincount(self.labels).max()) if len(self.labels) else 0

    @property
    def width(self) -> int:
        """Width of the ConvNet it was distilled through (the paper's 128 when unrecorded)."""
        return int(self.config.get("width", 128))

    @property
    def depth(self) -> int:
        return int(self.config.get("depth", 3))

    def resized(self, size: int) -> SyntheticSet:
        """A copy with images resized to size x size, to evaluate on networks that need larger inputs."""
        if self.zca is not None:
            raise ValueError("a ZCA-whitened synthetic set cannot be resized: its ZCA holds for one image size")
        return replace(self, images=resize_images(self.images, size))

    def save(self, path: str | os.PathLike) -> Path:
        tensors = {"images": self.images.float(), "labels": self.labels.long()}
        if self.syn_lr is not None:
            tensors["syn_lr"] = torch.tensor(float(self.syn_lr))
        if self.label_logits is not None:
            tensors["label_logits"] = self.label_logits.float()
        if self.zca is not None:
            tensors.update(self.zca.state_dict())
        metadata = {"format": FORMAT, "dataset": self.dataset, "ipc": str(self.ipc), "model": self.model,
                    "config": json.dumps(self.config), "mtt_version": __version__}
        return atomic_save_safetensors(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SyntheticSet:
        from safetensors import safe_open

        tensors = load_safetensors(path)
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format", "").startswith("mtt-buffer"):
            raise ValueError(f"{path} is a shard of expert trajectories, not a synthetic set: pass a run's "
                             "synthetic.safetensors")
        if "var.images" in tensors:
            raise ValueError(f"{path} is a distillation checkpoint, not a synthetic set: evaluate the set it holds "
                             "with python -m mtt evaluate --synthetic RUN_FOLDER (mtt.distill.stored_set in Python)")
        if metadata.get("format") is None and {"images", "syn_lr"} <= set(tensors) and "labels" not in tensors:
            raise ValueError(f"{path} looks like a distillation run's snapshot, which holds no labels or dataset: "
                             "pass it in its run folder (RUN/snapshots/iter_*.safetensors), where the run's "
                             "config.json says the rest")
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not an mtt synthetic set (format {metadata.get('format')!r}); "
                             "for the original MTT's images_best.pt pass --original-labels labels_best.pt, --dataset and --lr "
                             "(mtt.synthetic.load_original_mtt in Python)")
        missing = [name for name in ("images", "labels") if name not in tensors]
        if missing:
            raise ValueError(f"{path} is a damaged synthetic set: it holds no {' and no '.join(missing)}")
        check_same_space(metadata.get("mtt_version"), metadata.get("dataset", ""), "zca.mean" in tensors,
                         f"the synthetic set {path}", "distil it again with this version, or evaluate it with the "
                         "version that wrote it")
        try:
            zca = ZCA.from_state_dict(tensors) if any(k.startswith("zca.") for k in tensors) else None
            return cls(_as_float32(tensors["images"]), _as_class_indices(tensors["labels"]), _step_size(tensors),
                       metadata.get("dataset", ""), metadata.get("model", "ConvNet"),
                       _as_float32(tensors.get("label_logits")), zca, _config(metadata.get("config", "{}")))
        except (ValueError, RuntimeError, RecursionError) as err:  # RuntimeError: torch's, on a tensor of no use
            raise ValueError(f"{path} is a damaged synthetic set: {err}") from None


def _as_float32(tensor: Tensor | None) -> Tensor | None:
    """float32, as mtt writes images and logits (another tool's float16 or float64 are cast)."""
    if tensor is not None and not tensor.is_floating_point():
        raise ValueError(f"images and label logits must be floating point, got {tensor.dtype}")
    return None if tensor is None else tensor.float()


def _as_class_indices(labels: Tensor) -> Tensor:
    """int64 class indices (another tool's int32 or uint8 are cast; floats and booleans are no class indices)."""
    return labels if labels.is_floating_point() or labels.dtype == torch.bool else labels.long()


def _step_size(tensors: dict[str, Tensor]) -> float | None:
    if "syn_lr" not in tensors:
        return None
    if tensors["syn_lr"].numel() != 1:
        raise ValueError(f"syn_lr must be one number, got a tensor of shape {list(tensors['syn_lr'].shape)}")
    return float(tensors["syn_lr"])


# What a set's config may say of the ConvNet it was distilled through (DistillConfig refuses more too): a width or
# depth past these is a damaged file, not a network to allocate (evaluation builds it).
MAX_WIDTH, MAX_DEPTH = 8192, 1000


def _config(text: str) -> dict[str, Any]:
    """The distillation config recorded with a set: a JSON object, whose network size is a sane one."""
    config = json.loads(text)
    if not isinstance(config, dict):
        raise ValueError(f"its config is a JSON {type(config).__name__}, not an object")
    for name, most in (("width", MAX_WIDTH), ("depth", MAX_DEPTH)):
        value = config.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise ValueError(f"its config's {name} is {value!r}, not a whole number from 1 to {most}")
    return config


def load_original_mtt(images_path: str | os.PathLike, labels_path: str | os.PathLike, dataset: str,
                      syn_lr: float | None = None) -> SyntheticSet:
    """The original code's `images_best.pt` / `labels_best.pt`, loaded without running code.

    The original saves images in its training space (ZCA-whitened for ZCA presets); pass
    the learned step size it logged (`syn_lr`), since those files do not hold it.
    """
    images = _load_tensor(images_path)
    labels = _load_tensor(labels_path)
    if images.dim() != 4 or labels.dim() not in (1, 2) or len(images) != len(labels):
        raise ValueError(f"expected images [N, C, H, W] and labels [N] (or [N, K]), got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    logits = labels.float() if labels.dim() == 2 else None
    hard = labels.argmax(1) if labels.dim() == 2 else labels.long()
    return SyntheticSet(images.float(), hard, syn_lr, dataset, label_logits=logits)


def _load_tensor(path: str | os.PathLike) -> Tensor:
    value = load_plain_torch_file(path)
    if not isinstance(value, Tensor):
        raise ValueError(f"{path} holds a {type(value).__name__}, expected a tensor")
    return value
