"""The networks of MTT, built with the original implementation's modules, names and order.

Every class here creates the same modules, in the same order and under the same names as
GeorgeCazenavette/mtt-distillation (itself from VICO-UoE/DatasetCondensation). So a buffer
written by the original code (per-parameter tensors in `.parameters()` order) maps one to
one onto ours, and a given torch seed draws the same initial weights.

Where the original hard-codes a feature size that only holds for 28x28 / 32x32 inputs, we
measure it with a dry forward pass on zeros instead (or pool adaptively), so the same code
runs at 8x8 (digits) and 64x64 (Tiny ImageNet) and gives the original's shapes at 28 and 32.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ImSize = int | tuple[int, int]

NORMS = ("none", "batch", "instance", "layer", "group")
ACTIVATIONS = ("relu", "sigmoid", "leakyrelu")
POOLINGS = ("avg", "max", "none")


# -----------------------------------------------------------------------------
# shared helpers

def _check_sizes(channels: int, num_classes: int, im_size: ImSize) -> tuple[int, int]:
    """Validate the common arguments up front; return im_size as (height, width)."""
    for what, value in (("channels", channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive int (e.g. channels=3 for RGB, num_classes=10), got {value!r}")
    try:
        hw = (im_size, im_size) if isinstance(im_size, int) else tuple(im_size)
    except TypeError:
        hw = ()
    if len(hw) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in hw):
        raise ValueError(f"im_size must be a positive int or a (height, width) pair of positive ints, got {im_size!r}")
    return hw


def _norm2d(norm: str, c: int) -> nn.Module:
    """The norm used by ResNet and VGG: 'instance' is GroupNorm with one channel per group."""
    if norm == "instance":
        return nn.GroupNorm(c, c, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(c)
    raise ValueError(f"unknown norm {norm!r}: use 'instance' or 'batch'")


def _act(activation: str) -> nn.Module:
    # Not inplace (the original uses ReLU(inplace=True)): in-place ops can trip torch.func
    # transforms (vmap over experts, double backward in the unroll); parameters are the same.
    if activation == "relu":
        return nn.ReLU()
    if activation == "sigmoid":
        return nn.Sigmoid()
    if activation == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    raise ValueError(f"unknown activation {activation!r}: use one of {ACTIVATIONS}")


@torch.no_grad()
def _dry_run(
    net: nn.Module, name: str, embed: Callable[[torch.Tensor], torch.Tensor], channels: int, hw: tuple[int, int]
) -> int:
    """Number of features `embed` makes from one image, with a clear error if the image is too small.

    Runs in eval mode so that BatchNorm running statistics are left untouched.
    """
    def fits(h: int, w: int) -> bool:
        try:
            embed(torch.zeros(1, channels, h, w))
            return True
        except (RuntimeError, ValueError):  # torch's errors for a kernel/window larger than its input
            return False

    was_training = net.training
    net.eval()
    try:
        if not fits(*hw):
            side = next((s for s in range(1, 513) if fits(s, s)), 513)
            raise ValueError(
                f"{channels}x{hw[0]}x{hw[1]} images are too small for {name}: its feature maps shrink below "
                f"1x1 (or to 1x1 under instance norm, which has nothing to normalise). Use images of at "
                f"least {side}x{side} (evaluate and baseline resize them with --image-size {side}; "
                f".resized({side}) of a Dataset or SyntheticSet in Python), or a network "
                f"that fits, e.g. 'ConvNet'."
            )
        return embed(torch.zeros(1, channels, *hw))[0].numel()
    finally:
        net.train(was_training)


# -----------------------------------------------------------------------------
# ConvNet: the network MTT distills with

class ConvNet(nn.Module):
    """depth x [conv3x3(width) -> norm -> activation -> pool 2x2], then one Linear layer.

    Norms: 'instance' (GroupNorm(C, C), the default), 'batch', 'layer' (LayerNorm over
    C x H x W as in the original, so its shape depends on the image size), 'group'
    (GroupNorm(4, C)), 'none'. Pooling: 'avg', 'max', 'none'. For 1-channel inputs the first
    convolution pads by 3 as in the original (which turns 28x28 MNIST into 32x32 features).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        im_size: ImSize,
        width: int = 128,
        depth: int = 3,
        norm: str = "instance",
        activation: str = "relu",
        pooling: str = "avg",
    ) -> None:
        super().__init__()
        h, w = _check_sizes(channels, num_classes, im_size)
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int (the paper uses 128), got {width!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int (3 for 32x32, 4 for 64x64), got {depth!r}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}: use one of {NORMS}")
        if norm == "group" and width % 4:
            raise ValueError(f"norm 'group' uses 4 groups, so width must be a multiple of 4, got {width}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}: use one of {POOLINGS}")
        _act(activation)  # validate before building anything

        layers: list[nn.Module] = []
        x = torch.zeros(1, channels, h, w)  # dry run: the feature shape as layers are added
        with torch.no_grad():
            for d in range(depth):
                conv = nn.Conv2d(x.shape[1], width, kernel_size=3, padding=3 if channels == 1 and d == 0 else 1)
                x = conv(x)
                layers.append(conv)
                if pooling != "none" and min(x.shape[-2:]) < 2:
                    raise ValueError(self._too_small(channels, h, w, depth, d))
                if norm == "instance" and x.shape[-2:].numel() < 2:  # torch refuses to normalise one value
                    raise ValueError(
                        f"{channels}x{h}x{w} images are too small for instance norm (1x1 feature maps); "
                        "use a larger image or another norm"
                    )
                if norm != "none":
                    layers.append(self._norm(norm, x.shape[1:]))
                layers.append(_act(activation))
                if pooling != "none":
                    layers.append(nn.AvgPool2d(2, 2) if pooling == "avg" else nn.MaxPool2d(2, 2))
                    x = layers[-1](x)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(x[0].numel(), num_classes)

    @staticmethod
    def _norm(norm: str, shape: torch.Size) -> nn.Module:
        c = shape[0]
        if norm == "instance":
            return nn.GroupNorm(c, c, affine=True)
        if norm == "batch":
            return nn.BatchNorm2d(c, affine=True)
        if norm == "layer":
            return nn.LayerNorm(shape, elementwise_affine=True)
        return nn.GroupNorm(4, c, affine=True)  # "group"

    @staticmethod
    def _too_small(channels: int, h: int, w: int, depth: int, layer: int) -> str:
        grow = 4 if channels == 1 else 0  # the padding-3 first conv adds 4 pixels
        max_depth, side = 0, min(h, w) + grow
        while side >= 2:
            side, max_depth = side // 2, max_depth + 1
        fix = f"Use depth <= {max_depth} (e.g. 'ConvNetD{max_depth}')" if max_depth else "Use pooling='none'"
        need = max(1, 2**depth - grow)
        return (
            f"{channels}x{h}x{w} images are too small for a depth-{depth} ConvNet: pooling would shrink "
            f"the feature maps to nothing at layer {layer + 1}. {fix}, or images of at least {need}x{need}."
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# -----------------------------------------------------------------------------
# cross-architecture networks

class MLP(nn.Module):
    """Three Linear layers (128, 128, classes). The original's 28*28*1 / 32*32*3 input is C*H*W."""

    def __init__(self, channels: int, num_classes: int, im_size: ImSize) -> None:
        super().__init__()
        h, w = _check_sizes(channels, num_classes, im_size)
        self.fc_1 = nn.Linear(channels * h * w, 128)
        self.fc_2 = nn.Linear(128, 128)
        self.fc_3 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc_1(x.flatten(1)))
        x = F.relu(self.fc_2(x))
        return self.fc_3(x)


