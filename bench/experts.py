"""Experts per hour, sequential (P=1) vs vectorised (P experts per vmapped step).

    python bench/experts.py [--device auto] [--only cpu|cuda]

Each case trains K ConvNet-128 experts for E epochs with the paper protocol (SGD lr 0.01,
batch 256, DSA, test accuracy after every epoch) into a fresh temporary folder, timed end
to end by train_experts (initialisation, training, evaluation, shard writes). On CPU the
cases are cut down to stay within minutes: digits, and a Fashion-MNIST subset whose test
split is cut to 1000 images (evaluation would otherwise dominate). On CUDA: full
Fashion-MNIST at P = 1, 10, 50. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, replace

import torch

from mtt.data import Dataset, load_dataset
from mtt.device import resolve_device
from mtt.experts import ExpertConfig, train_experts


@dataclass
class Case:
    dataset: str
    train_per_class: int | None  # None = the whole training set
    test_images: int | None  # None = the whole test split
    experts: int
    epochs: int
    parallel: int


CPU_CASES = [
    Case("digits", None, None, 8, 1, 1),
    Case("digits", None, None, 8, 1, 4),
    Case("digits", None, None, 8, 1, 8),
    Case("fashion-mnist", 100, 1000, 4, 1, 1),
    Case("fashion-mnist", 100, 1000, 4, 1, 4),
]
CUDA_CASES = [
    Case("fashion-mnist", None, None, 10, 2, 1),
    Case("fashion-mnist", None, None, 10, 2, 10),
    Case("fashion-mnist", None, None, 50, 2, 50),
]


def prepare(case: Case) -> Dataset:
    dataset = load_dataset(case.dataset)
    if case.train_per_class:
        dataset = dataset.take_per_class(case.train_per_class)
    if case.test_images:
        dataset = replace(dataset, test_images=dataset.test_images[:case.test_images],
                          test_labels=dataset.test_labels[:case.test_images])
    return dataset


def run(case: Case, device: torch.device) -> dict:
    dataset = prepare(case)
    config = ExpertConfig(num_experts=case.experts, epochs=case.epochs, parallel=case.parallel)
    with tempfile.TemporaryDirectory() as out:
        seconds = train_experts(dataset, config, out, device=device, progress=False)["seconds"]
    return {"case": case, "train": len(dataset.train_images), "test": len(dataset.test_images),
            "seconds": seconds, "per_hour": case.experts * 3600 / seconds,
            "epoch_s": seconds / (case.experts * case.epochs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="device of the CUDA cases (CPU cases always run on cpu)")
    parser.add_argument("--only", choices=["cpu", "cuda"], default=None)
    args = parser.parse_args()
    runs = []
    if args.only != "cuda":
        # warm-up: thread pools and first-call overheads out of the first timed case
        run(Case("digits", 10, 100, 1, 1, 2), torch.device("cpu"))
        runs += [(c, torch.device("cpu")) for c in CPU_CASES]
    if args.only != "cpu" and torch.cuda.is_available():
        device = resolve_device(args.device)
        runs += [(c, device) for c in CUDA_CASES]
    print("| device | dataset | train / test images | experts x epochs | P | seconds | s per expert-epoch | experts/hour |")
    print("|---|---|---|---|---|---|---|---|")
    for case, device in runs:
        r = run(case, device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"| {name} | {case.dataset} | {r['train']} / {r['test']} | {case.experts} x {case.epochs} | "
              f"{case.parallel} | {r['seconds']:.1f} | {r['epoch_s']:.2f} | {r['per_hour']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
