"""`python -m mtt <command>`: headless runs of every stage.

Each command is a pair: `add_<command>(subparsers)` declares its flags and sets
`run=<handler>`; the handler calls the package and returns a JSON-able dict, which
`--json` prints as the last line of stdout (progress bars go to stderr).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

Handler = Callable[[argparse.Namespace], dict[str, Any]]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(add: Callable[[argparse._SubParsersAction], None]):
    """Register a command's parser builder (decorator)."""
    COMMANDS.append(add)
    return add


@command
def add_experts(subparsers: argparse._SubParsersAction) -> None:
    from mtt.augment import DEFAULT_STRATEGY

    p = subparsers.add_parser("experts", help="train expert trajectories (resumes into --out; torchrun-aware)")
    p.add_argument("--dataset", required=True, help="digits, fashion-mnist, mnist, cifar10, cifar100, svhn, ...")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files")
    p.add_argument("--zca", action="store_true", help="train in ZCA-whitened space (eps 0.1)")
    p.add_argument("--train-per-class", type=int, default=None, help="keep N training images per class (quick runs)")
    p.add_argument("--model", default="ConvNet")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--num-experts", type=int, default=10)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.01, help="lr_teacher")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dsa", default=DEFAULT_STRATEGY, help="DSA strategy, or 'none'")
    p.add_argument("--parallel", type=int, default=1, help="experts trained at once on one device (vmap)")
    p.add_argument("--out", required=True, help="buffer folder; finished experts there are not trained again")
    p.add_argument("--no-progress", action="store_true")
    _common(p)
    p.set_defaults(run=run_experts)


def run_experts(args: argparse.Namespace) -> dict[str, Any]:
    import os

    from mtt.data import load_dataset
    from mtt.experts import ExpertConfig, train_experts

    if int(os.environ.get("RANK", 0)) != 0:
        args.json = False  # under torchrun only rank 0 reports
    dataset = load_dataset(args.dataset, args.data_root, zca=args.zca)
    if args.train_per_class:
        dataset = dataset.take_per_class(args.train_per_class, seed=args.seed)
    config = ExpertConfig(model=args.model, num_experts=args.num_experts, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, momentum=args.momentum, weight_decay=args.weight_decay,
                          dsa=args.dsa, parallel=args.parallel, seed=args.seed, width=args.width, depth=args.depth)
    return train_experts(dataset, config, args.out, device=args.device, progress=not args.no_progress)


