"""`python -m mtt <command>`: headless runs of every stage.

Each command is a pair: `add_<command>(subparsers)` declares its flags and sets
`run=<handler>`; the handler calls the package and returns a JSON-able dict, which
`--json` prints as the last line of stdout (progress bars go to stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from mtt.buffers import ExpertBuffers
    from mtt.data import Dataset
    from mtt.distill import DistillConfig
    from mtt.evaluate import EvalConfig
    from mtt.synthetic import SyntheticSet

# The original code's flags (its distill.py and buffer.py) that go by another name here than their own with dashes
# for underscores (--syn_steps is --syn-steps): said when one is given.
ORIGINAL_FLAGS = {"--Iteration": "--iterations", "--pix_init": "--init", "--eval_it": "--eval-every",
                  "--num_eval": "--eval-repeats", "--epoch_eval_train": "--eval-epochs", "--data_path": "--data-root",
                  "--buffer_path": "--buffers", "--train_epochs": "experts --epochs",
                  "--batch_train": "experts --batch-size", "--mom": "experts --momentum",
                  "--l2": "experts --weight-decay"}


class _Parser(argparse.ArgumentParser):
    """Bad flags end with one `error:` line naming the flag, like every other error here."""

    def error(self, message: str) -> None:
        _report(f"error: {message}{self._as_named_here(message)} (see {self.prog} --help)")
        raise SystemExit(2)

    def _as_named_here(self, message: str) -> str:
        """What the original code's flags among the unrecognized ones are called here."""
        if "unrecognized arguments:" not in message:
            return ""
        commands = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        ours = {flag for a in commands for p in a.choices.values() for flag in p._option_string_actions}
        given = [word.split("=")[0] for word in message.split("unrecognized arguments:")[1].split()]
        renamed = {flag: ORIGINAL_FLAGS.get(flag, flag.replace("_", "-")) for flag in given if flag.startswith("--")}
        said = [f"{flag} is {here}" for flag, here in renamed.items()
                if here != flag and (here in ours or flag in ORIGINAL_FLAGS)]
        return f"; as the original code's flags are named here: {', '.join(said)}" if said else ""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none to show (None, off switches)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _strategy(text: str) -> str:
    """A DSA strategy ('color_crop_...' or 'none'), checked where it is given."""
    from mtt.augment import parse_strategy

    try:
        parse_strategy(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _float_above(low: float, *, inclusive: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value >= low if inclusive else value > low):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low:g}, got {text}")
        return value
    return parse


POSITIVE, NON_NEGATIVE = _int_at_least(1), _int_at_least(0)
RATE, NON_NEGATIVE_RATE = _float_above(0.0), _float_above(0.0, inclusive=True)


def _seed(text: str) -> int:
    """A seed, which numbers random streams (mtt.seeds): an int in [0, 65536)."""
    from mtt.seeds import STREAMS_PER_SEED

    value = NON_NEGATIVE(text)
    if value >= STREAMS_PER_SEED:
        raise argparse.ArgumentTypeError(f"must be < {STREAMS_PER_SEED}, got {value}")
    return value


