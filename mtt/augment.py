"""Differentiable Siamese Augmentation (DSA), split into sampling and applying.

Same operations and parameter ranges as the original MTT/DSA code (`ParamDiffAug`,
`DiffAugment` in single-op mode 'S', per-sample parameters). Sampling draws everything
from an explicit `torch.Generator` into a `DSAParams`; `apply_params` is a pure,
differentiable function of (x, params). The checkpointed backward in `mtt.unroll` relies
on this: it re-runs a step with the exact augmentation it saw in the forward pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from mtt.device import to_device

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")

# Parameter ranges of the original ParamDiffAug.
PROB_FLIP = 0.5
RATIO_SCALE = 1.2
RATIO_ROTATE = 15.0  # degrees
RATIO_CROP_PAD = 0.125
RATIO_CUTOUT = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5


@dataclass(frozen=True, eq=False)  # eq on tensor fields would be ambiguous
class DSAParams:
    """One draw of DSA: the chosen op and the per-sample tensors it needs (others stay None)."""

    op: str  # one of OPS, or "none"
    batch_size: int
    channels: int
    im_size: tuple[int, int]
    theta: Tensor | None = None  # scale, rotate: [B, 2, 3] affine matrices for affine_grid
    flip: Tensor | None = None  # flip: [B] bool, True = mirror left-right
    brightness: Tensor | None = None  # color: [B] in [0, 1)
    saturation: Tensor | None = None  # color: [B] in [0, 1)
    contrast: Tensor | None = None  # color: [B] in [0, 1)
    translation: Tensor | None = None  # crop: [B, 2] long (rows, cols) shift
    offset: Tensor | None = None  # cutout: [B, 2] long (row, col) centre of the hole

    def to(self, device: torch.device | str) -> DSAParams:
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: to_device(v, device) for k, v in tensors.items() if isinstance(v, Tensor)})

    def rows(self, start: int, stop: int) -> DSAParams:
        """The draw of samples start..stop-1 only (a slice of the batch)."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, batch_size=stop - start,
                       **{k: v[start:stop] for k, v in tensors.items() if isinstance(v, Tensor)})


def parse_strategy(strategy: str) -> list[str]:
    """Op names of a strategy string ("color_crop_..."); [] for "none" or "". Unknown names raise."""
    if strategy.lower() in ("", "none"):
        return []
    ops = strategy.split("_")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        valid = ", ".join(OPS)
        raise ValueError(f"unknown DSA op(s) {unknown} in strategy {strategy!r}; valid ops: {valid} (or 'none')")
    return ops


def _crop_shift(size: int) -> int:
    return int(size * RATIO_CROP_PAD + 0.5)


def _cutout_size(size: int) -> int:
    return int(size * RATIO_CUTOUT + 0.5)


def sample_params(
    strategy: str,
    batch_size: int,
    channels: int,
    im_size: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> DSAParams:
    """Pick ONE op of `strategy` and draw its per-sample parameters, all from `generator`.

    Tensors are drawn on the generator's device (so a CPU generator gives the same draw
    whatever the target device) and then moved to `device` (default: generator's device).
    """
    ops = parse_strategy(strategy)
    h, w = im_size
    meta = dict(batch_size=batch_size, channels=channels, im_size=(h, w))
    if not ops:
        return DSAParams("none", **meta)
    gdev = generator.device
    op = ops[int(torch.randint(len(ops), (1,), generator=generator, device=gdev))]

    def rand() -> Tensor:  # [B] in [0, 1)
        return torch.rand(batch_size, generator=generator, device=gdev)

    def randint(low: int, high: int) -> Tensor:  # [B] in [low, high)
        return torch.randint(low, high, (batch_size,), generator=generator, device=gdev)

    if op == "color":  # brightness, saturation, contrast draws in the original's order
        params = DSAParams(op, **meta, brightness=rand(), saturation=rand(), contrast=rand())
    elif op == "crop":
        sh, sw = _crop_shift(h), _crop_shift(w)
        params = DSAParams(op, **meta, translation=torch.stack([randint(-sh, sh + 1), randint(-sw, sw + 1)], 1))
    elif op == "cutout":
        # Upper bound as in the original: an even-sized hole may be centred one past the edge.
        ch, cw = _cutout_size(h), _cutout_size(w)
        params = DSAParams(op, **meta, offset=torch.stack([randint(0, h + 1 - ch % 2), randint(0, w + 1 - cw % 2)], 1))
    elif op == "flip":
        params = DSAParams(op, **meta, flip=rand() < PROB_FLIP)
    elif op == "scale":
        sx = rand() * (RATIO_SCALE - 1 / RATIO_SCALE) + 1 / RATIO_SCALE
        sy = rand() * (RATIO_SCALE - 1 / RATIO_SCALE) + 1 / RATIO_SCALE
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
        params = DSAParams(op, **meta, theta=theta)
    else:  # rotate
        angle = (rand() - 0.5) * 2 * RATIO_ROTATE / 180 * math.pi
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        params = DSAParams(op, **meta, theta=theta)
    return params if device is None else params.to(device)


def _color(x: Tensor, p: DSAParams) -> Tensor:
    b, s, c = (t.to(x.dtype).view(-1, 1, 1, 1) for t in (p.brightness, p.saturation, p.contrast))
    x = x + (b - 0.5) * BRIGHTNESS
    mean = x.mean(dim=1, keepdim=True)  # per-pixel mean over channels
    x = (x - mean) * (s * SATURATION) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # per-image mean
    return (x - mean) * (c + CONTRAST) + mean


def _translate(x: Tensor, shift: Tensor, dim: int, max_shift: int) -> Tensor:
    """out[..., i, ...] = x[..., i + shift, ...] along `dim` per sample, zero outside the image.

    Built from static slices of a zero-padded copy selected with torch.where, rather than
    gather (whose CUDA backward uses atomics) or one-hot matmuls (which TF32 would round):
    exact, deterministic, and free of data-dependent control flow, so it vmaps.
    """
    n = x.shape[dim]
    xp = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [max_shift, max_shift])
    shift = shift.view(-1, 1, 1, 1)
    out = torch.zeros_like(x)
    for t in range(-max_shift, max_shift + 1):
        out = torch.where(shift == t, xp.narrow(dim, max_shift + t, n), out)
    return out


