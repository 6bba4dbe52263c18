"""Named recipes (`--method`): MTT and its successors as settings of the same loop.

A recipe switches on the options its paper uses (DistillConfig's successor fields) over the
preset for (dataset, IPC), with the authors' hyper-parameters where they published them:

- mtt: the 2022 algorithm, nothing added.
- tesla (Cui et al., ICML 2023): `backward="tesla"` (constant memory, APPROXIMATE: no Hessian
  term) and teacher labels (softmax of the target checkpoint's logits). MTT's presets otherwise.
- ftd (Du et al., CVPR 2023): EMA of the images, decay 0.9999 / 0.9995 / 0.999 at CIFAR-10
  IPC 1 / 10 / 50; at CIFAR-100 IPC 10 its README's command (decay 0.9995, start epochs up to 40,
  ZCA). FTD's experts are trained with GSAM: that is a setting of `python -m mtt experts`
  (--sam-rho 0.01 --gsam-alpha 0.3), not of distillation.
- datm (Guo et al., ICLR 2024): images from correctly classified real ones, learned soft labels
  from the experts' mean correct logits (momentum 0.9), the growing start-epoch window and the
  loss threshold; the authors' CIFAR table (DESIGN.md) in full, 10,000 iterations; at CIFAR-100
  IPC 50, as its config, images drawn at random and labels from one expert's final logits. Its
  experts are trained for 100 epochs (start epochs up to 70).
- att (Liu et al., ECCV 2024): the matching loss at the student step closest to the target (in L1,
  as its code), FTD's EMA of the images, and the hyper-parameters of its README's commands at
  CIFAR-10/100 IPC 1/10/50 and Tiny ImageNet IPC 1/10, iterations included (CIFAR-10 IPC 50's
  command says 1,000,000: a run meant to be stopped; pass --iterations). Its experts are trained
  with batch 512.
- pad (Li et al., 2024): DATM's recipe plus the mask of shallow-layer parameters in the loss,
  PAD's `depth_ratio` (CIFAR-10: 0 at IPC 1, 0.5 at IPC 10 and 50; CIFAR-100: 0.5, 0.5, 0; elsewhere as
  CIFAR-10). Its easy-to-hard experts are a setting
  of `python -m mtt experts` (--easy-to-hard, --drop-easy).

Where the authors give no values (digits, Fashion-MNIST, ...) ours are scaled to the preset: FTD's
(and ATT's) EMA averages over about a tenth of the run (`_ftd_decay`), DATM's window is
`_datm_window`. Any field can still be overridden after the recipe.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtt.distill import DistillConfig

METHODS = ("mtt", "tesla", "ftd", "datm", "att", "pad")

# What the experts need for a recipe's full effect (printed when a run starts with experts that lack it).
EXPERT_NOTES = {
    "ftd": "FTD's experts are trained with GSAM: python -m mtt experts ... --sam-rho 0.01 --gsam-alpha 0.3 "
           "(FTD's alpha is 0.3 at CIFAR-10 IPC 1 and 10, 1 elsewhere)",
    "datm": "DATM's CIFAR experts are trained for 100 epochs (start epochs up to 70) with FTD's GSAM: "
            "python -m mtt experts ... --epochs 100 --sam-rho 0.01 --gsam-alpha 0.3",
    "att": "ATT's experts are trained with batch 512 (its buffer_ATT.py): python -m mtt experts ... --batch-size 512",
    "pad": "PAD's experts are trained with GSAM and see the training data easy to hard: python -m mtt experts ... "
           "--epochs 100 --sam-rho 0.01 --gsam-alpha 0.3 --easy-to-hard 0.75 --easy-to-hard-epochs 20 "
           "--drop-easy 40:0.1 60:0.2",
}


def expert_note(method: str, training: dict[str, Any]) -> str | None:
    """EXPERT_NOTES[method] unless the experts have it, by `training`, how they were trained (ExpertBuffers.training:
    config.json's settings; {} when unrecorded)."""
    gsam = (training.get("sam_rho") or 0) > 0 and (training.get("gsam_alpha") or 0) > 0
    long = (training.get("epochs") or 0) >= 100
    have = {"ftd": gsam, "datm": gsam and long, "att": training.get("batch_size") == 512,
            "pad": gsam and long and bool(training.get("easy_to_hard") or training.get("drop_easy"))}
    return EXPERT_NOTES[method] if method in EXPERT_NOTES and not have[method] else None

_DATM_OPTIONS = dict(init="correct", soft_labels=True, label_init="experts", label_momentum=0.9)

# DATM's authors' settings (DESIGN.md), (dataset, ipc) -> fields. lr_labels is their lr_y.
_DATM: dict[tuple[str, int], dict[str, Any]] = {
    ("cifar10", 1): dict(syn_steps=80, expert_epochs=2, max_start_epoch=4, lr_img=100, lr_lr=1e-7, lr_labels=5,
                         batch_syn=10, loss_threshold=1.1),
    ("cifar10", 10): dict(syn_steps=80, expert_epochs=2, current_max_start_epoch=10, max_start_epoch=20,
                          expansion_end=1000, lr_img=100, lr_lr=1e-5, lr_labels=2, batch_syn=100, loss_threshold=1.0),
    ("cifar10", 50): dict(syn_steps=80, expert_epochs=2, current_max_start_epoch=20, max_start_epoch=40,
                          expansion_end=2000, lr_img=1000, lr_lr=1e-5, lr_labels=2, batch_syn=500, loss_threshold=1.0),
    ("cifar100", 1): dict(syn_steps=40, expert_epochs=3, current_max_start_epoch=10, max_start_epoch=20,
                          expansion_end=1000, lr_img=1000, lr_lr=1e-5, lr_labels=10, batch_syn=1000,
                          loss_threshold=1.0),
    ("cifar100", 10): dict(syn_steps=80, expert_epochs=2, current_max_start_epoch=30, max_start_epoch=50,
                           expansion_end=2000, lr_img=1000, lr_lr=1e-5, lr_labels=10, batch_syn=1000,
                           loss_threshold=1.0),
    ("cifar100", 50): dict(syn_steps=80, expert_epochs=2, min_start_epoch=20, max_start_epoch=70, lr_img=1000,
                           lr_lr=1e-5, lr_labels=10, batch_syn=1000, loss_threshold=1.0,
                           init="real", label_init="first-expert"),  # its config's pix_init: real
}
_DATM_COMMON = dict(iterations=10000, lr_teacher=0.01, zca=True)

# FTD's published settings (its paper's CIFAR-10 decays; its README's CIFAR-100 IPC 10 command).
_FTD = {("cifar10", 1): dict(ema_decay=0.9999), ("cifar10", 10): dict(ema_decay=0.9995),
        ("cifar10", 50): dict(ema_decay=0.999),
        ("cifar100", 10): dict(ema_decay=0.9995, max_start_epoch=40, zca=True)}
# ATT's README's commands (distill_ATT.py; batch_syn None: the whole set per step, as theirs).
_ATT: dict[tuple[str, int], dict[str, Any]] = {
    ("cifar10", 1): dict(syn_steps=80, expert_epochs=4, max_start_epoch=2, lr_img=100, lr_lr=1e-7, lr_teacher=0.01,
                         zca=True, ema_decay=0.9999, iterations=6000),
    ("cifar10", 10): dict(syn_steps=30, expert_epochs=2, max_start_epoch=20, lr_img=1e4, lr_lr=1e-4, lr_teacher=0.01,
                          zca=True, ema_decay=0.9999, iterations=60000),
    ("cifar10", 50): dict(syn_steps=50, expert_epochs=2, max_start_epoch=40, lr_img=100, lr_lr=1e-5,
                          lr_teacher=0.001, zca=False, ema_decay=0.999, iterations=1_000_000),
    ("cifar100", 1): dict(syn_steps=50, expert_epochs=4, max_start_epoch=20, lr_img=500, lr_lr=1e-5, lr_teacher=0.01,
                          zca=True, ema_decay=0.9995, iterations=3000),
    ("cifar100", 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=40, lr_img=1000, lr_lr=1e-5,
                           lr_teacher=0.01, zca=False, ema_decay=0.9995, iterations=200000),
    ("cifar100", 50): dict(syn_steps=80, expert_epochs=2, max_start_epoch=40, lr_img=1000, lr_lr=1e-5,
                           lr_teacher=0.01, zca=True, batch_syn=1200, ema_decay=0.999, iterations=100000),
    ("tiny-imagenet", 1): dict(syn_steps=30, expert_epochs=2, max_start_epoch=10, lr_img=1e4, lr_lr=1e-4,
                               lr_teacher=0.01, ema_decay=0.999, iterations=10000),
    ("tiny-imagenet", 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=40, lr_img=1e4, lr_lr=1e-6,
                                lr_teacher=0.001, batch_syn=None, ema_decay=0.999, iterations=80000),
}
# PAD's depth_ratio (its configs); elsewhere by IPC as on CIFAR-10.
_PAD_FRACTION = {("cifar10", 1): 0.0, ("cifar10", 10): 0.5, ("cifar10", 50): 0.5,
                 ("cifar100", 1): 0.5, ("cifar100", 10): 0.5, ("cifar100", 50): 0.0}


def apply_recipe(config: DistillConfig, method: str, overrides: dict[str, Any] | None = None) -> DistillConfig:
    """`config` (a preset) with `method`'s options and published hyper-parameters set, and method recorded.

    With `overrides` (the user's settings): the recipe's derived values (DATM's window, FTD's decay) follow the
    overridden config, and the overrides still win over the recipe's own.
    """
    if overrides:
        config = dataclasses.replace(config, **overrides)
        return dataclasses.replace(apply_recipe(config, method), **overrides)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    key = (config.dataset, config.ipc)
    fields: dict[str, Any] = {}
    if method == "tesla":
        fields = dict(backward="tesla", teacher_labels=True)
    elif method == "ftd":
        fields = _FTD.get(key, dict(ema_decay=_ftd_decay(config.iterations)))
    elif method == "att":
        fields = dict(match="closest", **_ATT.get(key, dict(ema_decay=_ftd_decay(config.iterations))))
    elif method in ("datm", "pad"):
        fields = {**_DATM_OPTIONS, **(_DATM_COMMON | _DATM[key] if key in _DATM else _datm_window(config))}
        if method == "pad":
            fields["pad_fraction"] = _PAD_FRACTION.get(key, _PAD_FRACTION.get(("cifar10", config.ipc), 0.5))
    return dataclasses.replace(config, method=method, **fields)


def _ftd_decay(iterations: int) -> float:
    """FTD's decay where its authors give none (ours): the EMA averages over the last tenth of the run,
    and over at least the last two iterations, so that a short run still has the EMA the method is."""
    return 1 - 1 / max(2.0, iterations / 10)


def _datm_window(config: DistillConfig) -> dict[str, Any]:
    """DATM where its authors give no values (ours): the window starts at half the preset's start range
    and opens fully halfway through the run; threshold and lr_y as theirs at CIFAR-10 IPC 10."""
    return dict(current_max_start_epoch=max(1, config.max_start_epoch // 2), expansion_end=max(1, config.iterations // 2),
                loss_threshold=1.0, lr_labels=2.0)