def _fraction(text: str) -> float:
    """A number in [0, 1): a momentum, a decay, a share."""
    value = NON_NEGATIVE_RATE(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _preset_name(text: str) -> str:
    dataset, colon, ipc = text.partition(":")
    if text not in ("paper", "none") and not (dataset and colon and ipc.isdigit()):
        raise argparse.ArgumentTypeError(f"expected 'paper', 'none' or DATASET:IPC (e.g. cifar10:10), got {text!r}")
    return text


def _drop_stage(text: str) -> tuple[int, float]:
    """AFTER:SHARE, e.g. 40:0.1: after epoch 40 every class leaves out its easiest 10 %."""
    after, _, share = text.partition(":")
    try:
        stage = int(after), float(share)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected AFTER:SHARE such as 40:0.1, got {text!r}") from None
    if stage[0] < 0 or not 0 <= stage[1] < 1:
        raise argparse.ArgumentTypeError(f"AFTER must be >= 0 and SHARE in [0, 1), got {text!r}")
    return stage


def _common(parser: argparse.ArgumentParser, seed_help: str = "random seed in [0, 65536)") -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--seed", type=_seed, default=0, help=seed_help)
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")


def _announce(what: str, settings: dict[str, Any], device: str) -> None:
    """The resolved configuration, printed at the start of every run, with the device it runs on (not 'auto')."""
    from mtt.device import resolve_device

    settings = settings | {"device": resolve_device(device)}
    print(f"{what}: " + ", ".join(f"{k}={v}" for k, v in settings.items()), file=sys.stderr)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(add: Callable[[argparse._SubParsersAction], None]):
    """Register a command's parser builder (decorator)."""
    COMMANDS.append(add)
    return add


@command
def add_experts(subparsers: argparse._SubParsersAction) -> None:
    from mtt.augment import DEFAULT_STRATEGY

    p = subparsers.add_parser("experts", help="train expert trajectories (resumes into --out; torchrun-aware)",
                              formatter_class=_Formatter)
    p.add_argument("--dataset", required=True, help="digits, fashion-mnist, mnist, cifar10, cifar100, svhn, ...")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files")
    p.add_argument("--zca", action="store_true", help="train in ZCA-whitened space (eps 0.1)")
    p.add_argument("--train-per-class", type=POSITIVE, default=None,
                   help="keep N training images per class (quick runs; default: all)")
    p.add_argument("--model", default="ConvNet", help="network (ConvNet, ConvNetD4, ResNet18, ...)")
    p.add_argument("--width", type=POSITIVE, default=None, help="ConvNet width (default: 128)")
    p.add_argument("--depth", type=POSITIVE, default=None, help="ConvNet depth (default: 3)")
    p.add_argument("--num-experts", type=POSITIVE, default=10, help="trajectories to train")
    p.add_argument("--epochs", type=POSITIVE, default=50, help="epochs per trajectory (snapshots: epochs + 1)")
    p.add_argument("--lr", type=RATE, default=0.01, help="SGD learning rate (the paper's lr_teacher)")
    p.add_argument("--batch-size", type=POSITIVE, default=256, help="SGD minibatch")
    p.add_argument("--momentum", type=_fraction, default=0.0, help="SGD momentum, in [0, 1)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE_RATE, default=0.0, help="SGD weight decay")
    p.add_argument("--dsa", type=_strategy, default=DEFAULT_STRATEGY, help="DSA strategy, or 'none'")
    p.add_argument("--parallel", type=POSITIVE, default=1,
                   help="experts trained at once on one device (vmap); the same as one at a time up to float32 "
                        "round-off, not bit for bit")
    p.add_argument("--sam-rho", type=NON_NEGATIVE_RATE, default=0.0,
                   help="FTD: adaptive SAM/GSAM radius (FTD: 0.01); 0: plain SGD")
    p.add_argument("--gsam-alpha", type=NON_NEGATIVE_RATE, default=0.0,
                   help="FTD: GSAM's surrogate-gap weight, with --sam-rho (FTD: 0.3 on CIFAR-10); 0: plain SAM")
    p.add_argument("--easy-to-hard", type=NON_NEGATIVE_RATE, default=0.0, metavar="FRACTION",
                   help="PAD: share of each class's easiest images (by EL2N) trained on in epoch 0, growing "
                        "linearly to all (PAD: 0.75); 0: off")
    p.add_argument("--easy-to-hard-epochs", type=POSITIVE, default=20, metavar="E",
                   help="PAD: epoch from which every image is used (PAD's add_end_epoch)")
    p.add_argument("--drop-easy", type=_drop_stage, nargs="+", default=(), metavar="AFTER:SHARE",
                   help="PAD's later stages: in the epochs after AFTER every class leaves out its easiest SHARE "
                        "(PAD: 40:0.1 60:0.2); works with or without --easy-to-hard")
    p.add_argument("--out", required=True, help="buffer folder; finished experts there are not trained again")
    _common(p, seed_help="random seed in [0, 65536); two seeds share no expert")
    p.set_defaults(run=run_experts)


def run_experts(args: argparse.Namespace) -> dict[str, Any]:
    from mtt.data import load_dataset
    from mtt.distributed import is_main_process
    from mtt.experts import ExpertConfig, train_experts
    from mtt.io import ensure_writable_dir
    from mtt.networks import check_network_name, check_sizes_apply, fixed_sizes

    main = is_main_process()  # under torchrun rank 0 reports
    if not main:
        args.json = False
    check_network_name(args.model)
    check_sizes_apply(args.model, args.width, args.depth)
    # Recorded as the network has them: given, fixed by its name (ConvNetW32), else ExpertConfig's default.
    sizes = {"width": ExpertConfig.width, "depth": ExpertConfig.depth} | fixed_sizes(args.model)
    config = ExpertConfig(model=args.model, num_experts=args.num_experts, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, momentum=args.momentum, weight_decay=args.weight_decay,
                          dsa=args.dsa, parallel=args.parallel, seed=args.seed, width=args.width or sizes["width"],
                          depth=args.depth or sizes["depth"],
                          sam_rho=args.sam_rho, gsam_alpha=args.gsam_alpha, easy_to_hard=args.easy_to_hard,
                          easy_to_hard_epochs=args.easy_to_hard_epochs, drop_easy=args.drop_easy)
    ensure_writable_dir(args.out)  # before loading data and training, not after
    dataset = load_dataset(args.dataset, args.data_root, zca=args.zca)
    if args.train_per_class:
        dataset = dataset.take_per_class(args.train_per_class, seed=args.seed)
    if main:
        _announce("experts", {"dataset": dataset.name, "zca": args.zca, "train_images": len(dataset.train_images),
                              **dataclasses.asdict(config), "out": args.out}, args.device)
    result = train_experts(dataset, config, args.out, device=args.device, progress=not args.no_progress)
    if main:
        final = [100 * acc for acc in result["test_acc"]]
        accuracy = (f"; test accuracy after the last epoch {sum(final) / len(final):.1f} % (from {min(final):.1f} to "
                    f"{max(final):.1f})" if final else "")
        print(f"saved: {result['experts']} experts in {args.out} ({result['trained']} trained now){accuracy}",
              file=sys.stderr)
    return result


@command
def add_distill(subparsers: argparse._SubParsersAction) -> None:
    from mtt.tracking import TRACKERS
    from mtt.distill import INITS, LABEL_INITS
    from mtt.recipes import METHODS
    from mtt.unroll import APPROXIMATE_MODES, BACKWARD_MODES, MATCH_MODES

    p = subparsers.add_parser("distill", help="distil a dataset by matching expert trajectories (torchrun-aware)",
                              formatter_class=_Formatter,
                              description="Unset hyper-parameters come from the preset (--preset); the network "
                                          "(--model/--width/--depth) from the experts. With --resume they stay "
                                          "at the run's: only the flags given change them.")
    p.add_argument("--dataset", required=True, help="digits, fashion-mnist, mnist, cifar10, cifar100, svhn, ...")
    p.add_argument("--ipc", type=POSITIVE, required=True, help="synthetic images per class")
    p.add_argument("--buffers", required=True,
                   help="expert folder (ours, or the original MTT's {root}/{CIFAR10|CIFAR10_NO_ZCA|...}/{model}/"
                        "replay_buffer_{n}.pt, its model folder or one file), or hf://OWNER/REPO[/SUBPATH][@REVISION]")
    p.add_argument("--max-experts", type=POSITIVE, default=None, metavar="N",
                   help="match only the first N experts of --buffers (ablations over their number; the original "
                        "caps files and experts per file). The run records them: a resume must give the same N")
    p.add_argument("--out", required=True, help="run folder: checkpoint, snapshots, history.json, config.json, "
                                                "synthetic.safetensors, synthetic_best.safetensors (the best "
                                                "evaluated set)")
    p.add_argument("--preset", type=_preset_name, default=None,
                   help="'paper' (default): the preset for --dataset/--ipc (the paper's table, ours for "
                        "digits/fashion-mnist); 'none': library defaults (CIFAR-scale learning rates); or another "
                        "preset as DATASET:IPC. Not read on --resume: the run keeps its settings")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="recipe over the preset: mtt (default), or a successor's options with its published "
                        "hyper-parameters (tesla, ftd, datm, att, pad; see mtt/recipes.py); flags given still "
                        "override it")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files")
    p.add_argument("--model", default=None, help="student network; default: the experts'")
    p.add_argument("--width", type=POSITIVE, default=None, help="ConvNet width; default: the experts'")
    p.add_argument("--depth", type=POSITIVE, default=None, help="ConvNet depth; default: the experts'")
    p.add_argument("--iterations", type=POSITIVE, default=None, help="distillation iterations")
    p.add_argument("--syn-steps", type=POSITIVE, default=None, help="student SGD steps per iteration (N)")
    p.add_argument("--expert-epochs", type=POSITIVE, default=None, help="target = expert epoch start + M (M)")
    p.add_argument("--max-start-epoch", type=POSITIVE, default=None,
                   help="start epoch drawn from [--min-start-epoch, T) (T)")
    p.add_argument("--segments", type=POSITIVE, default=None,
                   help="(expert, start epoch) segments per iteration, unrolled together (default: 1; under "
                        "torchrun, the number of processes)")
    p.add_argument("--batch-syn", type=POSITIVE, default=None, help="synthetic minibatch per step (default: all)")
    p.add_argument("--lr-img", type=RATE, default=None, help="learning rate of the images")
    p.add_argument("--lr-lr", type=RATE, default=None, help="learning rate of the learned step size")
    p.add_argument("--lr-teacher", type=RATE, default=None, help="initial learned step size")
    p.add_argument("--zca", action=argparse.BooleanOptionalAction, default=None,
                   help="ZCA-whitened space (default: the preset's)")
    p.add_argument("--soft-labels", action=argparse.BooleanOptionalAction, default=None, help="learn label logits")
    p.add_argument("--lr-labels", type=RATE, default=None, help="learning rate of the learned label logits (lr_y)")
    p.add_argument("--label-momentum", type=_fraction, default=None,
                   help="SGD momentum of the learned label logits (default 0.5; DATM: 0.9)")
    p.add_argument("--label-init", choices=LABEL_INITS, default=None,
                   help="learned soft labels start onehot (0.9 on the class, default), from the experts' mean "
                        "logits over those that classify each image correctly (experts; DATM), or from the first "
                        "expert's final logits (first-expert; DATM at CIFAR-100 IPC 50, images drawn at random)")
    p.add_argument("--teacher-labels", action=argparse.BooleanOptionalAction, default=None,
                   help="TESLA: train the student on the target checkpoint's softmax, recomputed each iteration")
    p.add_argument("--init", choices=INITS, default=None,
                   help="initial images: real (random real, default), noise, correct (real images the experts "
                        "classify correctly, DATM)")
    p.add_argument("--min-start-epoch", type=NON_NEGATIVE, default=None,
                   help="start epochs drawn from [this, upper) (default: 0)")
    p.add_argument("--current-max-start-epoch", type=POSITIVE, default=None,
                   help="DATM: upper grows from this to --max-start-epoch by --expansion-end (default: off)")
    p.add_argument("--expansion-end", type=POSITIVE, default=None,
                   help="DATM: the iteration by which the start window is fully open (default: 1000)")
    p.add_argument("--loss-threshold", type=RATE, default=None,
                   help="DATM: skip the update of an iteration whose matching loss exceeds this (default: off)")
    p.add_argument("--ema-decay", type=_fraction, default=None,
                   help="FTD: evaluate and save an EMA of the images with this decay (default: 0, off)")
    p.add_argument("--backward", choices=BACKWARD_MODES + APPROXIMATE_MODES, default=None,
                   help="full: autograd through the unroll; checkpointed: exact, constant memory; auto: the faster of "
                        "the two that fits in memory, measured on the first iteration (default; where full does not "
                        "fit, checkpointed keeping the graphs of as many of the last steps as do); tesla: TESLA's "
                        "constant-memory backward, approximate (drops the Hessian term)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the student's steps, in any backward mode (auto then times both modes "
                        "compiled and eager, and keeps the fastest): on a GPU several times faster per iteration "
                        "after a minute or more of compiling (default: off)")
    p.add_argument("--dsa", type=_strategy, default=None,
                   help="DSA strategy of the student's steps and of the evaluations: ops joined by _ from color, "
                        "crop, cutout, flip, scale, rotate, or 'none' (default: all six, as the paper)")
    p.add_argument("--match", choices=MATCH_MODES, default=None,
                   help="final: match the student's last step (MTT, default); closest: its step closest to the "
                        "target (ATT)")
    p.add_argument("--pad-fraction", type=_fraction, default=None,
                   help="PAD: share of the shallow layers' parameters the matching loss ignores (default: 0)")
    p.add_argument("--eval-every", type=NON_NEGATIVE, default=None,
                   help="iterations between evaluations (0: only at the end)")
    p.add_argument("--eval-repeats", type=NON_NEGATIVE, default=None, help="networks per evaluation (0: none)")
    p.add_argument("--eval-epochs", type=POSITIVE, default=None, help="training epochs of each evaluation network")
    p.add_argument("--checkpoint-every", type=POSITIVE, default=None, help="iterations between checkpoints")
    p.add_argument("--snapshot-every", type=POSITIVE, default=None, help="iterations between image snapshots")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its settings; flags given change them "
                        "(learning rates and other settings that do not change the learned state's shape)")
    p.add_argument("--log", choices=TRACKERS, default=None,
                   help="also log loss, step size, accuracy and image grids (needs that package)")
    _common(p, seed_help="random seed in [0, 65536) (default 0; on --resume the run's)")
    p.set_defaults(seed=None, device=None)  # 0 and auto for a fresh run; on --resume the run's, unless given
    p.set_defaults(run=run_distill)