class LeNet(nn.Module):
    """LeNet-5; the original's 16*5*5 classifier input is measured instead (it needs >= 12x12)."""

    def __init__(self, channels: int, num_classes: int, im_size: ImSize) -> None:
        super().__init__()
        hw = _check_sizes(channels, num_classes, im_size)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5, padding=2 if channels == 1 else 0),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.fc_1 = nn.Linear(_dry_run(self, "LeNet", self.features, channels, hw), 120)
        self.fc_2 = nn.Linear(120, 84)
        self.fc_3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc_1(self.features(x).flatten(1)))
        x = F.relu(self.fc_2(x))
        return self.fc_3(x)


class AlexNet(nn.Module):
    """The small-image AlexNet of DC/MTT; the original's 192*4*4 classifier input is measured."""

    def __init__(self, channels: int, num_classes: int, im_size: ImSize) -> None:
        super().__init__()
        hw = _check_sizes(channels, num_classes, im_size)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, kernel_size=5, stride=1, padding=4 if channels == 1 else 2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(128, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(192, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(192, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.fc = nn.Linear(_dry_run(self, "AlexNet", self.features, channels, hw), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """The small-image VGG11 of DC/MTT (instance norm by default; norm='batch' is VGG11BN).

    Two changes that leave the parameters, and the function at 3x32x32 / 1x28x28, as they
    were: max pools round up (ceil_mode), so odd sizes (3x28x28: 7 -> 4) and VGG11BN at 8x8
    still reach 1x1 instead of 0x0 (only where a pooled size is odd, e.g. 1x32x32, does the
    function differ from the original's floor); and the original's no-op final AvgPool2d(1)
    is adaptive, so 64x64 still gives the 512 features its classifier expects.
    """

    def __init__(self, channels: int, num_classes: int, im_size: ImSize, norm: str = "instance") -> None:
        super().__init__()
        hw = _check_sizes(channels, num_classes, im_size)
        layers: list[nn.Module] = []
        c_in = channels
        for i, v in enumerate(VGG11_CFG):
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                conv = nn.Conv2d(c_in, v, kernel_size=3, padding=3 if channels == 1 and i == 0 else 1)
                layers += [conv, _norm2d(norm, v), nn.ReLU()]
                c_in = v
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(_dry_run(self, "VGG11", self.features, channels, hw), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block. With avg_pool=True (the '_AP' variants) a stride-2 step becomes
    stride-1 conv + 2x2 average pooling, in both branches, as in the original BasicBlock_AP."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, avg_pool: bool) -> None:
        super().__init__()
        self.downsample_by_pool = avg_pool and stride != 1
        conv_stride = 1 if avg_pool else stride
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = _norm2d(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = _norm2d(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            down = [nn.Conv2d(in_planes, planes, kernel_size=1, stride=conv_stride, bias=False)]
            if avg_pool:
                down.append(nn.AvgPool2d(kernel_size=2, stride=2))
            self.shortcut = nn.Sequential(*down, _norm2d(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.downsample_by_pool:
            out = F.avg_pool2d(out, kernel_size=2, stride=2)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (3x3 stem, no max pool) as in DC/MTT.

    norm='instance' is the original ResNet18, norm='batch' ResNet18BN. avg_pool=True gives the
    '_AP' variants (ResNet18_AP, ResNet18BN_AP), whose classifier reads the flattened last
    feature map (512*4*4 at 32x32, 512*3*3 at 28x28; measured here). The plain variant ends
    with adaptive average pooling, equal to the original's avg_pool2d(4) on its 4x4 map at
    32x32 and 28x28, and still 512 features at 8x8 or 64x64.
    """

    def __init__(
        self, channels: int, num_classes: int, im_size: ImSize, norm: str = "instance", avg_pool: bool = False
    ) -> None:
        super().__init__()
        hw = _check_sizes(channels, num_classes, im_size)
        self.avg_pool = avg_pool
        self.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = _norm2d(norm, 64)
        in_planes = 64
        for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            first = BasicBlock(in_planes, planes, stride, norm, avg_pool)
            setattr(self, f"layer{i}", nn.Sequential(first, BasicBlock(planes, planes, 1, norm, avg_pool)))
            in_planes = planes
        name = "ResNet18" + ("BN" if norm == "batch" else "") + ("_AP" if avg_pool else "")
        self.classifier = nn.Linear(_dry_run(self, name, self.embed, channels, hw), num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features before the classifier."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if not self.avg_pool:
            out = F.adaptive_avg_pool2d(out, 1)
        return out.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


# -----------------------------------------------------------------------------
# small-image versions of torchvision models (not in the original code)

def mobilenet_v3(channels: int, num_classes: int, im_size: ImSize) -> nn.Module:
    """torchvision's mobilenet_v3_small whose stem conv takes `channels` with stride 1 (not 2).

    The network then downsamples 16x instead of 32x: 32x32 ends on a 2x2 map instead of 1x1.
    Runs at any size (8x8 ends on 1x1).
    """
    from torchvision.models import mobilenet_v3_small

    hw = _check_sizes(channels, num_classes, im_size)
    net = mobilenet_v3_small(num_classes=num_classes)
    stem = net.features[0][0]
    net.features[0][0] = nn.Conv2d(channels, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.features[0][0].weight, mode="fan_out")  # torchvision's init for its convs
    _dry_run(net, "MobileNetV3", net, channels, hw)
    return net


def swin_t(channels: int, num_classes: int, im_size: ImSize) -> nn.Module:
    """torchvision's Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24) with 2x2 patches and 4x4 windows.

    At 32x32 the four stages see 16, 8, 4 and 2 tokens a side (torchvision pads the last,
    smaller than a window, as it pads any size that is not a multiple of the window). No
    stochastic depth: on the tiny batches of a distilled set a dropped block gets no gradient.
    Needs at least 2x2 images.
    """
    from torchvision.models.swin_transformer import SwinTransformer

    hw = _check_sizes(channels, num_classes, im_size)
    net = SwinTransformer(patch_size=[2, 2], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                          window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=num_classes)
    net.features[0][0] = nn.Conv2d(channels, 96, kernel_size=2, stride=2)
    _dry_run(net, "SwinT", net, channels, hw)
    return net


# -----------------------------------------------------------------------------
# building by name (the original's names)

Builder = Callable[[int, int, tuple[int, int], int, int], nn.Module]


def _convnet(**fixed) -> Builder:
    def build(channels: int, num_classes: int, im_size: tuple[int, int], width: int, depth: int) -> nn.Module:
        return ConvNet(channels, num_classes, im_size, **({"width": width, "depth": depth} | fixed))
    return build


_BUILDERS: dict[str, Builder] = {
    "ConvNet": _convnet(),
    **{f"ConvNetD{d}": _convnet(depth=d) for d in range(1, 6)},
    **{f"ConvNetW{w}": _convnet(width=w) for w in (32, 64, 128, 256)},
    "ConvNetAS": _convnet(activation="sigmoid"),
    "ConvNetAR": _convnet(activation="relu"),
    "ConvNetAL": _convnet(activation="leakyrelu"),
    "ConvNetNP": _convnet(pooling="none"),
    "ConvNetMP": _convnet(pooling="max"),
    "ConvNetAP": _convnet(pooling="avg"),
    "ConvNetNN": _convnet(norm="none"),
    "ConvNetBN": _convnet(norm="batch"),
    "ConvNetIN": _convnet(norm="instance"),
    "ConvNetLN": _convnet(norm="layer"),
    "ConvNetGN": _convnet(norm="group"),
    "ResNet18": lambda c, n, s, w, d: ResNet18(c, n, s, norm="instance"),
    "ResNet18BN": lambda c, n, s, w, d: ResNet18(c, n, s, norm="batch"),
    "ResNet18_AP": lambda c, n, s, w, d: ResNet18(c, n, s, norm="instance", avg_pool=True),
    "ResNet18BN_AP": lambda c, n, s, w, d: ResNet18(c, n, s, norm="batch", avg_pool=True),
    "VGG11": lambda c, n, s, w, d: VGG11(c, n, s, norm="instance"),
    "VGG11BN": lambda c, n, s, w, d: VGG11(c, n, s, norm="batch"),
    "AlexNet": lambda c, n, s, w, d: AlexNet(c, n, s),
    "LeNet": lambda c, n, s, w, d: LeNet(c, n, s),
    "MLP": lambda c, n, s, w, d: MLP(c, n, s),
    "MobileNetV3": lambda c, n, s, w, d: mobilenet_v3(c, n, s),
    "SwinT": lambda c, n, s, w, d: swin_t(c, n, s),
}

NETWORK_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def check_network_name(name: str) -> None:
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, NETWORK_NAMES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown network {name!r}: {hint}available: {', '.join(NETWORK_NAMES)}")


def fixed_sizes(name: str) -> dict[str, int]:
    """The size a ConvNet's name fixes ({'width': 32} for 'ConvNetW32', {'depth': 4} for 'ConvNetD4'), which
    get_network's argument cannot change."""
    match = re.fullmatch(r"ConvNet([WD])(\d+)", name)
    return {{"W": "width", "D": "depth"}[match[1]]: int(match[2])} if match else {}


def check_sizes_apply(name: str, width: int | None, depth: int | None) -> None:
    """Refuse a width or depth (flags --width/--depth) that network `name` would silently ignore."""
    fixed = fixed_sizes(name)
    for size, value in (("width", width), ("depth", depth)):
        if value is None:
            continue
        if not name.startswith("ConvNet"):
            raise ValueError(f"--{size} applies to the ConvNet family only, not {name}: leave it out")
        if fixed.get(size, value) != value:
            raise ValueError(f"{name} has {size} {fixed[size]}, not {value}: leave --{size} out, or "
                             f"use --model ConvNet --{size} {value}")


def get_network(
    name: str, channels: int, num_classes: int, im_size: ImSize, width: int = 128, depth: int = 3
) -> nn.Module:
    """Build a network by its name in the original code (see NETWORK_NAMES), on the CPU.

    `width` and `depth` apply to the ConvNet family only; a name that fixes one of them
    ('ConvNetD4', 'ConvNetW32') overrides the argument.
    """
    check_network_name(name)
    return _BUILDERS[name](channels, num_classes, _check_sizes(channels, num_classes, im_size), width, depth)
