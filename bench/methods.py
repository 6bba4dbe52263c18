"""Every recipe (--method mtt|tesla|ftd|datm|att|pad) against plain MTT: same experts, same iteration budget.

For each configuration the experts are trained once; each recipe then distils from them with
its options over the same preset (mtt.recipes.apply_recipe) and the final set is evaluated with
the full protocol (5 networks x 1000 epochs, lr = the learned step size, soft labels where the
recipe has them), beside random real images on the same protocol. Recipes run as separate
processes, `--jobs` at a time, each single-threaded (OMP_NUM_THREADS=1): on a 2-core machine two
2-thread torch processes slow each other 10-20x.

    python bench/methods.py --out runs/methods --configs digits-ipc1 fmnist-ipc1 --jobs 2

Writes OUT/CONFIG/experts/, OUT/CONFIG/METHOD/ (the run and result.json as soon as it is done, so a
stopped bench keeps what it measured), then OUT/results.json (read by mtt.paper.load_method_results),
OUT/results.md and the chart docs/methods.png. A rerun skips what is already measured.
`--smoke` runs every recipe at toy size in about a minute (tests/test_bench_methods.py).

FTD's GSAM experts and PAD's easy-to-hard experts are expert-stage options: on the same experts
the ftd and pad rows measure the distillation-stage ideas only (EMA; the loss mask on top of
DATM); the rows ftd-own-experts and pad-own-experts distil from experts trained with them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtt.buffers import ExpertBuffers  # noqa: E402
from mtt.data import Dataset, load_dataset  # noqa: E402
from mtt.distill import CHECKPOINT, distill, preset  # noqa: E402
from mtt.evaluate import EvalConfig, evaluate_baseline, evaluate_synthetic  # noqa: E402
from mtt.experts import ExpertConfig, train_experts  # noqa: E402
from mtt.io import atomic_write_json  # noqa: E402
from mtt.recipes import METHODS  # noqa: E402

RANDOM = "random real"


@dataclass(frozen=True)
class Variant:
    """A row beside the recipes: one idea of a recipe taken apart, or a recipe with experts of its own."""

    recipe: str
    fields: dict[str, Any] = field(default_factory=dict)   # over the recipe's settings
    experts: dict[str, Any] = field(default_factory=dict)  # over the configuration's experts; {}: the shared ones


# FTD's GSAM (rho 0.01, alpha 0.3: its CIFAR-10 values). PAD trains GSAM experts too, easy to hard, with
# its 100-epoch schedule (all images from epoch 20; the easiest 10 % / 20 % left out after 40 / 60)
# scaled to these configurations' 10-epoch experts.
GSAM = {"sam_rho": 0.01, "gsam_alpha": 0.3}
PAD_CURRICULUM = {"easy_to_hard": 0.75, "easy_to_hard_epochs": 2, "drop_easy": ((4, 0.1), (6, 0.2))}
VARIANTS = {
    "tesla-hard-labels": Variant("tesla", {"teacher_labels": False}),  # TESLA's backward without its labels
    "ftd-own-experts": Variant("ftd", experts=GSAM),
    "pad-own-experts": Variant("pad", experts=GSAM | PAD_CURRICULUM),
}


@dataclass
class BenchConfig:
    """One row group of the table: a dataset, the experts, the preset's overrides and the protocol."""

    dataset: str
    ipc: int
    experts: dict[str, Any]
    distill: dict[str, Any] = field(default_factory=dict)  # over preset(dataset, ipc, method)
    train_per_class: int | None = None  # experts (and random real) on a subset of the training set
    eval_epochs: int = 1000
    eval_repeats: int = 5


CONFIGS = {
    # The digits preset (200 iterations, 10 unrolled steps), ConvNet-128 experts as in BENCHMARKS.md.
    "digits-ipc1": BenchConfig("digits", 1, dict(num_experts=5, epochs=10, parallel=5)),
    "digits-ipc10": BenchConfig("digits", 10, dict(num_experts=5, epochs=10, parallel=5)),
    # The Fashion-MNIST CPU configuration of BENCHMARKS.md: small ConvNet-64 experts, 100 iterations.
    "fmnist-ipc1": BenchConfig("fashion-mnist", 1, dict(num_experts=3, epochs=10, width=64, parallel=3),
                               dict(width=64, syn_steps=10, lr_lr=1e-6, max_start_epoch=5, iterations=100),
                               train_per_class=300),
}
SMOKE = BenchConfig("digits", 1, dict(num_experts=2, epochs=4, width=16, lr=0.05, parallel=2),
                    dict(width=16, syn_steps=3, max_start_epoch=2, expert_epochs=1, iterations=3, batch_syn=None),
                    eval_epochs=3, eval_repeats=2)


def load(config: BenchConfig) -> Dataset:
    dataset = load_dataset(config.dataset)
    return dataset.take_per_class(config.train_per_class) if config.train_per_class else dataset


def eval_config(config: BenchConfig, width: int) -> EvalConfig:
    return EvalConfig(epochs=config.eval_epochs, repeats=config.eval_repeats, width=width, progress=False)