NETWORK_FLAGS = ("model", "width", "depth")
CONFIG_FLAGS = ("iterations", "syn_steps", "expert_epochs", "max_start_epoch", "segments", "batch_syn", "lr_img",
                "lr_lr", "lr_teacher", "zca", "soft_labels", "init", "dsa", "backward", "compile", "match",
                "pad_fraction", "eval_every", "eval_repeats", "eval_epochs", "checkpoint_every", "snapshot_every",
                "lr_labels", "label_momentum", "label_init", "teacher_labels", "min_start_epoch",
                "current_max_start_epoch", "expansion_end", "loss_threshold", "ema_decay")


def distill_config(args: argparse.Namespace) -> DistillConfig:
    """The preset named by --preset for --dataset/--ipc, with every flag given applied over it; on --resume,
    the run's settings with the flags given applied over them."""
    from mtt.distill import START_AFRESH, checkpoint_settings

    given = {name: getattr(args, name) for name in NETWORK_FLAGS + CONFIG_FLAGS + ("seed", "device")
             if getattr(args, name) is not None}
    try:
        saved = checkpoint_settings(args.out) if args.resume else None
    except ValueError as err:
        raise ValueError(f"{err}; {START_AFRESH}") from None
    config = _preset_config(args, given) if saved is None else _resumed_config(args, saved, given)
    if "segments" not in given:
        config = _segments_for_processes(config)
    config.validate()
    _check_flags_apply(config, given, resuming=saved is not None)
    return config


