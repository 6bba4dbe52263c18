"""Published numbers (DESIGN.md, "Published results" and "After MTT") as data, and side-by-side comparisons.

Accuracies are test accuracy in % of a ConvNet trained on the set with the evaluation
protocol. Datasets use this package's names (`cifar10`, `cifar100`, `fashion-mnist`).
Our measured recipes (`bench/methods.py` -> `runs/methods/results.json`) are read by
`load_method_results` and shown beside the published MTT and successors by `successors_table`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
    "ATT": {"cifar10": (48.3, 67.7, 74.5), "cifar100": (26.1, 44.2, 51.2)},
    "PAD": {"cifar10": (47.2, 67.4, 77.0), "cifar100": (28.4, 47.8, 55.9)},
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

# MTT and the trajectory-matching methods after it, as their papers name them
SUCCESSORS = ("MTT", "TESLA", "FTD", "DATM", "ATT", "PAD")

# Our names for methods that the papers name otherwise (our recipes are lowercase: --method datm)
ALIASES = {"random": "random real", "full": "full dataset"} | {m.lower(): m for m in SUCCESSORS}


def published(method: str, dataset: str, ipc: int | None) -> float | None:
    """The published accuracy, or None if the paper has none (ipc is ignored for the full dataset)."""
    method = ALIASES.get(method, method)
    return PUBLISHED.get((method, dataset, None if method == "full dataset" else ipc))


def mean_and_std(value: Any) -> tuple[float, float | None]:
    """Accept an EvalResult, a {"mean", "std"} dict, a (mean, std) pair or a bare number."""
    if isinstance(value, Mapping):
        return float(value["mean"]), value.get("std")
    if isinstance(value, (tuple, list)):
        mean, std = value
        return float(mean), None if std is None else float(std)
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
        mean, std = mean_and_std(value)
        rows.append((ALIASES.get(method, method), mean, std, published(method, dataset, ipc)))
    seen = {r[0] for r in rows}
    rows += [(m, None, None, acc) for (m, d, i), acc in PUBLISHED.items()
             if d == dataset and i in (ipc, None) and m not in seen]

    header = ["method", "ours", "ours std", "paper", "ours - paper"]
    table = [[m, _fmt(mean), _fmt(std), _fmt(paper),
              f"{mean - paper:+.1f}" if mean is not None and paper is not None else ""]
             for m, mean, std, paper in rows]
    title = f"{dataset}, IPC {ipc}" if ipc is not None else dataset
    return (_markdown(f"**{title}** (test accuracy %)", header, table),
            _csv(["dataset", "ipc", *header], ([dataset, "" if ipc is None else ipc, *row] for row in table)))


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def _markdown(title: str, header: list[str], table: list[list[str]]) -> str:
    """A titled markdown table; empty cells show as "–"."""
    md = [title, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    md += ["| " + " | ".join(cell or "–" for cell in row) + " |" for row in table]
    return "\n".join(md) + "\n"


def _csv(header: list[str], rows: Any) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def successors_table(results: Mapping[tuple[str, str, int], Any] | None = None,
                     methods: tuple[str, ...] = SUCCESSORS,
                     datasets: tuple[str, ...] | None = None) -> tuple[str, str]:
    """MTT and its successors, published and (when `results` is given) ours, as (markdown, csv).

    `results` maps (method, dataset, ipc) to a result ((mean, std) as `load_method_results`
    gives, an EvalResult, a {"mean", "std"} dict or a number); methods may be our recipe names
    (`datm`) or the papers' (`DATM`). Markdown: one row per method (then any other method of
    `results`), a "paper" column per dataset and IPC that has a published number, and beside
    it an "ours" column ("owed" where `results` has no number; left out when `results` is
    None). Columns: every dataset and IPC with a published number for these methods or a
    result of ours (`datasets` picks and orders the datasets). CSV: one row per method,
    dataset and IPC with a number, published or ours.
    """
    ours = {(ALIASES.get(m, m), d, i): mean_and_std(v) for (m, d, i), v in (results or {}).items()}
    rows = list(dict.fromkeys([*(ALIASES.get(m, m) for m in methods), *(m for m, _, _ in ours)]))
    keys = [(d, i) for (m, d, i) in PUBLISHED if m in rows and i is not None] + [(d, i) for _, d, i in ours]
    if datasets is not None:
        keys = [(d, i) for d in datasets for i in sorted({i for dd, i in keys if dd == d})]
    else:
        order = list(dict.fromkeys(d for d, _ in keys))
        keys = sorted(set(keys), key=lambda k: (order.index(k[0]), k[1]))

    with_paper = {(d, i) for d, i in keys for m in rows if (m, d, i) in PUBLISHED}  # no all-blank paper column
    header, table, long = ["method"], [], []
    for d, i in keys:
        header += ([f"{d} IPC {i} paper"] if (d, i) in with_paper else []) \
            + ([f"{d} IPC {i} ours"] if results is not None else [])
    for m in rows:
        row = [m]
        for d, i in keys:
            paper = PUBLISHED.get((m, d, i))
            mean, std = ours.get((m, d, i), (None, None))
            if (d, i) in with_paper:
                row.append(_fmt(paper))
            if results is not None:
                row.append("owed" if mean is None else _fmt(mean) + ("" if std is None else f" +- {std:.1f}"))
            if paper is not None or mean is not None:
                long.append([m, d, i, _fmt(paper), _fmt(mean), _fmt(std),
                             f"{mean - paper:+.1f}" if mean is not None and paper is not None else ""])
        table.append(row)
    title = "**MTT and its successors** (ConvNet, test accuracy %" + ("; ours: mean +- std)" if results is not None else ")")
    return (_markdown(title, header, table),
            _csv(["method", "dataset", "ipc", "paper", "ours", "ours std", "ours - paper"], long))


def load_method_results(path: str | os.PathLike) -> dict[tuple[str, str, int], tuple[float, float | None]]:
    """Our measured recipes, as `bench/methods.py` writes them: {(method, dataset, ipc): (mean, std)}.

    The file is a JSON list of records {"method": "datm", "dataset": "digits", "ipc": 1, "mean": 93.1,
    "std": 0.8, ...} (other keys are ignored). A missing file gives {} (nothing measured yet); a
    malformed one raises ValueError saying which record is wrong and why.
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of result records, got {type(records).__name__}")

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    checks = {"method": (lambda x: isinstance(x, str) and x != "", "a non-empty string"),
              "dataset": (lambda x: isinstance(x, str) and x != "", "a non-empty string"),
              "ipc": (lambda x: isinstance(x, int) and not isinstance(x, bool) and x > 0, "a positive integer"),
              "mean": (number, "a finite number"),
              "std": (lambda x: x is None or number(x), "a finite number or null")}
    results: dict[tuple[str, str, int], tuple[float, float | None]] = {}
    where: dict[tuple[str, str, int], int] = {}
    for n, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {n} is not an object: {record!r}")
        for key, (ok, what) in checks.items():
            if key not in record and key != "std":
                raise ValueError(f"{path}: record {n} has no {key!r}: {record!r}")
            if not ok(record.get(key)):
                raise ValueError(f"{path}: record {n}: {key!r} must be {what}, got {record.get(key)!r}")
        key = (record["method"], record["dataset"], record["ipc"])
        if key in results:
            raise ValueError(f"{path}: records {where[key]} and {n} are both {key}: keep one")
        std = record.get("std")
        results[key], where[key] = (float(record["mean"]), None if std is None else float(std)), n
    return results
