"""Published numbers (DESIGN.md, "Published results") as data, and side-by-side comparisons.

Accuracies are test accuracy in % of a ConvNet trained on the set with the evaluation
protocol. Datasets use this package's names (`cifar10`, `cifar100`, `fashion-mnist`).
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtt.io import atomic_write

# method -> dataset -> (acc at IPC 1, 10, 50); None where the paper has no number
_TABLE: dict[str, dict[str, tuple[float | None, float | None, float | None]]] = {
    "random real": {"cifar10": (14.4, 26.0, 43.4), "cifar100": (4.2, 14.6, 30.0)},
    "DC": {"cifar10": (28.3, 44.9, 53.9), "cifar100": (12.8, 25.2, None), "fashion-mnist": (70.5, 82.3, 83.6)},
    "DSA": {"cifar10": (28.8, 52.1, 60.6), "cifar100": (13.9, 32.3, 42.8), "fashion-mnist": (70.6, 84.6, 88.7)},
    "DM": {"cifar10": (26.0, 48.9, 63.0), "cifar100": (11.4, 29.7, 43.6)},
    "KIP (finite net)": {"fashion-mnist": (73.8, 86.8, 87.8)},
    "IDC": {"cifar10": (50.6, 67.5, 74.5), "fashion-mnist": (81.0, 86.0, 86.2)},
    "MTT": {"cifar10": (46.3, 65.3, 71.6), "cifar100": (24.3, 40.1, 47.7)},
    "TESLA": {"cifar10": (48.5, 66.4, 72.6), "cifar100": (24.8, 41.7, 47.9)},
    "FTD": {"cifar10": (46.8, 66.6, 73.8), "cifar100": (25.2, 43.4, 50.7)},
    "DATM": {"cifar10": (46.9, 66.8, 76.1), "cifar100": (27.9, 47.2, 55.0)},
}
IPCS = (1, 10, 50)

# (method, dataset, ipc) -> accuracy %; ipc None for the whole training set
PUBLISHED: dict[tuple[str, str, int | None], float] = {
    (method, dataset, ipc): acc
    for method, row in _TABLE.items() for dataset, accs in row.items()
    for ipc, acc in zip(IPCS, accs) if acc is not None
} | {("full dataset", "cifar10", None): 84.8, ("full dataset", "cifar100", None): 56.2}

# MTT's CIFAR-10 IPC 10 set evaluated on other architectures
MTT_CROSS_ARCH_CIFAR10_IPC10: dict[str, float] = {"ConvNet": 64.3, "ResNet18": 46.4, "VGG11": 50.3, "AlexNet": 34.2}

# Our names for methods that the paper names otherwise
ALIASES = {"random": "random real", "full": "full dataset"}


def published(method: str, dataset: str, ipc: int | None) -> float | None:
    """The published accuracy, or None if the paper has none (ipc is ignored for the full dataset)."""
    method = ALIASES.get(method, method)
    return PUBLISHED.get((method, dataset, None if method == "full dataset" else ipc))


def _mean_std(value: Any) -> tuple[float, float | None]:
    """Accept an EvalResult, a {"mean", "std"} dict or a bare number."""
    if isinstance(value, Mapping):
        return float(value["mean"]), value.get("std")
    if hasattr(value, "mean"):
        return float(value.mean), getattr(value, "std", None)
    return float(value), None


def comparison_table(ours: Mapping[str, Any], dataset: str, ipc: int | None) -> tuple[str, str]:
    """Ours vs paper for one dataset and IPC, as (markdown, csv).

    `ours` maps method names ("MTT", "random", "herding", ...) to results. Rows: our methods
    first, then every other published method for this dataset and IPC.
    """
    rows = []
    for method, value in ours.items():
        mean, std = _mean_std(value)
        rows.append((ALIASES.get(method, method), mean, std, published(method, dataset, ipc)))
    seen = {r[0] for r in rows}
    rows += [(m, None, None, acc) for (m, d, i), acc in PUBLISHED.items()
             if d == dataset and i in (ipc, None) and m not in seen]

    def fmt(x: float | None) -> str:
        return "" if x is None else f"{x:.1f}"

    header = ["method", "ours", "ours std", "paper", "ours - paper"]
    table = [[m, fmt(mean), fmt(std), fmt(paper),
              f"{mean - paper:+.1f}" if mean is not None and paper is not None else ""]
             for m, mean, std, paper in rows]
    title = f"{dataset}, IPC {ipc}" if ipc is not None else dataset
    md = [f"**{title}** (test accuracy %)", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    md += ["| " + " | ".join(cell or "–" for cell in row) + " |" for row in table]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "ipc", *header])
    writer.writerows([dataset, "" if ipc is None else ipc, *row] for row in table)
    return "\n".join(md) + "\n", buffer.getvalue()


def plot_cross_arch(results: Mapping[str, Any], paper: Mapping[str, float] | None = None,
                    path: str | os.PathLike = "cross_arch.png", title: str = "Cross-architecture evaluation") -> Path:
    """Bar chart of accuracy per architecture (ours with std error bars, paper beside it); saves a PNG.

    Uses matplotlib's Figure with the Agg canvas directly, so it never touches pyplot's global
    backend (notebooks keep their inline one).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(results)
    means, stds = zip(*(_mean_std(results[m]) for m in models))
    fig = Figure(figsize=(1.4 * len(models) + 2.5, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.38 if paper else 0.6
    xs = range(len(models))
    offset = -width / 2 if paper else 0.0
    bars = ax.bar([x + offset for x in xs], means, width, yerr=[float("nan") if s is None else s for s in stds], capsize=3,
                  label="ours", color="tab:blue")
    ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], padding=2, fontsize=8)
    if paper:
        published_accs = [paper.get(m) for m in models]
        known = [(x + width / 2, acc) for x, acc in zip(xs, published_accs) if acc is not None]
        if known:
            pbars = ax.bar(*zip(*known), width, label="paper", color="tab:orange")
            ax.bar_label(pbars, labels=[f"{acc:.1f}" for _, acc in known], padding=2, fontsize=8)
    ax.set_xticks(list(xs), models, rotation=20 if len(models) > 5 else 0)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, min(100, max([*means, *(paper or {}).values()]) * 1.18 + 2))
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