@command
def add_distill(subparsers: argparse._SubParsersAction) -> None:
    from mtt.unroll import BACKWARD_MODES

    p = subparsers.add_parser("distill", help="distil a dataset by matching expert trajectories")
    p.add_argument("--dataset", required=True)
    p.add_argument("--ipc", type=int, required=True, help="synthetic images per class")
    p.add_argument("--buffers", required=True,
                   help="expert folder, legacy MTT buffer folder, or hf://OWNER/REPO[/SUBPATH][@REVISION]")
    p.add_argument("--out", required=True, help="run folder: checkpoint, snapshots, history.json, synthetic.safetensors")
    p.add_argument("--preset", default="paper",
                   help="'paper': the preset for --dataset/--ipc (the paper's table, ours for digits/fashion-mnist); "
                        "'none': library defaults; or another preset as DATASET:IPC")
    p.add_argument("--data-root", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--syn-steps", type=int, default=None)
    p.add_argument("--expert-epochs", type=int, default=None)
    p.add_argument("--max-start-epoch", type=int, default=None)
    p.add_argument("--batch-syn", type=int, default=None)
    p.add_argument("--lr-img", type=float, default=None)
    p.add_argument("--lr-lr", type=float, default=None)
    p.add_argument("--lr-teacher", type=float, default=None)
    p.add_argument("--zca", action=argparse.BooleanOptionalAction, default=None, help="default: the preset's")
    p.add_argument("--soft-labels", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--init", choices=["real", "noise"], default=None)
    p.add_argument("--backward", choices=BACKWARD_MODES, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="iterations between evaluations (0: only at the end)")
    p.add_argument("--eval-repeats", type=int, default=None, help="networks per evaluation (0: no evaluation)")
    p.add_argument("--eval-epochs", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--snapshot-every", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true")
    _common(p)
    p.set_defaults(run=run_distill)


def run_distill(args: argparse.Namespace) -> dict[str, Any]:
    import time

    from mtt.buffers import open_buffers
    from mtt.data import load_dataset
    from mtt.distill import DistillConfig, distill, preset

    overrides = {name: getattr(args, name) for name in
                 ["model", "width", "iterations", "syn_steps", "expert_epochs", "max_start_epoch", "batch_syn",
                  "lr_img", "lr_lr", "lr_teacher", "zca", "soft_labels", "init", "backward", "eval_every",
                  "eval_repeats", "eval_epochs", "checkpoint_every", "snapshot_every"]
                 if getattr(args, name) is not None}
    overrides |= {"seed": args.seed, "device": args.device}
    if args.preset == "paper":
        config = preset(args.dataset, args.ipc, **overrides)
    elif args.preset == "none":
        config = DistillConfig(dataset=args.dataset, ipc=args.ipc, **overrides)
    else:
        dataset_name, _, ipc = args.preset.partition(":")
        if not ipc.isdigit():
            raise ValueError(f"--preset must be 'paper', 'none' or DATASET:IPC, got {args.preset!r}")
        config = preset(dataset_name, int(ipc), **overrides)
        config.dataset, config.ipc = args.dataset, args.ipc
    dataset = load_dataset(args.dataset, args.data_root, zca=config.zca)
    buffers = open_buffers(args.buffers, dataset=dataset.name, zca=config.zca)
    started = time.perf_counter()
    synthetic = distill(config, dataset, buffers, args.out, resume=args.resume, progress=not args.no_progress)
    history = json.loads((Path(args.out) / "history.json").read_text())
    summary = {"iterations": len(history["loss"]), "final_loss": history["loss"][-1] if history["loss"] else None,
               "syn_lr": synthetic.syn_lr, "seconds": round(time.perf_counter() - started, 2), "out": str(args.out)}
    if history["evals"]:
        summary["final_eval"] = history["evals"][-1]
    return summary


def _eval_flags(p: argparse.ArgumentParser, lr_help: str, lr_default: float | None) -> None:
    p.add_argument("--models", default="ConvNet", help="comma-separated, e.g. ConvNet,ResNet18,VGG11,AlexNet")
    p.add_argument("--repeats", type=int, default=5, help="networks per model (seeds seed..seed+repeats-1)")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--lr", type=float, default=lr_default, help=lr_help)
    p.add_argument("--data-root", default=None, help="folder holding the dataset files")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="resize the set and the real images to NxN first (e.g. 32, to run ResNet18 or VGG11 on 8x8 digits)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also save a bar chart of the results")
    _common(p)


def _eval_summary(results: dict, args: argparse.Namespace) -> dict[str, Any]:
    for model, result in results.items():
        print(f"{model}: {result} % over {len(result.runs)} runs", file=sys.stderr)
    if args.plot:
        from mtt.paper import plot_cross_arch
        plot_cross_arch(results, path=args.plot)
    return {model: result.to_dict() for model, result in results.items()}


@command
def add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="train fresh networks on a synthetic set, test on real data")
    p.add_argument("--synthetic", required=True,
                   help="synthetic.safetensors, or the original MTT's images_best.pt (with --original-labels)")
    p.add_argument("--original-labels", default=None, metavar="FILE",
                   help="labels_best.pt of the original MTT code; then --dataset and --lr are required")
    p.add_argument("--dataset", default=None, help="dataset of an original-MTT set")
    p.add_argument("--original-zca", action="store_true",
                   help="the original-MTT set was distilled with ZCA (whiten the test set the original's way)")
    p.add_argument("--width", type=int, default=None,
                   help="ConvNet-family width (default: the distillation network's, else 128)")
    p.add_argument("--depth", type=int, default=None,
                   help="ConvNet-family depth (default: the distillation network's, else 3)")
    _eval_flags(p, "default: the set's learned syn_lr", None)
    p.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from mtt.data import load_dataset
    from mtt.evaluate import EvalConfig, evaluate_synthetic, with_original_zca
    from mtt.synthetic import SyntheticSet, load_original_mtt

    if not Path(args.synthetic).is_file():
        raise FileNotFoundError(f"no such file: {args.synthetic}")
    if args.original_labels:
        if args.dataset is None or args.lr is None:
            raise ValueError("an original-MTT set (--original-labels) needs --dataset and --lr "
                             "(the learned syn_lr its run logged)")
        synthetic = load_original_mtt(args.synthetic, args.original_labels, args.dataset, args.lr)
    elif args.synthetic.endswith(".pt"):
        raise ValueError(f"{args.synthetic} looks like the original MTT's images_best.pt: pass "
                         "--original-labels labels_best.pt, --dataset and --lr")
    else:
        synthetic = SyntheticSet.load(args.synthetic)
    dataset = load_dataset(args.dataset or synthetic.dataset, args.data_root)
    if args.original_zca:
        dataset = with_original_zca(dataset)
    if args.image_size:
        synthetic, dataset = synthetic.resized(args.image_size), dataset.resized(args.image_size)
    # A set distilled through ConvNet-64 is evaluated on ConvNet-64, not the paper's default width.
    config = EvalConfig(epochs=args.epochs, lr=args.lr, repeats=args.repeats, seed=args.seed,
                        width=args.width or synthetic.width, depth=args.depth or synthetic.depth)
    results = evaluate_synthetic(synthetic, dataset, args.models.split(","), config, args.device)
    return _eval_summary(results, args)


@command
def add_baseline(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("baseline", help="random / herding / full real-data baselines on the same protocol")
    p.add_argument("--dataset", required=True)
    p.add_argument("--ipc", type=int, default=None, help="images per class (not for --method full)")
    p.add_argument("--method", choices=["random", "herding", "full"], default="random")
    p.add_argument("--zca", action="store_true", help="ZCA-whiten the dataset (eps 0.1)")
    _eval_flags(p, "learning rate (real-data baselines train with 0.01)", 0.01)
    p.set_defaults(run=run_baseline)


def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    from mtt.data import load_dataset
    from mtt.evaluate import EvalConfig, evaluate_baseline

    dataset = load_dataset(args.dataset, args.data_root)
    if args.image_size:
        dataset = dataset.resized(args.image_size)
    if args.zca:
        dataset = dataset.with_zca()
    config = EvalConfig(epochs=args.epochs, lr=args.lr, repeats=args.repeats, seed=args.seed)
    results = evaluate_baseline(dataset, args.ipc, args.method, args.models.split(","), config, args.device)
    return _eval_summary(results, args)


@command
def add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="the whole pipeline on digits (offline, a few CPU minutes)")
    p.add_argument("--out", default="demo", help="output folder (report.md, images, curves); reruns resume")
    p.add_argument("--no-progress", action="store_true")
    _common(p)
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    import time

    from mtt.demo import QuickConfig, results_table, run_demo

    started = time.perf_counter()
    results = run_demo(args.out, args.device, QuickConfig(seed=args.seed), progress=not args.no_progress)
    print(f"\n{results_table(results)}\nreport: {Path(args.out) / 'report.md'} "
          f"({time.perf_counter() - started:.0f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtt", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except (ValueError, OSError) as err:
        # Bad input and known failure modes end with one readable line, not a stack trace.
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    return 0