def _segments_for_processes(config: DistillConfig) -> DistillConfig:
    """Under torchrun, without --segments: the fewest segments at or above the config's that every process gets
    an equal share of (one each, from the presets' one)."""
    from mtt.distributed import world_size

    world = world_size()
    return dataclasses.replace(config, segments=world * math.ceil(config.segments / world))


# Flags that act only with another setting on: given without it, they would be silently ignored.
ACTS_ONLY_WITH = {"lr_labels": "soft_labels", "label_momentum": "soft_labels",
                  "expansion_end": "current_max_start_epoch"}


def _check_flags_apply(config: DistillConfig, given: dict[str, Any], resuming: bool) -> None:
    from mtt.distill import FIXED_ON_RESUME

    for name, needed in ACTS_ONLY_WITH.items():
        if name in given and not getattr(config, needed):
            flag, needed_flag = (f"--{n.replace('_', '-')}" for n in (name, needed))
            fix = f"drop {flag}" if resuming and needed in FIXED_ON_RESUME else f"add {needed_flag}, or drop {flag}"
            raise ValueError(f"{flag} acts only with {needed_flag}, which this run does not use: {fix}")


def _preset_config(args: argparse.Namespace, given: dict[str, Any]) -> DistillConfig:
    from mtt.distill import DistillConfig, preset
    from mtt.recipes import apply_recipe

    method, preset_name = args.method or "mtt", args.preset or "paper"
    if preset_name == "paper":
        return preset(args.dataset, args.ipc, method, **given)
    if preset_name == "none":
        return apply_recipe(DistillConfig(dataset=args.dataset, ipc=args.ipc), method, given)
    dataset_name, _, ipc = preset_name.partition(":")  # DATASET:IPC, checked by _preset_name
    return dataclasses.replace(preset(dataset_name, int(ipc), method, **given), dataset=args.dataset, ipc=args.ipc)


def _resumed_config(args: argparse.Namespace, saved: dict[str, Any], given: dict[str, Any]) -> DistillConfig:
    """The run's settings, as its checkpoint recorded them, with the flags given over them: a flag left out keeps
    the run's value, not the preset's. --dataset and --ipc are given always, and checked against the run's."""
    from mtt.distill import CHECKPOINT, DistillConfig, check_fixed_on_resume

    if args.method is not None and args.method != saved.get("method", "mtt"):
        raise ValueError(f"--resume: the run in {args.out} follows --method {saved.get('method', 'mtt')}, not "
                         f"{args.method}: leave --method out to continue it, or choose another --out to start afresh")
    config = DistillConfig(**saved | given | {"dataset": args.dataset, "ipc": args.ipc})
    check_fixed_on_resume(saved, config, Path(args.out) / CHECKPOINT)  # before the data and experts are opened
    return config


