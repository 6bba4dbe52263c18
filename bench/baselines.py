"""Random-real (or herding) baselines on the full evaluation protocol, timed run by run.

    OMP_WAIT_POLICY=PASSIVE python bench/baselines.py --dataset fashion-mnist --ipc 1 10 --seeds 0 1 2 3 4

Run with seed s draws its own real subset with seed s and trains a fresh network seeded s,
exactly as `python -m mtt baseline` does for its repeat s. Each run is merged into --out
(JSON, one entry per method/dataset/ipc/model, keyed by seed) as soon as it ends, so that a
long benchmark can be stopped and extended with more seeds later, or split over processes
(on a 2-core CPU, two single-threaded seeds at once: OMP_NUM_THREADS=1 ... --seeds 1 & ... --seeds 2).
Herding trains its feature network once per seed and reuses it for every ipc; with
--feature-seed N one feature network (seed N) serves every seed, so that the runs then differ
only in the evaluated network (the subset is fixed), at 1/len(seeds) of the cost.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mtt.data import load_dataset
from mtt.device import resolve_device
from mtt.evaluate import BASELINE_LR, EvalConfig, EvalResult, baseline_images, herding_features, train_and_test
from mtt.io import atomic_write_json


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict:
    return {"device": str(device), "cpu": cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--method", default="random", choices=["random", "herding"])
    parser.add_argument("--feature-seed", type=int, default=None, help="herding: one feature network for all seeds")
    parser.add_argument("--model", default="ConvNet")
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=BASELINE_LR)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/bench_baselines.json")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dataset = load_dataset(args.dataset)
    config = EvalConfig(model=args.model, epochs=args.epochs, lr=args.lr)
    command = " ".join(["python", *sys.argv])
    fixed = "" if args.feature_seed is None else f"/features-seed{args.feature_seed}"
    features = None
    for seed in args.seeds:
        if args.method == "herding" and (features is None or args.feature_seed is None):
            features = herding_features(dataset, seed if args.feature_seed is None else args.feature_seed, device)
        for ipc in args.ipc:
            key = f"{args.method}/{dataset.name}/ipc{ipc}/{args.model}/epochs{args.epochs}/lr{args.lr}{fixed}"
            start = time.time()
            images, labels = baseline_images(dataset, ipc, args.method, seed, device, features=features)
            with tqdm(total=args.epochs + 1, desc=f"seed {seed}, ipc {ipc}", unit="pass", leave=False,
                      disable=None) as bar:  # on terminals only: the printed line below is the record
                accuracy = train_and_test(images, labels, dataset.test_images, dataset.test_labels, config, seed,
                                          device, on_epoch=lambda *_: bar.update())
            run = {"accuracy": accuracy, "seconds": round(time.time() - start, 1),
                   "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                   "load_average": os.getloadavg(), "command": command, **machine(device)}
            entry = record(Path(args.out), key, seed, run)
            print(f"{key} seed {seed}: {accuracy:.2f} % in {time.time() - start:.0f} s "
                  f"(so far {entry['mean']:.2f} +- {entry['std']:.2f} over {len(entry['runs'])})", flush=True)


def record(out: Path, key: str, seed: int, run: dict) -> dict:
    """Merge one run into the JSON file, re-read just before writing so that parallel processes keep each other's runs."""
    results = json.loads(out.read_text()) if out.exists() else {}
    entry = results.setdefault(key, {"by_seed": {}})
    entry["by_seed"][str(seed)] = run
    entry.update(EvalResult.of(r["accuracy"] for r in entry["by_seed"].values()).to_dict())
    atomic_write_json(out, results)
    return entry


if __name__ == "__main__":
    main()