def _crop(x: Tensor, p: DSAParams) -> Tensor:
    # The original pads by one zero pixel and clamps indices into the pad, i.e. it shifts
    # the image by `translation` and fills the uncovered border with zeros.
    h, w = x.shape[-2:]
    x = _translate(x, p.translation[:, 0], 2, _crop_shift(h))
    return _translate(x, p.translation[:, 1], 3, _crop_shift(w))


def _cutout(x: Tensor, p: DSAParams) -> Tensor:
    # Zero a (ch x cw) square whose top-left is offset - size // 2, clipped to the image.
    h, w = x.shape[-2:]
    ch, cw = _cutout_size(h), _cutout_size(w)
    top = (p.offset[:, 0] - ch // 2).view(-1, 1)
    left = (p.offset[:, 1] - cw // 2).view(-1, 1)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + ch)  # [B, H]
    in_cols = (cols >= left) & (cols < left + cw)  # [B, W]
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep.unsqueeze(1).to(x.dtype)


def _flip(x: Tensor, p: DSAParams) -> Tensor:
    return torch.where(p.flip.view(-1, 1, 1, 1), x.flip(3), x)


def _affine(x: Tensor, p: DSAParams) -> Tensor:
    # F.affine_grid(theta, align_corners=True) written out elementwise: affine_grid has no
    # vmap batching rule for per-expert theta, and its bmm would be rounded by TF32.
    h, w = x.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device),
        torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device),
        indexing="ij",
    )
    t = p.theta.to(x.dtype).view(-1, 2, 3, 1, 1)
    grid = torch.stack([t[:, i, 0] * xs + t[:, i, 1] * ys + t[:, i, 2] for i in (0, 1)], dim=-1)  # [B, H, W, (x, y)]
    # Bilinear, zero padding, align_corners=True as in the original. Note: grid_sample's
    # backward is nondeterministic on CUDA (atomicAdd into the input gradient).
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


_APPLY = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _affine, "rotate": _affine}


def apply_params(x: Tensor, params: DSAParams) -> Tensor:
    """Apply a drawn augmentation to x [B, C, H, W]; deterministic and differentiable in x."""
    expected = (params.batch_size, params.channels, *params.im_size)
    if tuple(x.shape) != expected:
        raise ValueError(f"DSA params were drawn for a batch of shape {list(expected)}, got x of shape {list(x.shape)}")
    if params.op == "none":
        return x
    return _APPLY[params.op](x, params)


class DSA:
    """DSA with a fixed strategy: `dsa(x, generator)` or `dsa.augment(x, generator)` to replay later."""

    def __init__(self, strategy: str = DEFAULT_STRATEGY):
        parse_strategy(strategy)  # fail at construction, not at the first batch
        self.strategy = strategy

    def augment(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, DSAParams]:
        if x.dim() != 4:
            raise ValueError(f"DSA expects images shaped [B, C, H, W], got {list(x.shape)}")
        b, c, h, w = x.shape
        params = sample_params(self.strategy, b, c, (h, w), generator, device=x.device)
        return apply_params(x, params), params

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.augment(x, generator)[0]

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r})"