def run_distill(args: argparse.Namespace) -> dict[str, Any]:
    from mtt.distributed import is_main_process
    from mtt.io import held_folder

    config = distill_config(args)
    main = is_main_process()  # under torchrun rank 0 reports and writes
    with held_folder(args.out) if main else contextlib.nullcontext():  # from here: a tracker writes there too
        return _run_distill(args, config, main)


def _run_distill(args: argparse.Namespace, config: DistillConfig, main: bool) -> dict[str, Any]:
    import time

    from mtt.buffers import open_buffers
    from mtt.data import load_dataset
    from mtt.distill import (BEST_SYNTHETIC, CHECKPOINT, FINAL_SYNTHETIC, HISTORY, accuracy_text, best_evaluation,
                             distill, network_from_buffers)
    from mtt.recipes import expert_note
    from mtt.tracking import tracker

    dataset = load_dataset(args.dataset, args.data_root, zca=config.zca)
    buffers = open_buffers(args.buffers, dataset=dataset.name, zca=config.zca, model=args.model, width=args.width,
                           depth=args.depth)
    if args.max_experts:
        buffers = buffers.first(args.max_experts)
    resumed = args.resume and (Path(args.out) / CHECKPOINT).is_file()  # then the run's network, not the experts'
    config = network_from_buffers(config, buffers, keep=[k for k in NETWORK_FLAGS
                                                         if resumed or getattr(args, k) is not None])
    if not main:
        args.json = False
        distill(config, dataset, buffers, args.out, resume=args.resume, progress=False)
        return {}
    _announce("distill", {**dataclasses.asdict(config), "buffers": f"{len(buffers)} experts in {buffers.source}"},
              config.device)
    if note := expert_note(config.method, buffers.training()):
        print(f"note ({config.method}): {note}", file=sys.stderr)
    _note_weak_experts(buffers, dataset)
    log = tracker(args.log, Path(args.out), dataclasses.asdict(config), dataset) if args.log else None
    started = time.perf_counter()
    try:
        synthetic = distill(config, dataset, buffers, args.out, resume=args.resume, progress=not args.no_progress,
                            callbacks=[log] if log else [])
        history = json.loads((Path(args.out) / HISTORY).read_text())
        if log and history["evals"]:
            log.log_evaluation(history["evals"][-1])  # the final one comes after the last iteration's callback
    finally:
        if log:
            log.close()
    summary = {"iterations": len(history["loss"]), "final_loss": history["loss"][-1] if history["loss"] else None,
               "syn_lr": synthetic.syn_lr, "seconds": round(time.perf_counter() - started, 2), "out": str(args.out)}
    if history["evals"]:
        last = history["evals"][-1]  # the final set's, unless a resume with --eval-repeats 0 went on after it
        summary["final_eval" if last["iteration"] == summary["iterations"] else "last_eval"] = last
        summary["best_eval"] = best_evaluation(history)
        if summary["best_eval"] is not last:
            print(f"best: {accuracy_text(summary['best_eval'])} at iteration {summary['best_eval']['iteration']}, "
                  f"saved as {Path(args.out) / BEST_SYNTHETIC} (chosen on the test set, as the original's "
                  "images_best.pt; the final set's accuracy is the unbiased one)", file=sys.stderr)
    print(f"saved: {Path(args.out) / FINAL_SYNTHETIC} (with history.json, config.json, snapshots/ and "
          f"{CHECKPOINT} beside it)", file=sys.stderr)
    return summary


def _names(text: str) -> list[str]:
    """'ConvNet, ResNet18,' -> ['ConvNet', 'ResNet18']: spaces and empty entries are no names."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _eval_flags(p: argparse.ArgumentParser, lr_help: str, lr_default: float | None) -> None:
    from mtt.augment import DEFAULT_STRATEGY

    p.add_argument("--models", type=_names, default="ConvNet",
                   help="comma-separated, e.g. ConvNet,ResNet18,VGG11,AlexNet")
    p.add_argument("--repeats", type=POSITIVE, default=5, help="networks per model (two --seed values share none)")
    p.add_argument("--epochs", type=POSITIVE, default=1000, help="training epochs per network")
    p.add_argument("--lr", type=RATE, default=lr_default, help=lr_help)
    p.add_argument("--dsa", type=_strategy, default=DEFAULT_STRATEGY,
                   help="DSA strategy of the networks' training (the paper's protocol), or 'none'")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files")
    p.add_argument("--image-size", type=POSITIVE, default=None, metavar="N",
                   help="resize the set and the real images to NxN first (e.g. 32, to run ResNet18 or VGG11 on 8x8 digits)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also save a bar chart of the results")
    _common(p)


def _check_plot(args: argparse.Namespace) -> None:
    """The chart's folder must be writable before hours of training, not after."""
    if args.plot:
        from mtt.io import ensure_writable_dir, figure_format
        if Path(args.plot).is_dir():
            raise ValueError(f"--plot {args.plot} is a folder: give the chart's file name, e.g. "
                             f"{Path(args.plot) / 'accuracy.png'}")
        try:
            figure_format(args.plot)
        except ValueError as err:
            raise ValueError(f"--plot {args.plot}: name the chart's format by its suffix ({err})") from None
        ensure_writable_dir(Path(args.plot).parent, "--plot")


def _announce_evaluation(what: str, args: argparse.Namespace, config: EvalConfig, **settings: Any) -> None:
    _announce(what, {**settings, "models": ",".join(args.models), "lr": config.lr, "width": config.width,
                     "depth": config.depth, "epochs": config.epochs, "repeats": config.repeats, "dsa": config.dsa},
              args.device)