def run_method(config: BenchConfig, method: str, out: Path) -> dict[str, Any]:
    """Distil with `method`'s recipe from its experts, evaluate the result; the record for results.json."""
    dataset = load(config)
    variant = VARIANTS.get(method, Variant(method))
    experts = out.parent / (f"experts-{method}" if variant.experts else "experts")
    extra: dict[str, Any] = {}
    if variant.experts:  # its own experts, trained here (in this job's process) the first time
        started = time.perf_counter()
        experts_for(config, experts, variant.experts)
        extra["experts_seconds"] = round(time.perf_counter() - started, 1)
    buffers = ExpertBuffers.open(experts)
    started = time.perf_counter()
    if method == RANDOM:
        width = config.experts.get("width", 128)
        result = evaluate_baseline(dataset, config.ipc, "random", ["ConvNet"], eval_config(config, width), "cpu")
        distill_seconds = 0.0
    else:
        settings = preset(config.dataset, config.ipc, variant.recipe, device="cpu", eval_repeats=0,
                          **{"width": config.experts.get("width", 128)} | config.distill | variant.fields)
        settings.validate()
        synthetic = distill(settings, dataset, buffers, out, resume=(out / CHECKPOINT).exists(),
                            progress=False)
        distill_seconds = time.perf_counter() - started
        history = json.loads((out / "history.json").read_text())
        extra |= {"final_loss": history["loss"][-1], "syn_lr": synthetic.syn_lr,
                  "skipped": len(history.get("skipped", [])), "backward": history.get("backward", {}).get("mode")}
        result = evaluate_synthetic(synthetic, dataset, ["ConvNet"], eval_config(config, settings.width), "cpu")
    evaluation = result["ConvNet"]
    return {"method": method, "dataset": config.dataset, "ipc": config.ipc, "mean": evaluation.mean,
            "std": evaluation.std, "runs": evaluation.runs, "distill_seconds": round(distill_seconds, 1),
            "seconds": round(time.perf_counter() - started, 1), **extra}


def experts_for(config: BenchConfig, folder: Path, options: dict[str, Any] | None = None) -> None:
    """Train the configuration's experts (with a variant's options over them) once; finished experts are kept."""
    settings = ExpertConfig(**config.experts | (options or {}))
    train_experts(load(config), settings, folder, device="cpu", progress=False)


def run_config(name: str, config: BenchConfig, methods: list[str], out: Path, jobs: int, smoke: bool) -> None:
    folder = out / name
    print(f"[{name}] experts ...", flush=True)
    experts_for(config, folder / "experts")
    todo = [m for m in methods if not (folder / m.replace(" ", "_") / "result.json").exists()]

    def job(method: str) -> None:
        command = [sys.executable, __file__, "--job", name, method, "--out", str(out)] + (["--smoke"] if smoke else [])
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        status = "ok" if done.returncode == 0 else f"FAILED ({done.returncode}):\n{done.stderr[-2000:]}"
        print(f"[{name}] {method}: {status}", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(job, todo))


def collect(out: Path, names: list[str]) -> list[dict[str, Any]]:
    records = [json.loads(p.read_text()) for name in names for p in sorted((out / name).glob("*/result.json"))]
    order = [RANDOM, *METHODS, *VARIANTS]
    return sorted(records, key=lambda r: (r["dataset"], r["ipc"], order.index(r["method"])))


def table(records: list[dict[str, Any]]) -> str:
    lines = ["| dataset | IPC | method | accuracy (%) | vs mtt | distill s | total s | final loss | skipped |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["dataset"], r["ipc"]): r["mean"] for r in records if r["method"] == "mtt"}
    for r in records:
        delta = "" if r["method"] in ("mtt", RANDOM) or (r["dataset"], r["ipc"]) not in base \
            else f"{r['mean'] - base[(r['dataset'], r['ipc'])]:+.1f}"
        loss = f"{r['final_loss']:.3f}" if "final_loss" in r else ""
        lines.append(f"| {r['dataset']} | {r['ipc']} | {r['method']} | {r['mean']:.1f} +- {r['std']:.1f} | {delta} | "
                     f"{r['distill_seconds']:.0f} | {r['seconds']:.0f} | {loss} | {r.get('skipped', '')} |")
    return "\n".join(lines) + "\n"


def chart(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["dataset"], r["ipc"]) for r in records))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False)
    for ax, (dataset, ipc) in zip(axes[0], groups):
        rows = [r for r in records if (r["dataset"], r["ipc"]) == (dataset, ipc)]
        colors = ["0.7" if r["method"] == RANDOM else "C1" if r["method"] == "mtt" else "C0" for r in rows]
        ax.bar(range(len(rows)), [r["mean"] for r in rows], yerr=[r["std"] for r in rows], color=colors, capsize=3)
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows], fontsize=8, rotation=35, ha="right")
        low = min(r["mean"] - r["std"] for r in rows)
        ax.set_ylim(max(0, low - 5), min(100, max(r["mean"] + r["std"] for r in rows) + 3))
        ax.set_title(f"{dataset}, IPC {ipc}", fontsize=10)
        ax.set_ylabel("test accuracy (%), 5 x 1000 epochs" if ax is axes[0][0] else "")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/methods")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, *VARIANTS, "random"],
                        default=[*METHODS, *VARIANTS, "random"])
    parser.add_argument("--jobs", type=int, default=2, help="recipes run at once, each single-threaded")
    parser.add_argument("--chart", default=str(ROOT / "docs" / "methods.png"))
    parser.add_argument("--smoke", action="store_true", help="every recipe at toy size (a minute on a CPU)")
    parser.add_argument("--job", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = {"smoke": SMOKE} if args.smoke else CONFIGS
    names = ["smoke"] if args.smoke else args.configs
    out = Path(args.out)
    methods = [RANDOM if m == "random" else m for m in args.methods]

    if args.job:  # one recipe of one configuration, in its own process
        name, method = args.job
        folder = out / name / method.replace(" ", "_")
        record = run_method(configs[name], method, folder)
        atomic_write_json(folder / "result.json", record)
        return

    for name in names:
        run_config(name, configs[name], methods, out, args.jobs, args.smoke)
    records = collect(out, names)
    atomic_write_json(out / "results.json", records)
    (out / "results.md").write_text(table(records))
    if not args.smoke:
        chart(records, Path(args.chart))
    print(table(records))


if __name__ == "__main__":
    main()