def _note_weak_experts(buffers: ExpertBuffers, dataset: Dataset) -> None:
    """Say so when the experts learned little: their trajectories give the images little to match, and no
    distillation setting mends that."""
    accuracy, chance = buffers.final_accuracy(), 100 / dataset.num_classes
    # An eighth of the way from chance to 100 %: well below what any expert of the paper's reaches (Tiny ImageNet's
    # ConvNets end near 40 %), well above a network that learned nothing.
    if accuracy is not None and accuracy < chance + (100 - chance) / 8:
        print(f"note: the experts reach only {accuracy:.1f} % test accuracy after their last epoch (chance: "
              f"{chance:.3g} %): networks that learned this little give the images little to match; train them "
              "longer, or with another --lr (python -m mtt experts)", file=sys.stderr)


def _eval_summary(results: dict, args: argparse.Namespace, dataset: Dataset, lr: float | None,
                  what: str) -> dict[str, Any]:
    """Print and return the results; `what` was evaluated, as the chart's title and legend name it."""
    chance = 100 / dataset.num_classes
    for model, result in results.items():
        print(f"{model}: {result}", file=sys.stderr)
        if result.mean < chance + 1:  # a set of any use scores far above chance
            print(f"note: {model} scored at chance ({chance:.3g} % for {dataset.num_classes} classes): its "
                  f"networks learned nothing (too few --epochs, now {args.epochs}, or a --lr too large or too small, "
                  f"now {lr:.3g})", file=sys.stderr)
    if args.plot:
        from mtt.viz import cross_arch_bars
        try:
            cross_arch_bars(results, path=args.plot, label=what, chance=chance,
                            title=f"{what}\n{dataset.name}, {args.epochs} epochs, {args.repeats} networks per model")
            print(f"saved: {args.plot}", file=sys.stderr)
        except OSError as err:  # the results, hours of training, are above and in --json: not lost for a chart
            print(f"warning: no chart: {err}", file=sys.stderr)
    return {model: result.to_dict() for model, result in results.items()}


@command
def add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="train fresh networks on a synthetic set, test on real data",
                              formatter_class=_Formatter)
    p.add_argument("--synthetic", required=True,
                   help="synthetic.safetensors, or the original MTT's images_best.pt (with --original-labels)")
    p.add_argument("--original-labels", default=None, metavar="FILE",
                   help="labels_best.pt of the original MTT code; then --dataset and --lr are required")
    p.add_argument("--dataset", default=None, help="dataset of an original-MTT set")
    p.add_argument("--original-zca", action="store_true",
                   help="the original-MTT set was distilled with ZCA (whiten the test set the original's way); "
                        "pass its images_best.pt or images_{it}.pt, not images_zca_*.pt (those are un-whitened)")
    p.add_argument("--width", type=POSITIVE, default=None,
                   help="ConvNet-family width (default: the distillation network's, else 128)")
    p.add_argument("--depth", type=POSITIVE, default=None,
                   help="ConvNet-family depth (default: the distillation network's, else 3)")
    _eval_flags(p, "default: the set's learned syn_lr", None)
    p.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from mtt.data import load_dataset
    from mtt.distill import BEST_SYNTHETIC, CHECKPOINT, FINAL_SYNTHETIC, SNAPSHOTS, checkpoint_progress
    from mtt.evaluate import EvalConfig, evaluate_synthetic
    from mtt.synthetic import SyntheticSet, load_original_mtt

    _check_plot(args)
    if "://" in args.synthetic:
        raise ValueError(f"--synthetic {args.synthetic}: a set is read from a local file (hf:// addresses are for "
                         f"--buffers); download it first, e.g. with `hf download REPO FILE --local-dir DIR`")
    path = Path(args.synthetic)
    if (path / FINAL_SYNTHETIC).is_file():
        progress = checkpoint_progress(path)
        later = (f", or {path / CHECKPOINT} (iteration {progress[0]}: the run was resumed after its end and stopped "
                 f"there)" if progress and progress[0] < progress[1] else "")
        raise ValueError(f"--synthetic: {path} is a run folder: pass one of its sets, {path / FINAL_SYNTHETIC} (the "
                         f"final one) or {path / BEST_SYNTHETIC} (the best evaluated){later}")
    if (path / CHECKPOINT).is_file():  # a run that stopped before its end: its set is in the checkpoint
        path = path / CHECKPOINT
    elif path.is_dir():
        raise ValueError(f"--synthetic: {path} is a folder without a {FINAL_SYNTHETIC} or a run's {CHECKPOINT}: "
                         "pass a set's file")
    if not path.is_file():
        raise FileNotFoundError(f"--synthetic: no such file: {path}")
    if args.original_zca and not args.original_labels:  # an mtt set carries its own ZCA, applied to the test set
        raise ValueError("--original-zca is for an original-MTT set (with --original-labels): an mtt set records "
                         "whether it was distilled with ZCA and whitens the test set itself")
    dataset = None
    if path.name == CHECKPOINT or path.parent.name == SNAPSHOTS:
        synthetic, dataset = _stored_set(path, args)
    elif args.original_labels:
        if args.dataset is None or args.lr is None:
            raise ValueError("an original-MTT set (--original-labels) needs --dataset and --lr "
                             "(the learned syn_lr its run logged)")
        synthetic = load_original_mtt(args.synthetic, args.original_labels, args.dataset, args.lr)
    elif args.synthetic.endswith(".pt"):
        raise ValueError(f"{args.synthetic} looks like the original MTT's images_best.pt: pass "
                         "--original-labels labels_best.pt, --dataset and --lr")
    else:
        synthetic = SyntheticSet.load(args.synthetic)
        if not (synthetic.dataset or args.dataset):
            raise ValueError(f"{args.synthetic} does not record the dataset it was distilled from: pass --dataset")
    dataset = dataset or load_dataset(args.dataset or synthetic.dataset, args.data_root)
    if args.original_zca:  # the set is in the ZCA space of its run's training set, which its test images are put in
        dataset = dataset.with_zca()
        synthetic = dataclasses.replace(synthetic, zca=dataset.zca)
    if args.image_size:
        synthetic, dataset = synthetic.resized(args.image_size), dataset.resized(args.image_size)
    # A set distilled through ConvNet-64 is evaluated on ConvNet-64, not the paper's default width.
    config = EvalConfig(epochs=args.epochs, lr=args.lr if args.lr is not None else synthetic.syn_lr,
                        repeats=args.repeats, seed=args.seed, width=args.width or synthetic.width,
                        depth=args.depth or synthetic.depth, dsa=args.dsa, progress=not args.no_progress)
    _announce_evaluation("evaluate", args, config, set=args.synthetic)
    results = evaluate_synthetic(synthetic, dataset, args.models, config, args.device)
    return _eval_summary(results, args, dataset, config.lr, f"{path.name}, IPC {synthetic.ipc}")


def _stored_set(path: Path, args: argparse.Namespace) -> tuple[SyntheticSet, Dataset]:
    """evaluate's reading of a run's checkpoint or snapshot (a --dataset given must be the run's, as for a set)."""
    from mtt.data import dataset_key

    if args.original_labels:
        raise ValueError(f"--synthetic {path} is a file of an mtt run, which names its labels: drop --original-labels")
    synthetic, dataset, iteration, iterations = _run_set(path, args.data_root)
    if args.dataset and dataset_key(args.dataset) != dataset.name:
        raise ValueError(f"--dataset {args.dataset}: the run that wrote {path} distilled {dataset.name}; drop "
                         "--dataset, the run names its own")
    print(f"evaluating the set at iteration {iteration} of the run's {iterations} (from {path})", file=sys.stderr)
    return synthetic, dataset


def _run_set(path: Path, data_root: str | None) -> tuple[SyntheticSet, Dataset, int, int]:
    """The set a run's checkpoint or snapshot holds, with the dataset as the run distilled it (its ZCA included),
    the iteration it is of, and the iterations the run was to go to."""
    from mtt.data import load_dataset
    from mtt.distill import stored_config, stored_set

    config = stored_config(path)
    dataset = load_dataset(config.dataset, data_root, zca=config.zca)
    synthetic, iteration = stored_set(path, config, dataset)
    return synthetic, dataset, iteration, config.iterations


@command
def add_baseline(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("baseline", help="random / herding / full real-data baselines on the same protocol",
                              formatter_class=_Formatter)
    p.add_argument("--dataset", required=True, help="digits, fashion-mnist, mnist, cifar10, cifar100, svhn, ...")
    p.add_argument("--ipc", type=POSITIVE, default=None, help="images per class (not for --method full)")
    p.add_argument("--method", choices=["random", "herding", "full"], default="random",
                   help="real images: random per class, herding in feature space, or the whole training set")
    p.add_argument("--zca", action="store_true", help="ZCA-whiten the dataset (eps 0.1)")
    p.add_argument("--width", type=POSITIVE, default=128,
                   help="ConvNet-family width: that of the distilled sets it is compared with")
    p.add_argument("--depth", type=POSITIVE, default=3, help="ConvNet-family depth")
    _eval_flags(p, "learning rate (real-data baselines train with 0.01)", 0.01)
    p.set_defaults(run=run_baseline)


def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    from mtt.data import load_dataset
    from mtt.evaluate import EvalConfig, check_baseline, evaluate_baseline

    _check_plot(args)
    dataset = load_dataset(args.dataset, args.data_root)
    if args.image_size:
        dataset = dataset.resized(args.image_size)
    if args.zca:
        dataset = dataset.with_zca()
    config = EvalConfig(epochs=args.epochs, lr=args.lr, repeats=args.repeats, seed=args.seed, width=args.width,
                        depth=args.depth, dsa=args.dsa, progress=not args.no_progress)
    check_baseline(dataset, args.method, args.ipc)  # before saying what it runs
    _announce_evaluation("baseline", args, config, dataset=dataset.name, method=args.method, ipc=args.ipc)
    results = evaluate_baseline(dataset, args.ipc, args.method, args.models, config, args.device)
    ipc = "the whole training set" if args.method == "full" else f"{args.method} real images, IPC {args.ipc}"
    return _eval_summary(results, args, dataset, config.lr, ipc)


@command
def add_plot(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="a distillation run's figures: its images, their evolution, the curves "
                                           "and, with --buffers, the experts' accuracy and the trajectories (PCA)",
                              formatter_class=_Formatter)
    p.add_argument("run_dir", metavar="RUN", help="run folder (distill --out); a run that stopped is drawn as its "
                                                  "checkpoint holds it")
    p.add_argument("--out", default=None, help="folder for the figures (default: RUN/plots)")
    p.add_argument("--format", choices=("png", "pdf", "svg"), default="png", help="the figures' file format")
    p.add_argument("--buffers", default=None,
                   help="the run's experts: also their trajectories, with a student trained on the set (PCA)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files")
    p.add_argument("--device", default="auto", help="for the student's training with --buffers")
    p.add_argument("--seed", type=int, default=0, help="the student's minibatches and augmentations")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    p.set_defaults(run=run_plot)


def run_plot(args: argparse.Namespace) -> dict[str, Any]:
    from mtt import viz
    from mtt.buffers import open_buffers
    from mtt.data import load_dataset
    from mtt.distill import CHECKPOINT, FINAL_SYNTHETIC, check_distilled_from
    from mtt.io import ensure_writable_dir
    from mtt.synthetic import SyntheticSet

    run = Path(args.run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no such folder: {run}")
    if (run / CHECKPOINT).is_file():  # the run's latest state: at its end the final set, before it where it stopped
        synthetic, dataset, iteration, iterations = _run_set(run / CHECKPOINT, args.data_root)
        if iteration < iterations:
            print(f"{run} stopped at iteration {iteration} of {iterations}: drawing the set its {CHECKPOINT} holds",
                  file=sys.stderr)
    elif (run / FINAL_SYNTHETIC).is_file():  # a run copied without its checkpoint
        synthetic = SyntheticSet.load(run / FINAL_SYNTHETIC)
        # the set carries its ZCA, so a name is enough to draw it; the student's training needs the data
        dataset = load_dataset(synthetic.dataset, args.data_root) if args.buffers else synthetic.dataset
    else:
        raise ValueError(f"{run} holds no distillation run (no {CHECKPOINT} or {FINAL_SYNTHETIC}): pass the --out "
                         "of python -m mtt distill")
    buffers = None
    if args.buffers:
        buffers = open_buffers(args.buffers, dataset=dataset.name, zca=synthetic.zca is not None,
                               model=synthetic.model).without_diverged()  # what the run drew from
        check_distilled_from(run, buffers)
    out = ensure_writable_dir(args.out or run / "plots")
    paths = []
    for path in viz.run_figures(run, synthetic, dataset, out, buffers, f".{args.format}", args.seed, args.device):
        print(f"saved: {path}", file=sys.stderr)  # as each is: should a later one fail, these are known
        paths.append(str(path))
    return {"figures": paths}


@command
def add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="the whole pipeline on digits (offline, a few CPU minutes)",
                              formatter_class=_Formatter)
    p.add_argument("--out", default="demo", help="output folder (report.md, images, curves); reruns resume")
    _common(p)
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    import time

    from mtt.demo import QuickConfig, results_table, run_demo

    started = time.perf_counter()
    results = run_demo(args.out, args.device, QuickConfig.demo(seed=args.seed), progress=not args.no_progress)
    print(f"\n{results_table(results)}\nreport: {Path(args.out) / 'report.md'} "
          f"({time.perf_counter() - started:.0f} s)")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m mtt", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def _missing_folders(args: argparse.Namespace) -> list[Path]:
    """The folders that --out and --plot name and that do not exist yet, each deepest first: the command makes them
    early, to fail before long work, and removes them again if it fails while they are empty."""
    targets = [Path(args.out)] if getattr(args, "out", None) else []
    if getattr(args, "plot", None):
        targets.append(Path(args.plot).parent)
    return [folder for target in targets for folder in [target, *target.parents] if not folder.exists()]


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first: a parent is empty once its child is gone
        try:
            folder.rmdir()  # refuses a folder with anything in it
        except OSError:
            pass  # not made, not empty, or not removable: no reason to hide the error that ended the command


def _continue_with(command: str, argv: list[str]) -> str:
    """The command line that continues an interrupted distillation: this one, with --resume."""
    if command != "distill":
        return ""  # experts: the same command trains the rest
    from mtt.distributed import world_size

    launcher = f"torchrun --nproc-per-node {world_size()}" if world_size() > 1 else "python"
    resume = [] if "--resume" in argv else ["--resume"]
    return f"; continue with: {launcher} -m mtt {shlex.join([*argv, *resume])}"


def _report(line: str) -> None:
    """The line that ends the command. Under torchrun every process fails alike on bad input, so rank 0 alone
    prints it, and each failing rank gives its line to torchrun's failure summary (which shows a rank that failed
    alone, e.g. out of GPU memory)."""
    from mtt.distributed import is_main_process, tell_torchrun

    if is_main_process():
        print(line, file=sys.stderr)
    tell_torchrun(line)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """One line, as the errors: no source path and line. Under torchrun rank 0 says what holds for every rank, and
    each rank its own (RankWarning)."""
    from mtt.distributed import RankWarning, is_main_process, world_size

    own = issubclass(category, RankWarning)
    if own or is_main_process():
        rank = f"rank {os.environ.get('RANK', 0)}: " if own and world_size() > 1 else ""
        print(f"warning: {rank}{message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():  # which restores the display after: main() also runs in-process (tests)
        warnings.showwarning = _show_warning
        return _run_command(argv)


def _run_command(argv: list[str] | None) -> int:
    from mtt.interrupt import Interrupted

    command, new_folders = "the command", []
    try:  # from the start: Ctrl-C while torch is still importing is no traceback either
        args = build_parser().parse_args(argv)
        command, new_folders = args.command, _missing_folders(args)
        result = args.run(args)
    except (ValueError, OSError) as err:
        # Bad input and known failure modes end with one readable line, not a stack trace.
        _report(f"error: {err}")
        _remove_if_empty(new_folders)
        return 2
    except Interrupted as err:  # the run saved its work and says how to continue
        _report(f"{err}{_continue_with(command, sys.argv[1:] if argv is None else argv)}")
        return Interrupted.exit_code
    except KeyboardInterrupt:
        _report(f"interrupted: {command} stopped; it had nothing to save")
        _remove_if_empty(new_folders)
        return Interrupted.exit_code
    if args.json:
        print(json.dumps(result))
    return 0
