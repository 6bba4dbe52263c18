"""The GPU measurements owed, in one command and one report (markdown + JSON).

    PYTHONPATH=. python3 bench/gpu_suite.py --out DIR [--part NAME[,NAME...]]... [--smoke]

Parts (default: all, in this order; `--part` takes names in the order to run them):
  cuda-tests     the checks that need CUDA (gradient equality of the backward modes, with segments too;
                 choose_backward; distillation; bit-identical resume;
                 experts P=1 vs P=2), as plain functions (no pytest on the GPU machine)
  unroll-c10     s/iteration and peak memory of one MTT iteration at the paper's CIFAR-10 IPC 1/10/50
                 shapes: the original's loop (bench/reference_unroll.py), our `full`, `checkpointed`,
                 `auto`, both modes with cuDNN's benchmark mode, and segments=8 (random tensors, no dataset
                 needed)
  unroll-c100    the same at CIFAR-100 IPC 10 and 50 (the reference is expected to run out of memory at 50)
  compile-c10    `checkpointed` and `full` with compiler=inductor (mtt's unroll, its steps torch.compile'd,
  compile-c100   every DSA op) against the original's loop and eager `full` at the CIFAR-10 IPC 10/1/50 and
                 CIFAR-100 IPC 10/50 shapes: s/iteration, peak memory, compile time, gradient agreement
  cudagraphs-c10 the same with compiler=CUDA_GRAPHS (inductor's kernels, each step replayed as a CUDA graph) at
                 CIFAR-10 IPC 1 and 10, where a step's kernels are small and their launches count
  experts        experts per hour on full Fashion-MNIST, sequential (P=1) vs vectorised P=10, 50
  fmnist-experts ConvNet-128 experts on full Fashion-MNIST into DIR/experts_fashion-mnist (resumes;
                 trains group by group while a time budget lasts)
  fmnist-ipc1    distillation with the fashion-mnist IPC 1 preset from those experts (iterations sized
  fmnist-ipc10   to a time budget), then the full protocol (5 ConvNet-128 x 1000 epochs) vs random real
Each part writes DIR/NAME.json (status "running" while it works, updated after every measurement)
and rewrites DIR/report.md from every part's JSON present, so a run stopped at a time limit still
leaves what it measured. A part that raises is recorded as failed and the next part runs; SIGINT
or SIGTERM records the part as interrupted and stops. Exit status: 0 all parts ok, 1 some part
failed, 2 bad arguments, 130 interrupted.

On the GPU machine (python3 with torch, torchvision, safetensors, huggingface_hub, scikit-learn,
matplotlib, tqdm; nothing else needed), from the repository root. Fashion-MNIST is read from
./data/fashion-mnist (the four IDX .gz files), which is git-ignored, so copy it there first
(`mkdir -p data && cp -r /usr/share/datasets/fashion-mnist data/`) and carry it: the device tool's
`carry: ["data/fashion-mnist"]`. A task that is lent a device gets 15 minutes of it, the machine's
start and idle time included, so the parts come in two device commands that fit one task
(DEVICE_PLAN, called back to back), then those owed to later tasks (DEVICE_LATER, one group of
commands per task); the report lists them. Every part has a time budget (its cells, P values, expert
groups and distillation iterations stop where it is spent, each skip recorded), so the commands end
on time whatever the GPU. They write into runs/gpu_suite on the machine and copy the JSONs and the
report into $OUT (8 files at most: what the device tool brings back).

--smoke runs every part at toy size on the CPU (Fashion-MNIST cut to 20 images per class if its
files are found, else digits) in a minute or two: tests/test_gpu_suite.py runs it.
"""
from __future__ import annotations

import os

# Deterministic cuBLAS (cuda-tests' resume check) needs this before the first cuBLAS call.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse
import contextlib
import copy
import datetime
import gc
import hashlib
import importlib.util
import json
import math
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import unittest.mock
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cache, cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch._dynamo.utils import counters

from mtt.augment import DEFAULT_STRATEGY, DSA
from mtt.buffers import ExpertBuffers, finished_experts
from mtt.data import SPECS, Dataset, DatasetNotFoundError, load_dataset
from mtt.device import resolve_device, seconds, synchronize
from mtt.distill import (CHECKPOINT, FINAL_SYNTHETIC, DistillConfig, IterationInfo, distill, load_snapshots,
                         network_from_buffers, preset)
from mtt.distributed import RankWarning
from mtt.evaluate import EvalConfig, evaluate, evaluate_baseline
from mtt.experts import ExpertConfig, estimate_seconds, start_group, train_epoch, train_experts, train_group
from mtt.io import atomic_write_json, atomic_write_text
from mtt.networks import get_network
from mtt.paper import PUBLISHED
from mtt.unroll import (CUDA_GRAPH_BACKENDS, CUDA_GRAPHS, EXACT_MODES, BackwardChoice, Student, backward_name,
                        choose_backward, free_memory, full_graph_bytes, graphs_that_fit, memory_share, plan_steps,
                        unroll)

ROOT = Path(__file__).resolve().parents[1]
DEVICE_OUT = "runs/gpu_suite"  # git-ignored: survives between device commands while the machine is warm
# The device tool's limits (.library/device/README.md): device time per task, machine start, idle wait and
# transfers included; what a fresh machine's start, the transfers and the 30 s idle wait before it goes back
# cost (a guess: "a minute or more" to start); one command's limit; the files that come back from $OUT.
DEVICE_BUDGET_S = 900
DEVICE_OVERHEAD_S = 150
DEVICE_COMMAND_LIMIT_S = 600
DEVICE_MAX_FILES = 8
KILL_GRACE_S = 15  # after its `timeout` sends SIGINT, a part has this long to record itself before SIGKILL
MiB = 2**20


def say(message: str) -> None:
    print(f"[gpu_suite] {message}", file=sys.stderr, flush=True)


@cache
def reference() -> ModuleType:
    """bench/reference_unroll.py (bench/ is not a package: loaded by its path)."""
    spec = importlib.util.spec_from_file_location("reference_unroll", ROOT / "bench" / "reference_unroll.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are created
    spec.loader.exec_module(module)
    return module


def release(device: torch.device) -> None:
    """Free what the last measurement left (a graph kept by an exception's frames, the allocator cache)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def relative_error(ours: Tensor, reference_: Tensor) -> float:
    """max |ours - reference| / max |reference|."""
    return ((ours.double() - reference_.double()).abs().max() / reference_.double().abs().max()).item()


def cosine(a: Tensor, b: Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


# ----------------------------------------------------------------------------- data

@dataclass
class DataChoice:
    """Which real data a part uses; the smoke variants cut it down and may fall back to digits."""

    dataset: str = "fashion-mnist"
    train_per_class: int | None = None  # None: the whole training set
    test_images: int | None = None      # None: the whole test split
    digits_if_missing: bool = False

    def smoke(self) -> DataChoice:
        return replace(self, train_per_class=20, test_images=200, digits_if_missing=True)

    def load(self) -> tuple[Dataset, str | None]:
        """The dataset, and a note when it is not the one asked for."""
        note = None
        try:
            dataset = load_dataset(self.dataset, download=False)  # offline machines: fail at once, not after a try
        except DatasetNotFoundError as err:
            if not self.digits_if_missing:
                raise DatasetNotFoundError(f"{err}\nOn the GPU machine: copy the IDX files into data/{self.dataset} "
                                           f"here and carry that folder with the device command.") from None
            dataset, note = load_dataset("digits"), f"{self.dataset} not found: smoke run on digits"
        if self.train_per_class:
            dataset = dataset.take_per_class(self.train_per_class)
        if self.test_images:
            dataset = replace(dataset, test_images=dataset.test_images[:self.test_images],
                              test_labels=dataset.test_labels[:self.test_images])
        return dataset, note


def experts_folder(out: Path, dataset: Dataset) -> Path:
    return out / f"experts_{dataset.name}"


# ----------------------------------------------------------------------------- measuring one cell

def measure(make_run: Callable[[], Callable[[], Any]], device: torch.device, repeats: int,
            budget_s: float) -> tuple[dict[str, Any], Any]:
    """Build a run, call it once (warm-up, peak memory), then time it up to `repeats` times.

    Fewer timed runs when one takes long: as many as fit in `budget_s` after the warm-up, at least
    one, so a slow cell costs at most about twice its warm-up plus the budget. Peak memory is
    torch.cuda.max_memory_allocated above what was allocated before (the problem's own tensors
    excluded); None off CUDA, where one process's peak RSS cannot be split between cells.
    Returns (row, the warm-up's output); out of memory and other errors become the row's status.
    """
    release(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    output = None
    try:
        run = make_run()
        started = time.perf_counter()
        output = run()
        synchronize(device)
        first = time.perf_counter() - started
        peak = (torch.cuda.max_memory_allocated(device) - base) / MiB if device.type == "cuda" else None
        times = []
        for _ in range(max(1, min(repeats, int(budget_s // max(first, 1e-9))))):
            times.append(seconds(run, device))
    except torch.OutOfMemoryError as err:
        row = {"status": "OOM", "error": first_line(err)}
    except Exception as err:  # a cell that cannot run (e.g. an engine feature missing) must not end the part
        row = {"status": "error", "error": first_line(err)}
    else:
        row = {"status": "ok", "seconds": statistics.median(times), "runs": times, "first_run_s": first,
               "peak_mib": peak}
    release(device)
    return row, output


# ----------------------------------------------------------------------------- part: unroll

@dataclass
class UnrollConfig:
    cases: tuple[tuple[str, int], ...]  # (dataset, IPC): shapes, steps, batch and lr from the paper preset
    width: int = 128                    # ConvNet-128, as the presets
    size: int | None = None             # image side; None: the dataset's (smoke: 8)
    steps: int | None = None            # syn_steps; None: the preset's (smoke: 3)
    repeats: int = 2                    # timed runs after the warm-up (median reported)
    cell_budget_s: float = 6.0          # fewer timed runs where one is slow (see `measure`)
    case_budget_s: float = 40.0         # no new cell of a case once this is spent (the rest: "skipped")
    segments: int = 8
    rounds: int = 3                     # then reference, full and checkpointed timed again in turns (interleave)
    card_bytes: int = 40 * 2**30        # and, where full's graph would not fit on an empty card of this size (an
                                        # A100 40GB), what `auto` runs there: checkpointed keeping the graphs that do

    def smoke(self) -> UnrollConfig:
        return replace(self, width=8, size=8, steps=3, repeats=1, case_budget_s=600.0, card_bytes=2**20)


@dataclass
class UnrollCase:
    name: str
    problem: Any  # reference_unroll.Problem: net, theta_start/target, images, labels, syn_lr, plans
    width: int
    steps: int
    batch_syn: int | None
    dsa: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.problem.images.shape[1:])

    def describe(self) -> str:
        p = self.problem
        c, h, w = self.shape
        return (f"{c}x{h}x{w}, ConvNet-{self.width}, {len(p.images)} images, {self.steps} steps, "
                f"batch {self.batch_syn or 'all'}, {p.theta_start.numel():,} parameters, lr {p.syn_lr.item():g}")


def unroll_case(dataset: str, ipc: int, config: UnrollConfig, device: torch.device) -> UnrollCase:
    """Random images and a random network at the paper preset's shapes (timing needs no real data)."""
    ref = reference()
    settings = preset(dataset, ipc)
    spec = SPECS[dataset]
    size = config.size or spec.im_size[0]
    shape = (spec.channels, size, size)
    steps = config.steps or settings.syn_steps
    torch.manual_seed(0)
    net = get_network(settings.model, spec.channels, spec.num_classes, (size, size), width=config.width,
                      depth=settings.depth).to(device)
    theta = torch.cat([p.detach().flatten() for p in net.parameters()])
    images = torch.randn(spec.num_classes * ipc, *shape, device=device)
    labels = torch.arange(spec.num_classes, device=device).repeat_interleave(ipc)
    plans = plan_steps(len(images), steps, settings.batch_syn, shape, settings.dsa, torch.Generator().manual_seed(0),
                       device)
    problem = ref.Problem(net, theta, theta + ref.TARGET_NOISE * torch.randn_like(theta), images, labels,
                          torch.tensor(settings.lr_teacher, device=device), plans)
    return UnrollCase(f"{dataset} IPC {ipc}", problem, config.width, steps, settings.batch_syn, settings.dsa)


def reference_cell(problem: Any) -> Callable[[], Callable[[], Any]]:
    """make_run of the original's inner loop (bench/reference_unroll.py) on the problem."""
    def make() -> Callable[[], Any]:
        ref = reference()
        net = ref.ReparamModule(copy.deepcopy(problem.net))  # the wrapper deregisters its module's parameters
        return lambda: ref.reference_gradients(net, problem)
    return make


def eager_cell(student: Student, problem: Any, mode: str) -> Callable[[], Callable[[], Any]]:
    """make_run of mtt's own `unroll` in an exact mode on the problem."""
    return lambda: lambda: reference().our_gradients(student, problem, mode)


def cudnn_benchmarked(make_run: Callable[[], Callable[[], Any]]) -> Callable[[], Callable[[], Any]]:
    """make_run with cuDNN's benchmark mode on during each run: it times the convolution algorithms for each new
    shape on first use (the warm-up) and keeps the fastest. Off for every other cell, as in the original's code
    and in mtt today; a cell of its own to see whether turning it on for mtt pays."""
    def make() -> Callable[[], Any]:
        run = make_run()

        def benchmarked() -> Any:
            was, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
            try:
                return run()
            finally:
                torch.backends.cudnn.benchmark = was
        return benchmarked
    return make


def unroll_cells(case: UnrollCase, config: UnrollConfig, student: Student,
                 device: torch.device) -> list[tuple[str, Callable[[], Callable[[], Any]]]]:
    """(name, make_run) per method; each run returns (dL/dimages, dL/dsyn_lr)."""
    ref, p = reference(), case.problem

    def segments(mode: str) -> Callable[[], Callable[[], Any]]:
        def make() -> Callable[[], Any]:
            k = config.segments
            plans = plan_steps(len(p.images), case.steps, case.batch_syn, case.shape, case.dsa,
                               torch.Generator().manual_seed(1), device, segments=k)
            starts = p.theta_start + ref.TARGET_NOISE * torch.randn(k, p.theta_start.numel(), device=device)
            targets = starts + ref.TARGET_NOISE * torch.randn_like(starts)

            def run() -> Any:
                result = unroll(student, starts, targets, p.images, p.syn_lr, plans, labels=p.labels, mode=mode)
                return result.grad_images, result.grad_lr
            return run
        return make

    def keeping(kept: int) -> Callable[[], Callable[[], Any]]:
        def run() -> Any:
            result = unroll(student, p.theta_start, p.theta_target, p.images, p.syn_lr, p.plans, labels=p.labels,
                            mode="checkpointed", kept_graphs=kept)
            return result.grad_images, result.grad_lr
        return lambda: run

    # In order of what a cut-short case most needs: the comparison with the original, then what `auto` runs on a
    # smaller card where full's graph does not fit there, then both modes with cuDNN's benchmark mode, then
    # segments (whose gradients the tests already check).
    cells = [("reference", reference_cell(p))] + [(mode, eager_cell(student, p, mode)) for mode in EXACT_MODES]
    graph = full_graph_bytes(student, p.theta_start, p.images, p.syn_lr, p.plans, p.labels)
    if (fit := graphs_that_fit(graph, case.steps, config.card_bytes, memory_share(device))) < case.steps:
        size = config.card_bytes
        card = f"{size / 2**30:g} GiB" if size >= 2**30 else f"{size / 2**20:g} MiB"
        cells += [(f"{card} card: checkpointed-kept{fit}", keeping(fit))]
    cells += [(f"cudnn-benchmark-{m}", cudnn_benchmarked(eager_cell(student, p, m))) for m in EXACT_MODES]
    cells += [(f"segments{config.segments}-{m}", segments(m)) for m in EXACT_MODES]
    return cells


def auto_cell(case: UnrollCase, student: Student, device: torch.device, cells: dict[str, dict]) -> dict[str, Any]:
    """What `auto` chooses here and what choosing costs; an iteration then costs what the chosen mode does."""
    p = case.problem
    release(device)
    try:
        started = time.perf_counter()
        choice = choose_backward(student, p.theta_start, p.theta_target, p.images, p.syn_lr, p.plans, labels=p.labels)
        synchronize(device)
        choose_s = time.perf_counter() - started
    except Exception as err:
        return {"status": "error", "error": first_line(err)}
    finally:
        release(device)
    chosen = cells[choice.mode]
    return {"status": chosen["status"], "chose": choice.mode, "reason": choice.reason, "choose_s": choose_s,
            "timed_while_choosing": choice.seconds, "full_graph_mib": choice.full_graph_bytes / MiB,
            "seconds": chosen.get("seconds"), "peak_mib": chosen.get("peak_mib"),
            "note": "s/it and memory of the chosen mode: auto measures once per run, then runs that mode"}


def run_unroll(config: UnrollConfig, device: torch.device, out: Path, record: Callable[[dict], None]) -> None:
    results: dict[str, Any] = {"cases": [], "segments": f"segments={config.segments}"}
    for dataset, ipc in config.cases:
        case = unroll_case(dataset, ipc, config, device)
        student = Student(case.problem.net)
        row: dict[str, Any] = {"case": case.name, "description": case.describe(), "cells": {}}
        results["cases"].append(row)
        outputs, runs, started = {}, {}, time.perf_counter()
        for name, make_run in unroll_cells(case, config, student, device):
            if (spent := time.perf_counter() - started) > config.case_budget_s:
                row["cells"][name] = {"status": "skipped", "error": f"case budget spent ({spent:.0f} s of "
                                                                    f"{config.case_budget_s:.0f} s)"}
                continue
            say(f"{case.name}: {name}")
            row["cells"][name], outputs[name] = measure(kept(make_run, runs, name), device, config.repeats,
                                                        config.cell_budget_s)
            if name == "checkpointed":  # auto chooses between the two exact modes, both measured by now
                row["cells"]["auto"] = auto_cell(case, student, device, row["cells"])
            record(results)
        say(f"{case.name}: {' / '.join(INTERLEAVED)} in turns")
        row["interleaved_rounds"] = interleave(row["cells"], {n: runs[n] for n in INTERLEAVED if n in runs},
                                               config.rounds, device)
        if "chose" in row["cells"].get("auto", {}):  # auto runs the mode it chose: its time, as now measured
            row["cells"]["auto"]["seconds"] = row["cells"][row["cells"]["auto"]["chose"]].get("seconds")
        row["checks"] = gradient_checks(outputs)
        record(results)
        del case, student, outputs  # this case's tensors go before the next case's are made
        release(device)


# Ours vs the original: after each is measured alone, timed again in turns (reference, full, checkpointed,
# reference, ...), so that the GPU drifting during a case (clocks, allocator pools) hits each alike.
INTERLEAVED = ("reference", "full", "checkpointed", "cudnn-benchmark-full", "cudnn-benchmark-checkpointed")


def kept(make_run: Callable[[], Callable[[], Any]], runs: dict[str, Callable[[], Any]],
         name: str) -> Callable[[], Callable[[], Any]]:
    """make_run, keeping the run it builds in runs[name] (for `interleave`)."""
    def make() -> Callable[[], Any]:
        runs[name] = make_run()
        return runs[name]
    return make


def interleave(cells: dict[str, dict], runs: dict[str, Callable[[], Any]], rounds: int, device: torch.device) -> int:
    """`rounds` more timed runs of each measured cell, in turns; its seconds become the median of all its runs.
    Returns the rounds done (fewer if one ran out of memory)."""
    ok = {name: run for name, run in runs.items() if cells[name]["status"] == "ok"}
    done = 0
    try:
        for done in range(1, rounds + 1):
            for name, run in ok.items():
                cells[name]["runs"].append(seconds(run, device))
    except torch.OutOfMemoryError:
        done -= 1
    for name in ok:
        cells[name]["seconds"] = statistics.median(cells[name]["runs"])
    release(device)
    return done


def profile_run(run: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """One more run under torch.profiler: what the device did (kernels and their time) against the wall time, and
    the host's runtime calls (launches, copies, synchronisations). Two runs of the same arithmetic that take
    different times (eager `full` vs the original's loop on the H200) differ in one of these."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    try:
        with torch.profiler.profile(activities=activities) as prof:
            started = time.perf_counter()
            run()
            synchronize(device)
            wall = time.perf_counter() - started  # before the profiler's own teardown
        events = prof.key_averages()
    except Exception as err:  # a profile that cannot be taken must not cost the case its timings
        release(device)
        return {"error": first_line(err)}
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.self_device_time_total, reverse=True)
    return {"wall_s": wall, "aten_ops": sum(e.count for e in events if e.key.startswith("aten::")),
            "kernels": sum(e.count for e in kernels), "kernel_s": sum(e.self_device_time_total for e in kernels) / 1e6,
            "runtime_calls": {e.key: e.count for e in events if e.key.startswith("cuda")},
            "top_kernels": [[e.key[:100], e.count, e.self_device_time_total / 1e6] for e in kernels[:5]]}


def describe_profile(name: str, profile: dict[str, Any]) -> str:
    if "error" in profile:
        return f"  - profile of {name}: {profile['error']}"
    line = f"  - profile of {name}: {profile['wall_s']:.3f} s wall, {profile['aten_ops']} aten ops"
    if not profile["kernels"]:  # the CPU
        return line
    calls = profile["runtime_calls"]
    syncs = sum(n for call, n in calls.items() if "Synchronize" in call)
    copies = sum(n for call, n in calls.items() if "Memcpy" in call)
    return (f"{line}, {profile['kernels']} kernels busy {profile['kernel_s']:.3f} s, {syncs} synchronisations, "
            f"{copies} copies")


def gradient_checks(outputs: dict[str, Any]) -> dict[str, Any]:
    """Reference vs ours (same computation, float32)."""
    checks = {}
    if outputs.get("reference") is not None and outputs.get("full") is not None:
        checks["reference_vs_full_rel_err"] = {name: relative_error(a, b) for name, a, b in
                                               zip(("images", "syn_lr"), outputs["full"], outputs["reference"])}
    return checks


# ----------------------------------------------------------------------------- parts: compile-c10, compile-c100

@dataclass
class CompileConfig:
    cases: tuple[tuple[str, int], ...]
    modes: tuple[str, ...] = ("checkpointed", "full")  # each compiled: the walk's steps, or full's graph steps
    dsa: str = DEFAULT_STRATEGY  # every op: the compiled step is one variant for all (DSA stays outside it)
    backend: str = "inductor"    # smoke: "eager" (dynamo traces, generates nothing: seconds instead of minutes);
                                 # CUDA_GRAPHS: "cudagraphs", dynamo's own (on the CPU it skips the graphs)
    budget_s: float = 180.0      # no new case once this is spent (a case costs a compile per mode: ~75 s each on
                                 # an H200 for the walk, on 2026-12-04; compiled full not yet measured)
    unroll: UnrollConfig = field(default_factory=lambda: UnrollConfig(cases=(), cell_budget_s=10.0))

    def smoke(self) -> CompileConfig:
        return replace(self, backend="cudagraphs" if self.backend == CUDA_GRAPHS else "eager", budget_s=600.0,
                       unroll=self.unroll.smoke())


def run_compile(config: CompileConfig, device: torch.device, out: Path, record: Callable[[dict], None]) -> None:
    """Per case, mtt's unroll with compiler=backend (its steps torch.compile'd) in each of config.modes against the
    original's loop and eager `full`, in one process: s/iteration, peak memory, what compiling costs, gradient
    agreement."""
    results: dict[str, Any] = {"dsa": config.dsa, "backend": config.backend, "cases": []}
    part_started = time.perf_counter()
    for dataset, ipc in config.cases:
        if (spent := time.perf_counter() - part_started) > config.budget_s:
            results["cases"].append({"case": f"{dataset} IPC {ipc}", "status": "skipped",
                                     "error": f"part budget spent ({spent:.0f} s of {config.budget_s:.0f} s)"})
            record(results)
            continue
        results["cases"].append(compile_case(dataset, ipc, config, device, record, results))
        record(results)
        release(device)


def compile_case(dataset: str, ipc: int, config: CompileConfig, device: torch.device,
                 record: Callable[[dict], None], results: dict) -> dict[str, Any]:
    case = unroll_case(dataset, ipc, config.unroll, device)
    p = case.problem
    p.plans = plan_steps(len(p.images), case.steps, case.batch_syn, case.shape, config.dsa,
                         torch.Generator().manual_seed(0), device)
    student = Student(p.net)
    row: dict[str, Any] = {"case": case.name, "description": case.describe(), "status": "ok",
                           "ops": sorted({plan.augment.op for plan in p.plans}), "cells": {}, "compile_s": {}}
    skips_before = counters["inductor"]["cudagraph_skips"]  # compiles that run without CUDA graphs, and why: logged

    def compiled(mode: str) -> Callable[[], Callable[[], tuple[Tensor, Tensor]]]:
        def run() -> tuple[Tensor, Tensor]:
            result = unroll(student, p.theta_start, p.theta_target, p.images, p.syn_lr, p.plans, labels=p.labels,
                            mode=mode, compiler=config.backend)
            return result.grad_images, result.grad_lr

        def make() -> Callable[[], tuple[Tensor, Tensor]]:
            started = time.perf_counter()
            run()  # compiles: timed apart, so that `measure` sizes its repeats by the steady state
            synchronize(device)
            row["compile_s"][f"compiled-{mode}"] = time.perf_counter() - started
            return run
        return make

    cells = {"reference": reference_cell(p), "full": eager_cell(student, p, "full")}
    cells |= {f"compiled-{mode}": compiled(mode) for mode in config.modes}
    outputs, runs = {}, {}
    for name, make_run in cells.items():
        if name == "compiled-full" and row["cells"]["full"]["status"] != "ok":  # a compile spent on nothing
            row["cells"][name] = {"status": "skipped", "error": f"eager full: {row['cells']['full']['status']}"}
            continue
        say(f"{case.name}: {name}")
        row["cells"][name], outputs[name] = measure(kept(make_run, runs, name), device, config.unroll.repeats,
                                                    config.unroll.cell_budget_s)
        record(results | {"cases": results["cases"] + [row]})
    row["interleaved_rounds"] = interleave(row["cells"], runs, config.unroll.rounds, device)
    row["auto"] = auto_with_compile(case, student, config.backend, device)
    record(results | {"cases": results["cases"] + [row]})
    row["profiles"] = {name: profile_run(run, device) for name, run in runs.items()
                       if row["cells"][name]["status"] == "ok"}
    row["checks"] = {f"{ours}_vs_{name}": {"rel_err_images": relative_error(outputs[ours][0], outputs[name][0]),
                                           "cosine_images": cosine(outputs[ours][0], outputs[name][0]),
                                           "rel_err_syn_lr": relative_error(outputs[ours][1], outputs[name][1])}
                     for ours in cells if ours.startswith("compiled") and outputs.get(ours) is not None
                     for name in ("full", "reference") if outputs.get(name) is not None}
    row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips_before
    return row


def auto_with_compile(case: UnrollCase, student: Student, backend: Any, device: torch.device) -> dict[str, Any]:
    """What `--compile` runs under `auto` here: each mode timed compiled and eager, the fastest kept (the steps
    compiled above already, so this is the timing alone; one round, not a run's three: the cells above time the
    candidates better, this checks the mechanism on the device)."""
    p = case.problem
    release(device)
    try:
        started = time.perf_counter()
        choice = choose_backward(student, p.theta_start, p.theta_target, p.images, p.syn_lr, p.plans, labels=p.labels,
                                 repeats=1, compiler=backend)
        synchronize(device)
        return {"status": "ok", "chose": backward_name(choice.mode, choice.compiled),
                "kept_graphs": choice.kept_graphs, "reason": choice.reason, "seconds": choice.seconds,
                "choose_s": time.perf_counter() - started}
    except Exception as err:
        return {"status": "error", "error": first_line(err)}
    finally:
        release(device)


# ----------------------------------------------------------------------------- part: experts

@dataclass
class ExpertsBenchConfig:
    data: DataChoice = field(default_factory=DataChoice)
    parallels: tuple[int, ...] = (1, 10, 50)
    epochs: int = 1         # timed: `epochs` full epochs of P experts (and their test passes), per P
    paper_epochs: int = 50  # experts per hour are counted for the paper's 50-epoch experts
    width: int = 128
    budget_s: float = 80.0  # a P whose estimate (estimate_seconds) overruns what is left is skipped

    def smoke(self) -> ExpertsBenchConfig:
        return replace(self, data=self.data.smoke(), parallels=(1, 2), width=16, budget_s=600.0)


def run_experts(config: ExpertsBenchConfig, device: torch.device, out: Path, record: Callable[[dict], None]) -> None:
    dataset, note = config.data.load()
    results: dict[str, Any] = {"dataset": dataset.name, "train_images": len(dataset.train_images),
                               "test_images": len(dataset.test_images), "note": note, "rows": []}
    part_started = time.perf_counter()
    for parallel in config.parallels:
        say(f"experts: P={parallel}")
        expert_config = ExpertConfig(num_experts=parallel, epochs=config.epochs, parallel=parallel, width=config.width)
        row: dict[str, Any] = {"parallel": parallel, "experts": parallel, "epochs": config.epochs}
        release(device)
        try:
            # Also the warm-up (allocator, kernel choice) of the timed run below.
            row["estimate_s"] = estimate_seconds(dataset, expert_config, device, probe_batches=3)
            left = config.budget_s - (time.perf_counter() - part_started)
            if row["estimate_s"] > left:
                row |= {"status": "skipped", "error": f"estimated {row['estimate_s']:.0f} s, {max(left, 0):.0f} s "
                                                      f"of the part's {config.budget_s:.0f} s left"}
            else:
                row |= time_experts(dataset, expert_config, config.paper_epochs, device)
        except torch.OutOfMemoryError as err:
            row |= {"status": "OOM", "error": first_line(err)}
        results["rows"].append(row)
        record(results)
        release(device)


def time_experts(dataset: Dataset, config: ExpertConfig, paper_epochs: int, device: torch.device) -> dict[str, Any]:
    """One group of `config.parallel` experts trained and tested for `config.epochs` epochs, timed."""
    synchronize(device)
    started = time.perf_counter()
    _, accuracy = train_group(dataset, config, list(range(config.parallel)), device)
    synchronize(device)
    seconds = time.perf_counter() - started
    per_expert_epoch = seconds / (config.parallel * config.epochs)
    return {"status": "ok", "seconds": seconds, "s_per_expert_epoch": per_expert_epoch,
            "paper_experts_per_hour": 3600 / (paper_epochs * per_expert_epoch),
            "test_acc": 100 * accuracy[:, -1].mean().item()}


# ----------------------------------------------------------------------------- part: fmnist-experts

@dataclass
class FmnistExpertsConfig:
    data: DataChoice = field(default_factory=DataChoice)
    num_experts: int = 10
    # The presets need max_start_epoch + expert_epochs <= epochs: IPC 1 is 2 + 2; IPC 10's 20 + 2 would cost
    # twice the device time, so fmnist-ipc10 starts at most at epoch 10 (its report says so).
    epochs: int = 12
    parallel: int = 2         # one shard per group of 2: the first group (which always runs) stays short
    budget_s: float = 100.0   # no new group once the last group's time would overrun this
    width: int = 128

    def smoke(self) -> FmnistExpertsConfig:
        return replace(self, data=self.data.smoke(), num_experts=2, epochs=4, parallel=2, budget_s=60.0, width=16)


def run_fmnist_experts(config: FmnistExpertsConfig, device: torch.device, out: Path,
                       record: Callable[[dict], None]) -> None:
    dataset, note = config.data.load()
    folder = experts_folder(out, dataset)
    expert_config = ExpertConfig(num_experts=config.num_experts, epochs=config.epochs, parallel=config.parallel,
                                 width=config.width)
    results: dict[str, Any] = {"dataset": dataset.name, "folder": str(folder), "note": note, "groups": [],
                               "found": len(finished_experts(folder))}
    started, last, count = time.perf_counter(), None, results["found"]
    while count < config.num_experts:
        if last is not None and time.perf_counter() - started + last > config.budget_s:
            results["stopped"] = (f"time budget ({config.budget_s:.0f} s): another group would take ~{last:.0f} s; "
                                  f"run this part again to train more (it resumes)")
            break
        count = min(config.num_experts, count + config.parallel)
        say(f"fmnist-experts: training up to {count} experts x {config.epochs} epochs")
        group_started = time.perf_counter()
        train_experts(dataset, replace(expert_config, num_experts=count), folder, device, progress=False)
        last = time.perf_counter() - group_started
        results["groups"].append({"experts": count, "seconds": last})
        record(results)
    buffers = ExpertBuffers.open(folder)
    accuracy = [100 * float(buffers.test_acc(i)[-1]) for i in range(len(buffers))]
    results |= {"experts": len(buffers), "epochs": buffers.meta.epochs, "final_test_acc": accuracy}
    record(results)


# ----------------------------------------------------------------------------- parts: fmnist-ipc1, fmnist-ipc10

@dataclass
class FmnistDistillConfig:
    ipc: int
    data: DataChoice = field(default_factory=DataChoice)
    max_iterations: int = 2000   # the paper runs 5000; the time budget usually stops us first
    probe_iterations: int = 10   # run first, to measure s/iteration and size the rest to the budget
    budget_s: float = 60.0       # distillation's share of the part (evaluation comes after)
    eval_repeats: int = 5
    eval_epochs: int = 1000
    overrides: dict[str, Any] = field(default_factory=dict)  # preset fields changed (recorded in the report)

    def smoke(self) -> FmnistDistillConfig:
        return replace(self, data=self.data.smoke(), max_iterations=4, probe_iterations=2, budget_s=20.0,
                       eval_repeats=2, eval_epochs=20, overrides={"syn_steps": 5})


def distill_config(config: FmnistDistillConfig, dataset: Dataset, buffers: ExpertBuffers,
                   device: torch.device) -> tuple[DistillConfig, dict[str, str]]:
    """The preset at the experts' network, with the changes it needed, each said why."""
    changes = {k: f"{getattr(preset(dataset.name, config.ipc), k)} -> {v} (suite config)"
               for k, v in config.overrides.items()}
    settings = preset(dataset.name, config.ipc, eval_repeats=0, device=str(device), **config.overrides)
    settings = network_from_buffers(settings, buffers)
    longest = buffers.meta.epochs - settings.expert_epochs
    if settings.max_start_epoch > longest:
        changes["max_start_epoch"] = (f"{settings.max_start_epoch} -> {longest} (the experts have "
                                      f"{buffers.meta.epochs} epochs)")
        settings = replace(settings, max_start_epoch=longest)
    return settings, changes


def run_fmnist_distill(config: FmnistDistillConfig, device: torch.device, out: Path,
                       record: Callable[[dict], None]) -> None:
    dataset, note = config.data.load()
    folder = experts_folder(out, dataset)
    if not finished_experts(folder):
        raise FileNotFoundError(f"no experts in {folder}: run --part fmnist-experts first with the same --out "
                                f"(on the GPU machine in the same command: {DEVICE_OUT} is not carried)")
    buffers = ExpertBuffers.open(folder)
    settings, changes = distill_config(config, dataset, buffers, device)
    run_dir = out / f"distill_{dataset.name}_ipc{config.ipc}"
    results: dict[str, Any] = {"dataset": dataset.name, "ipc": config.ipc, "note": note, "run": str(run_dir),
                               "experts": len(buffers), "expert_epochs_trained": buffers.meta.epochs,
                               "preset": asdict(settings), "changes": changes}
    say(f"{dataset.name} IPC {config.ipc}: distilling ({config.probe_iterations} iterations to time it)")
    started = time.perf_counter()
    resume = (run_dir / CHECKPOINT).exists()
    distill(replace(settings, iterations=config.probe_iterations), dataset, buffers, run_dir, resume=resume,
            progress=False)
    history = json.loads((run_dir / "history.json").read_text())
    per_iteration = statistics.median(history["seconds"][1:] or history["seconds"])  # the first also chose `auto`
    done = len(history["loss"])
    left = config.budget_s - (time.perf_counter() - started)
    iterations = max(done, min(config.max_iterations, done + int(left / per_iteration)))
    say(f"{dataset.name} IPC {config.ipc}: {per_iteration:.3f} s/iteration, going on to {iterations}")
    synthetic = distill(replace(settings, iterations=iterations), dataset, buffers, run_dir, resume=True,
                        progress=False)
    history = json.loads((run_dir / "history.json").read_text())
    results |= {"iterations": len(history["loss"]), "s_per_iteration": per_iteration,
                "distill_s": time.perf_counter() - started, "backward": history.get("backward"),
                "loss_first10": statistics.mean(history["loss"][:10]),
                "loss_last10": statistics.mean(history["loss"][-10:]), "syn_lr": synthetic.syn_lr}
    record(results)

    eval_config = EvalConfig(model=settings.model, epochs=config.eval_epochs, repeats=config.eval_repeats,
                             width=settings.width, depth=settings.depth, progress=False)
    say(f"{dataset.name} IPC {config.ipc}: evaluating the distilled set ({config.eval_repeats} networks)")
    started = time.perf_counter()
    results["distilled"] = evaluate(synthetic.images, synthetic.labels, dataset.test_images, dataset.test_labels,
                                    replace(eval_config, lr=synthetic.syn_lr), device).to_dict()
    results["distilled"]["seconds"] = time.perf_counter() - started
    record(results)
    say(f"{dataset.name} IPC {config.ipc}: evaluating random real images")
    started = time.perf_counter()
    results["random_real"] = evaluate_baseline(dataset, config.ipc, "random", [settings.model], eval_config,
                                               device)[settings.model].to_dict()
    results["random_real"]["seconds"] = time.perf_counter() - started
    results["published"] = {m: acc for (m, d, i), acc in PUBLISHED.items() if d == dataset.name and i == config.ipc}
    record(results)


# ----------------------------------------------------------------------------- part: cuda-tests

@dataclass
class CudaTestsConfig:
    width: int = 16
    size: int = 16
    ipc: int = 2
    steps: int = 8
    distill_iterations: int = 6
    # Of the largest entry. float64 round-off stays near 1e-12; 1e-9 still catches a float32 step hiding inside.
    float64_tol: float = 1e-9
    float32_tol: float = 5e-3  # loose: cuDNN convolutions run in TF32 by default
    experts_tol: float = 1e-3  # P=2 vs P=1 after one epoch, of the largest parameter

    def smoke(self) -> CudaTestsConfig:
        return replace(self, size=8, steps=4, distill_iterations=4)


@dataclass
class CheckContext:
    """What the checks share: the device, a scratch folder, and (trained once, on first use) two experts."""

    config: CudaTestsConfig
    device: torch.device
    work: Path

    @cached_property
    def digits(self) -> Dataset:
        return load_dataset("digits")

    @cached_property
    def experts(self) -> ExpertBuffers:
        folder = self.work / "experts"
        train_experts(self.digits, ExpertConfig(num_experts=2, epochs=4, width=self.config.width, parallel=2), folder,
                      self.device, progress=False)
        return ExpertBuffers.open(folder)

    def problem(self, dtype: torch.dtype) -> Any:
        ref, c = reference(), self.config
        return ref.make_problem(ref.Config("check", 3, c.size, c.width, c.ipc, c.steps), self.device, dtype)

    def distill_config(self, **overrides: Any) -> DistillConfig:
        settings = dict(dataset="digits", ipc=1, width=self.config.width, syn_steps=5, expert_epochs=2,
                        max_start_epoch=2, lr_img=10, lr_lr=1e-5, iterations=self.config.distill_iterations,
                        eval_repeats=0, checkpoint_every=3, snapshot_every=2, device=str(self.device), seed=3)
        return DistillConfig(**(settings | overrides))


Check = Callable[[CheckContext], tuple[bool | None, str]]  # passed (None: not run here), message


def _modes_agree(ctx: CheckContext, dtype: torch.dtype, tol: float) -> tuple[bool, str]:
    ref, p = reference(), ctx.problem(dtype)
    student = Student(p.net)
    full, checkpointed = (ref.our_gradients(student, p, mode) for mode in EXACT_MODES)
    errors = {name: relative_error(a, b) for name, a, b in zip(("images", "syn_lr"), checkpointed, full)}
    tf32 = f"; cuDNN TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'}" if ctx.device.type == "cuda" else ""
    return all(e <= tol for e in errors.values()), (
        f"max |checkpointed - full| / max |full|: images {errors['images']:.1e}, syn_lr {errors['syn_lr']:.1e} "
        f"(tolerance {tol:g}{tf32})")


def check_modes_agree_float64(ctx: CheckContext) -> tuple[bool, str]:
    return _modes_agree(ctx, torch.float64, ctx.config.float64_tol)


def check_modes_agree_float32(ctx: CheckContext) -> tuple[bool, str]:
    return _modes_agree(ctx, torch.float32, ctx.config.float32_tol)


def check_reference_equals_full_float64(ctx: CheckContext) -> tuple[bool, str]:
    ref, p = reference(), ctx.problem(torch.float64)
    theirs = ref.reference_gradients(ref.ReparamModule(copy.deepcopy(p.net)), p)
    ours = ref.our_gradients(Student(p.net), p, "full")
    errors = {name: relative_error(a, b) for name, a, b in zip(("images", "syn_lr"), ours, theirs)}
    tol = ctx.config.float64_tol
    return all(e <= tol for e in errors.values()), (
        f"max |ours - original loop| / max |original loop|: images {errors['images']:.1e}, "
        f"syn_lr {errors['syn_lr']:.1e} (tolerance {tol:g})")


def check_segments_modes_agree_float64(ctx: CheckContext) -> tuple[bool, str]:
    p, k = ctx.problem(torch.float64), 3
    plans = plan_steps(len(p.images), ctx.config.steps, 3, tuple(p.images.shape[1:]), DEFAULT_STRATEGY,
                       torch.Generator().manual_seed(2), ctx.device, segments=k)
    starts = p.theta_start + 0.01 * torch.randn(k, p.theta_start.numel(), dtype=p.theta_start.dtype, device=ctx.device)
    targets = starts + 0.01 * torch.randn_like(starts)
    student = Student(p.net)
    full, checkpointed = (unroll(student, starts, targets, p.images, p.syn_lr, plans, labels=p.labels, mode=m)
                          for m in EXACT_MODES)
    errors = {"images": relative_error(checkpointed.grad_images, full.grad_images),
              "syn_lr": relative_error(checkpointed.grad_lr, full.grad_lr)}
    tol = ctx.config.float64_tol
    return all(e <= tol for e in errors.values()), (
        f"{k} segments, batch 3: max |checkpointed - full| / max |full|: images {errors['images']:.1e}, "
        f"syn_lr {errors['syn_lr']:.1e} (tolerance {tol:g})")


def check_kept_graphs_agree_float64(ctx: CheckContext) -> tuple[bool, str]:
    ref, p = reference(), ctx.problem(torch.float64)
    student, kept = Student(p.net), ctx.config.steps // 2
    full = ref.our_gradients(student, p, "full")
    result = unroll(student, p.theta_start, p.theta_target, p.images, p.syn_lr, p.plans, labels=p.labels,
                    mode="checkpointed", kept_graphs=kept)
    errors = {"images": relative_error(result.grad_images, full[0]), "syn_lr": relative_error(result.grad_lr, full[1])}
    tol = ctx.config.float64_tol
    return all(e <= tol for e in errors.values()), (
        f"checkpointed keeping the last {kept} of {ctx.config.steps} steps' graphs: max |this - full| / max |full|: "
        f"images {errors['images']:.1e}, syn_lr {errors['syn_lr']:.1e} (tolerance {tol:g})")


def check_cuda_graphs_equal_eager_float64(ctx: CheckContext) -> tuple[bool, str]:
    """The steps replayed as CUDA graphs give eager's gradients in both modes. Dynamo's "cudagraphs" backend replays
    the traced ops unfused, so it compiles in seconds; the third unroll only replays what the first two recorded."""
    ref, p = reference(), ctx.problem(torch.float64)
    student, tol = Student(p.net), ctx.config.float64_tol
    skips_before = counters["inductor"]["cudagraph_skips"]
    errors = {}
    for mode in EXACT_MODES:
        eager = ref.our_gradients(student, p, mode)
        for _ in range(3):  # warm-up, recording, replay
            result = unroll(student, p.theta_start, p.theta_target, p.images, p.syn_lr, p.plans, labels=p.labels,
                            mode=mode, compiler="cudagraphs")
        errors[mode] = max(relative_error(result.grad_images, eager[0]), relative_error(result.grad_lr, eager[1]))
    skipped = counters["inductor"]["cudagraph_skips"] - skips_before
    replayed = ctx.device.type != "cuda" or skipped == 0
    return all(e <= tol for e in errors.values()) and replayed, (
        "max |replayed - eager| / max |eager| (images, syn_lr): " + ", ".join(f"{m} {e:.1e}" for m, e in errors.items())
        + f" (tolerance {tol:g}); compiled steps that ran without CUDA graphs: {skipped}"
        + (" (none on the CPU: this ran the rest of the path)" if ctx.device.type != "cuda" else ""))


def check_choose_backward(ctx: CheckContext) -> tuple[bool, str]:
    p = ctx.problem(torch.float32)
    student = Student(p.net)
    args = (student, p.theta_start, p.theta_target, p.images, p.syn_lr, p.plans)
    choice = choose_backward(*args, labels=p.labels)
    starved = choose_backward(*args, labels=p.labels, free_bytes=1)
    share = memory_share(ctx.device)
    part = choose_backward(*args, labels=p.labels, free_bytes=choice.full_graph_bytes)  # `share` of full's graph fits
    timed = ", ".join(f"{m} {s * 1e3:.1f} ms" for m, s in choice.seconds.items())
    # Blocks freed into PyTorch's cache count as free: allocating and freeing 256 MiB leaves free_memory as it was.
    before = free_memory(ctx.device)
    del_me = torch.empty(2**28, dtype=torch.uint8, device=ctx.device)
    del del_me
    cached_drift = abs(free_memory(ctx.device) - before)
    passed = (choice.mode in EXACT_MODES and set(choice.seconds) == set(EXACT_MODES) and bool(choice.free_bytes)
              and starved.mode == "checkpointed" and not starved.seconds and starved.kept_graphs == 0
              and part.mode == "checkpointed" and part.kept_graphs == int(share * len(p.plans))
              and (cached_drift < 2**20 or ctx.device.type != "cuda"))
    return passed, (f"chose {choice.mode} ({choice.reason}; {timed}; {(choice.free_bytes or 0) / 2**30:.1f} GiB free); "
                    f"with 1 byte free: {starved.mode} ({starved.reason}); with full's graph free: {part.mode} "
                    f"keeping {part.kept_graphs} steps' graphs ({share:.0%} of {len(p.plans)}); free memory moved "
                    f"{cached_drift / 2**20:.1f} MiB after 256 MiB went into the allocator's cache")


def check_distill_auto(ctx: CheckContext) -> tuple[bool, str]:
    out = ctx.work / "distill-auto"
    config = ctx.distill_config(backward="auto")
    synthetic = distill(config, ctx.digits, ctx.experts, out, progress=False)
    history = json.loads((out / "history.json").read_text())
    chosen = history.get("backward", {}).get("mode")
    moved = not torch.equal(load_snapshots(out)[0][1], synthetic.images)
    passed = (len(history["loss"]) == config.iterations and all(math.isfinite(x) for x in history["loss"])
              and bool(torch.isfinite(synthetic.images).all()) and chosen in EXACT_MODES and moved
              and (out / FINAL_SYNTHETIC).is_file())
    return passed, (f"{len(history['loss'])} iterations, loss {history['loss'][0]:.4f} -> {history['loss'][-1]:.4f}, "
                    f"auto chose {chosen}, images moved: {moved}, syn_lr {synthetic.syn_lr:.4g}")


def check_auto_survives_out_of_memory(ctx: CheckContext) -> tuple[bool | None, str]:
    """A real out-of-memory error in the middle of a run: `auto` runs `full` (forced, so that the check does not
    depend on what it would choose), then the caching allocator is capped at half of what iteration 0 took on
    top of the run's tensors; iteration 1 must run out in `full` and the run go on with `checkpointed` (keeping the
    graphs of half of the steps, since the driver's free memory is blind to the cap, and none should those run
    out too)."""
    if ctx.device.type != "cuda":
        return None, "not run: the memory cap (torch.cuda.set_per_process_memory_fraction) is CUDA's"
    device, out = ctx.device, ctx.work / "distill-oom"
    config = ctx.distill_config(backward="auto", ipc=50, syn_steps=40, iterations=4)  # full's graph: ~40 steps' worth
    total = torch.cuda.get_device_properties(device).total_memory
    caps = []

    def cap_after_the_first_iteration(info: IterationInfo) -> None:
        if info.iteration == 1:
            took = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
            torch.cuda.empty_cache()
            caps.append(torch.cuda.memory_allocated(device) + took // 2)
            torch.cuda.set_per_process_memory_fraction(caps[-1] / total, device)

    forced = BackwardChoice("full", reason="forced by the check")
    experts = ctx.experts  # trained (on first use) before the peak is reset: the peak is the run's
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with unittest.mock.patch("mtt.distill.choose_backward", lambda *args, **kwargs: forced):
            distill(config, ctx.digits, experts, out, callbacks=[cap_after_the_first_iteration], progress=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    history = json.loads((out / "history.json").read_text())
    chosen = history.get("backward", {})
    passed = (len(history["loss"]) == config.iterations and chosen.get("mode") == "checkpointed"
              and re.match(r"full(, then checkpointed keeping \d+ steps' graphs)? ran out of memory at iteration 1",
                           chosen.get("reason", "")) is not None)
    return passed, (f"capped at {caps[0] / 2**20:.0f} MiB after iteration 0; {len(history['loss'])} of "
                    f"{config.iterations} iterations; backward then: {chosen.get('mode')} ({chosen.get('reason')})")


def check_experts_survive_out_of_memory(ctx: CheckContext) -> tuple[bool | None, str]:
    """8 experts at once under a memory cap that holds about 2.5 of them (2.5x what one epoch of one expert took on
    top of what is allocated): training must warn, go on with fewer at once (8, then 4, then 2) and finish all 8,
    where a real out-of-memory error in a vmapped group used to end the command with a traceback. Batches of 1024
    images, so that an expert's activations outweigh what does not grow with the experts (cuDNN's workspace)."""
    if ctx.device.type != "cuda":
        return None, "not run: the memory cap (torch.cuda.set_per_process_memory_fraction) is CUDA's"
    device, config = ctx.device, ExpertConfig(num_experts=8, epochs=1, width=128, batch_size=1024, parallel=8)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    train_group(ctx.digits, replace(config, parallel=1), [0], device)
    one = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
    torch.cuda.empty_cache()
    cap = torch.cuda.memory_allocated(device) + 5 * one // 2
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(device).total_memory, device)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = train_experts(ctx.digits, config, ctx.work / "experts-oom", device, progress=False)
    except ValueError as err:
        return False, f"one expert x 1 epoch took {one / 2**20:.0f} MiB, cap {cap / 2**20:.0f} MiB: {first_line(err)}"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    said = [str(w.message).split(" (")[0] for w in caught if issubclass(w.category, RankWarning)]  # the halvings
    passed = summary["trained"] == 8 and bool(said)
    return passed, (f"one expert x 1 epoch took {one / 2**20:.0f} MiB, cap {cap / 2**20:.0f} MiB: trained "
                    f"{summary['trained']} of 8; {'; '.join(said) or 'no warning (nothing ran out)'}")


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[list[warnings.WarningMessage]]:
    """torch.use_deterministic_algorithms(warn_only) inside; yields the warnings of ops that have no such kernel."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


# With all six DSA ops, two straight runs differed by 4.8e-07 on an H200 (torch 2.11, deterministic
# algorithms on, no warning caught). The likely source: scale and rotate sample with grid_sample, whose
# backward adds into the images' gradient with atomics on CUDA. Without them a run should repeat exactly.
DETERMINISTIC_DSA = "color_crop_cutout_flip"


def check_resume_bit_identical(ctx: CheckContext) -> tuple[bool, str]:
    # One mode: runs compared must not choose apart.
    config = ctx.distill_config(backward="checkpointed", dsa=DETERMINISTIC_DSA)
    half = replace(config, iterations=config.iterations // 2)
    every_op = replace(config, dsa=DEFAULT_STRATEGY)
    with deterministic_algorithms() as caught:
        straight = distill(config, ctx.digits, ctx.experts, ctx.work / "straight", progress=False)
        again = distill(config, ctx.digits, ctx.experts, ctx.work / "again", progress=False)
        distill(half, ctx.digits, ctx.experts, ctx.work / "split", progress=False)
        resumed = distill(config, ctx.digits, ctx.experts, ctx.work / "split", resume=True, progress=False)
        # Not checked, said: whether the GPU repeats a run with scale and rotate (DETERMINISTIC_DSA's reason).
        runs_every_op = [distill(every_op, ctx.digits, ctx.experts, ctx.work / f"every_op{k}", progress=False)
                         for k in (0, 1)]
    same = torch.equal(straight.images, resumed.images) and straight.syn_lr == resumed.syn_lr
    noise = (straight.images - again.images).abs().max().item()
    noise_every_op = (runs_every_op[0].images - runs_every_op[1].images).abs().max().item()
    nondeterministic = sorted({str(w.message).split(".")[0][:120] for w in caught})
    return same, (f"{'bit-identical' if same else 'differs'} after {half.iterations} + resume to {config.iterations} "
                  f"iterations (max |diff| {(straight.images - resumed.images).abs().max().item():.1e}; two straight "
                  f"runs differ by {noise:.1e}); deterministic algorithms on, DSA {DETERMINISTIC_DSA}; with every "
                  f"DSA op two straight runs differ by {noise_every_op:.1e}"
                  + (f"; ops without a deterministic kernel: {nondeterministic}" if nondeterministic else ""))


def check_experts_vectorised_equal_sequential(ctx: CheckContext) -> tuple[bool, str]:
    config = ExpertConfig(num_experts=2, epochs=1, width=ctx.config.width, parallel=1)
    alone = torch.cat([train_group(ctx.digits, config, [k], ctx.device)[0] for k in (0, 1)])
    together, _ = train_group(ctx.digits, replace(config, parallel=2), [0, 1], ctx.device)
    error = relative_error(together, alone)
    return error <= ctx.config.experts_tol, (f"2 experts x 1 epoch, P=2 vs P=1: max |diff| / max |param| {error:.1e} "
                                             f"(tolerance {ctx.config.experts_tol:g})")


def check_steps_queue_their_copies(ctx: CheckContext) -> tuple[bool | None, str]:
    """An epoch of experts (one, and two vectorised), the evaluation's augmentation and an iteration's step plans
    copy what they draw on the CPU to the GPU without synchronising, so the host can queue the next step while the
    GPU runs this one. Under torch.cuda.set_sync_debug_mode("error") a synchronising call raises."""
    if ctx.device.type != "cuda":
        return None, "not run: needs CUDA"
    config = ExpertConfig(num_experts=2, epochs=1, width=ctx.config.width)
    images, labels = ctx.digits.train_images.to(ctx.device), ctx.digits.train_labels.to(ctx.device)
    groups = [start_group(ctx.digits, replace(config, parallel=len(ids)), ids, ctx.device) for ids in ([0], [0, 1])]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for trainer, gens in groups:
            train_epoch(trainer, gens, images, labels, config)
        DSA()(images[:50], torch.Generator().manual_seed(0))
        plan_steps(len(images), 20, 100, tuple(images.shape[1:]), DEFAULT_STRATEGY, torch.Generator(), ctx.device)
    except RuntimeError as err:
        where = next((f"{frame.filename}:{frame.lineno}" for frame in reversed(traceback.extract_tb(err.__traceback__))
                      if "/mtt/" in frame.filename), "?")
        return False, f"synchronised at {where}: {first_line(err)}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return True, "expert epochs (P=1, P=2), DSA and step plans: no synchronising call"


CHECKS: tuple[Check, ...] = (
    check_modes_agree_float64, check_modes_agree_float32, check_reference_equals_full_float64,
    check_segments_modes_agree_float64, check_kept_graphs_agree_float64, check_choose_backward, check_distill_auto,
    check_auto_survives_out_of_memory, check_resume_bit_identical, check_experts_vectorised_equal_sequential,
    check_experts_survive_out_of_memory, check_cuda_graphs_equal_eager_float64, check_steps_queue_their_copies)


def run_cuda_tests(config: CudaTestsConfig, device: torch.device, out: Path, record: Callable[[dict], None]) -> None:
    results: dict[str, Any] = {"ran_on": str(device), "checks": []}
    if device.type != "cuda":
        results["note"] = f"no CUDA here: the checks ran on {device}"
    with tempfile.TemporaryDirectory() as work:
        ctx = CheckContext(config, device, Path(work))
        for check in CHECKS:
            name = check.__name__.removeprefix("check_")
            say(f"cuda-tests: {name}")
            started = time.perf_counter()
            try:
                passed, message = check(ctx)
            except Exception as err:
                passed, message = False, f"raised {first_line(err)}"
            results["checks"].append({"name": name, "passed": passed, "message": message,
                                      "seconds": time.perf_counter() - started})
            record(results)
            release(device)
    failed = [c["name"] for c in results["checks"] if c["passed"] is False]
    if failed:
        raise AssertionError(f"{len(failed)} of {len(CHECKS)} checks failed: {', '.join(failed)}")


# ----------------------------------------------------------------------------- parts, recording, report

@dataclass(frozen=True)
class Part:
    run: Callable[[Any, torch.device, Path, Callable[[dict], None]], None]
    config: Callable[[], Any]  # the full-size configuration; its .smoke() is the toy one
    estimate_s: int            # expected wall time on the device, a guess until measured (see the report)
    render: Callable[[dict], list[str]]


def _cell(text: str) -> str:
    """Free text inside a markdown table cell: a bare | would start a new column."""
    return text.replace("|", "\\|")


def _num(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def unroll_note(name: str, cell: dict, cells: dict) -> str:
    if "chose" in cell:
        return f"chose **{cell['chose']}** ({cell['reason']}; choosing took {cell['choose_s']:.2f} s)"
    seconds = cell.get("seconds")
    if name.startswith("segments") and seconds:
        k = int(name.removeprefix("segments").split("-")[0])
        single = cells.get(name.split("-", 1)[1], {}).get("seconds")
        return f"{seconds / k:.4f} s per segment" + (
            f"; {k} single runs would take {k * single / seconds:.2f}x as long" if single else "")
    return cell.get("error") or cell.get("note", "")


def _turns(case: dict, names: tuple[str, ...]) -> str:
    rounds = case.get("interleaved_rounds")
    return f"; {', '.join(names)}: medians of their runs alone and {rounds} rounds in turns" if rounds else ""


def _timing_rows(case: dict, note: Callable[[str, dict], str]) -> list[str]:
    """A case's cells as rows of | case | method | s / iteration | peak MiB | reference / this | note |."""
    ref_s = case["cells"].get("reference", {}).get("seconds")
    rows = []
    for name, cell in case["cells"].items():
        seconds = cell.get("seconds")
        shown = _num(seconds, ".4f") if cell["status"] == "ok" else cell["status"]
        ratio = f"{ref_s / seconds:.2f}x" if ref_s and seconds else ""
        rows.append(f"| {case['case']} | {name} | {shown} | {_num(cell.get('peak_mib'), '.0f')} | {ratio} | "
                    f"{_cell(note(name, cell))} |")
    return rows


def render_unroll(results: dict) -> list[str]:
    lines = [f"segments: {results['segments']}.", "",
             "| case | method | s / iteration | peak MiB | reference / this | note |", "|---|---|---|---|---|---|"]
    for case in results["cases"]:
        lines += _timing_rows(case, lambda name, cell: unroll_note(name, cell, case["cells"]))
    lines.append("")
    for case in results["cases"]:
        lines.append(f"- {case['case']}: {case['description']}{_turns(case, INTERLEAVED)}")
        for name, check in case.get("checks", {}).items():
            lines.append(f"  - {name}: " + ", ".join(f"{k} {v:.6g}" for k, v in check.items()))
    return lines


def render_compile(results: dict) -> list[str]:
    lines = [f"DSA `{results['dsa']}`; torch.compile backend {results['backend']}; compiled-MODE is mtt's unroll "
             "in that mode with compiler set.", "",
             "| case | method | s / iteration | peak MiB | reference / this | note |", "|---|---|---|---|---|---|"]
    for case in results["cases"]:
        if case["status"] != "ok":
            lines.append(f"| {case['case']} | | {case['status']} | | | {_cell(case.get('error', ''))} |")
            continue
        lines += _timing_rows(case, lambda name, cell: (
            f"compiling and the first iteration: {case['compile_s'][name]:.1f} s"
            if name in case["compile_s"] else cell.get("error", "")))
    lines.append("")
    for case in results["cases"]:
        if case["status"] == "ok":
            lines.append(f"- {case['case']}: {case['description']}; DSA ops drawn: {', '.join(case['ops'])}"
                         f"{_turns(case, tuple(case['cells']))}")
            if results["backend"] in CUDA_GRAPH_BACKENDS:
                lines.append(f"  - compiled steps that ran without CUDA graphs: {case['cudagraph_skips']} "
                             "(0: every step was replayed; the reason is in the log)")
            lines += [f"  - {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in check.items())
                      for name, check in case.get("checks", {}).items()]
            if auto := case.get("auto"):
                lines.append(f"  - `auto` with --compile chose **{auto['chose']}** ({auto['reason']}; choosing took "
                             f"{auto['choose_s']:.1f} s): " + ", ".join(f"{name} {t * 1e3:.1f} ms"
                                                                          for name, t in auto["seconds"].items())
                             if auto["status"] == "ok" else f"  - `auto` with --compile: {auto['error']}")
            lines += [describe_profile(name, profile) for name, profile in case.get("profiles", {}).items()]
    return lines


def render_experts(results: dict) -> list[str]:
    lines = [f"{results['dataset']}, {results['train_images']} training / {results['test_images']} test images"
             + (f" ({results['note']})" if results.get("note") else "") + ".", "",
             "| P | experts x epochs timed | seconds | s per expert-epoch | 50-epoch experts / hour | vs P=1 | "
             "test acc % | estimate_seconds said |", "|---|---|---|---|---|---|---|---|"]
    base = next((r["s_per_expert_epoch"] for r in results["rows"] if r["parallel"] == 1 and r["status"] == "ok"), None)
    for r in results["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['parallel']} | {r['experts']} x {r['epochs']} | {r['status']}: {_cell(r['error'])} "
                         f"| | | | | {_num(r.get('estimate_s'), '.1f')} s |")
            continue
        speedup = f"{base / r['s_per_expert_epoch']:.2f}x" if base else ""
        lines.append(f"| {r['parallel']} | {r['experts']} x {r['epochs']} | {r['seconds']:.1f} | "
                     f"{r['s_per_expert_epoch']:.3f} | {r['paper_experts_per_hour']:.1f} | {speedup} | "
                     f"{r['test_acc']:.1f} | {r['estimate_s']:.1f} s |")
    return lines


def render_fmnist_experts(results: dict) -> list[str]:
    lines = [f"{results['dataset']} experts in `{results['folder']}`" + (f" ({results['note']})" if results.get("note")
                                                                       else "") + "; "
             f"{results['found']} were there before this run."]
    lines += [f"- trained up to {g['experts']} experts: {g['seconds']:.0f} s" for g in results["groups"]]
    if "experts" in results:
        acc = results["final_test_acc"]
        lines.append(f"- {results['experts']} experts x {results['epochs']} epochs; final test accuracy "
                     f"{statistics.mean(acc):.1f} % (min {min(acc):.1f}, max {max(acc):.1f})")
    if results.get("stopped"):
        lines.append(f"- stopped: {results['stopped']}")
    return lines


def render_fmnist_distill(results: dict) -> list[str]:
    lines = [f"{results['dataset']} IPC {results['ipc']}" + (f" ({results['note']})" if results.get("note") else "")
             + f": {results['experts']} experts of {results['expert_epochs_trained']} epochs."]
    p = results["preset"]
    lines.append(f"- preset: syn_steps {p['syn_steps']}, expert_epochs {p['expert_epochs']}, max_start_epoch "
                 f"{p['max_start_epoch']}, batch_syn {p['batch_syn'] or 'all'}, lr_img {p['lr_img']:g}, lr_lr "
                 f"{p['lr_lr']:g}, lr_teacher {p['lr_teacher']:g}, ConvNet-{p['width']}, backward {p['backward']}")
    lines += [f"- changed: {k} {v}" for k, v in results["changes"].items()]
    if "iterations" in results:
        backward = results.get("backward") or {}
        lines.append(f"- {results['iterations']} iterations (the paper runs 5000) at {results['s_per_iteration']:.3f} "
                     f"s/iteration ({results['distill_s']:.0f} s); backward {backward.get('mode', '?')} "
                     f"({backward.get('reason', '')}); matching loss {results['loss_first10']:.3f} (first 10) -> "
                     f"{results['loss_last10']:.3f} (last 10); learned step size {results['syn_lr']:.4g}")
    rows = [(name, results[key]) for name, key in (("distilled (MTT)", "distilled"), ("random real", "random_real"))
            if key in results]
    if rows:
        lines += ["", "| set | test accuracy % (ConvNet, full protocol) | runs | seconds |", "|---|---|---|---|"]
        lines += [f"| {name} | {r['mean']:.2f} +- {r['std']:.2f} | {', '.join(f'{x:.1f}' for x in r['runs'])} | "
                  f"{r['seconds']:.0f} |" for name, r in rows]
        lines += [f"| {m} (published) | {acc} | | |" for m, acc in results.get("published", {}).items()]
    return lines


RESULT_WORDS = {True: "pass", False: "**FAIL**", None: "not run"}


def render_cuda_tests(results: dict) -> list[str]:
    lines = [results["note"], ""] if results.get("note") else []
    lines += ["| check | result | seconds | message |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {RESULT_WORDS[c['passed']]} | {c['seconds']:.1f} | {_cell(c['message'])} |"
              for c in results["checks"]]
    return lines


# Estimates: each part's budgets plus what runs past them (CUDA start-up, a last cell or group, evaluation).
PARTS: dict[str, Part] = {  # correctness first: a device session cut short still says whether the GPU agrees
    "cuda-tests": Part(run_cuda_tests, CudaTestsConfig, 40, render_cuda_tests),
    "unroll-c10": Part(run_unroll, lambda: UnrollConfig(cases=(("cifar10", 1), ("cifar10", 10), ("cifar10", 50))),
                       100, render_unroll),
    "unroll-c100": Part(run_unroll, lambda: UnrollConfig(cases=(("cifar100", 10), ("cifar100", 50))), 110,
                        render_unroll),
    "compile-c10": Part(run_compile, lambda: CompileConfig(cases=(("cifar10", 10), ("cifar10", 1), ("cifar10", 50)),
                                                           budget_s=170), 250, render_compile),
    "compile-c100": Part(run_compile, lambda: CompileConfig(cases=(("cifar100", 10), ("cifar100", 50))), 290,
                         render_compile),
    "cudagraphs-c10": Part(run_compile, lambda: CompileConfig(cases=(("cifar10", 1), ("cifar10", 10)),
                                                              backend=CUDA_GRAPHS), 260, render_compile),
    "experts": Part(run_experts, ExpertsBenchConfig, 80, render_experts),
    "fmnist-experts": Part(run_fmnist_experts, FmnistExpertsConfig, 100, render_fmnist_experts),
    "fmnist-ipc1": Part(run_fmnist_distill, lambda: FmnistDistillConfig(ipc=1), 105, render_fmnist_distill),
    "fmnist-ipc10": Part(run_fmnist_distill, lambda: FmnistDistillConfig(ipc=10), 105, render_fmnist_distill),
}


def device_name(device: torch.device) -> str:
    return reference().device_name(device)


def git_commit() -> str:
    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = git("rev-parse", "HEAD")
    if head is None or head.returncode:
        return "unknown (no git checkout here: match the source hash instead)"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head.stdout.strip()[:12] + (" + uncommitted changes" if dirty and dirty.stdout.strip() else "")


def source_hash() -> str:
    """A hash of mtt/ and bench/ sources, to tell which code ran where the copy has no .git."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("mtt/**/*.py"), *ROOT.glob("bench/*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def run_meta(device: torch.device) -> dict[str, Any]:
    return {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "source_hash": source_hash(), "cpu_threads": torch.get_num_threads(),
            "cudnn_tf32": torch.backends.cudnn.allow_tf32, "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


class Recorder:
    """A part's JSON (rewritten after every measurement) and the report rebuilt with it."""

    def __init__(self, out: Path, name: str, config: Any, device: torch.device, smoke: bool) -> None:
        self.out, self.started = out, time.perf_counter()
        self.data = {"part": name, "status": "running", "error": None, "seconds": 0.0, "smoke": smoke,
                     "estimate_s": PARTS[name].estimate_s, "meta": run_meta(device), "config": asdict(config),
                     "results": {}}
        self.write()

    def __call__(self, results: dict) -> None:
        self.data["results"] = results
        self.write()

    def finish(self, status: str, error: str | None = None) -> None:
        self.data["status"], self.data["error"] = status, error
        self.write()

    def write(self) -> None:
        self.data["seconds"] = time.perf_counter() - self.started
        atomic_write_json(self.out / f"{self.data['part']}.json", self.data)
        write_report(self.out)


@dataclass(frozen=True)
class DeviceCommand:
    """One call of the device tool: a group of parts under a `timeout` that still leaves time to copy into $OUT."""

    parts: tuple[str, ...]
    timeout_s: int
    carry: tuple[str, ...] = ()

    @property
    def call_timeout_s(self) -> int:
        """The device call's timeout_s: the command's, its kill grace, and the copy."""
        return self.timeout_s + KILL_GRACE_S + 15

    def command(self) -> str:
        return (f"PYTHONPATH=. timeout -s INT -k {KILL_GRACE_S} {self.timeout_s} python3 bench/gpu_suite.py "
                f"--out {DEVICE_OUT} --part {','.join(self.parts)}; cp {DEVICE_OUT}/*.json {DEVICE_OUT}/report.md "
                f"\"$OUT\"/")

    def describe(self) -> str:
        carry = f", carry `{list(self.carry)}`".replace("'", '"') if self.carry else ""
        return f"- timeout_s {self.call_timeout_s}{carry}:\n  `{self.command()}`"


FASHION_MNIST = ("data/fashion-mnist",)
# One task's device time (DEVICE_BUDGET_S), called back to back on one warm machine, the most needed first.
# Each group's parts' estimates fit its timeout; the timeouts, grace and the machine's overhead fit the budget.
DEVICE_PLAN = (DeviceCommand(("cuda-tests", "compile-c10"), 300),
               DeviceCommand(("compile-c100",), 300))
# Owed to later tasks that are lent a device, one group of commands each, in this order (speed and GPU correctness
# before the longer runs). A fresh machine keeps nothing, so fmnist-experts trains again before the distillations.
DEVICE_LATER = ((DeviceCommand(("unroll-c10", "unroll-c100", "experts"), 300, FASHION_MNIST),
                 DeviceCommand(("cudagraphs-c10",), 300)),
                (DeviceCommand(("fmnist-experts", "fmnist-ipc10", "fmnist-ipc1"), 310, FASHION_MNIST),))


def ordinal(n: int) -> str:
    return {2: "second", 3: "third", 4: "fourth"}.get(n, f"{n}th")


def how_to_run() -> list[str]:
    plan_s = sum(c.call_timeout_s for c in DEVICE_PLAN) + DEVICE_OVERHEAD_S
    return ["## How to run", "",
            "Once, on the machine that calls the device: `mkdir -p data && cp -r /usr/share/datasets/fashion-mnist "
            "data/` (the four IDX .gz files, from Debian's `dataset-fashion-mnist`; data/ is git-ignored). Then, in "
            "a task that is lent a device, these "
            "device commands back to back (the machine goes back after 30 s idle), and `give_back` after the "
            f"last. With the machine's start they take at most ~{plan_s / 60:.1f} min of the task's "
            f"{DEVICE_BUDGET_S / 60:.0f} minutes: each part stops its work where its time budget is spent, and "
            "the `timeout` stops a group that still overruns, recording the part as interrupted; the copy into "
            "$OUT still runs.", "", *(c.describe() for c in DEVICE_PLAN), "",
            *(line for i, task in enumerate(DEVICE_LATER, 2) for line in (
                f"Owed to the {ordinal(i)} task with a device:", "", *(c.describe() for c in task), "")),
            "Locally (CPU, toy sizes, ~1-2 min): "
            "`PYTHONPATH=. python bench/gpu_suite.py --smoke --out /tmp/gpu_smoke`."]


def write_report(out: Path) -> None:
    """report.md from every part's JSON in `out`, in the suite's order."""
    found = {name: json.loads(path.read_text()) for name in PARTS if (path := out / f"{name}.json").is_file()}
    lines = ["# mtt GPU suite report", "",
             f"Written {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} by "
             "`bench/gpu_suite.py`. Each part states the device, torch version, commit and date it ran with.", "",
             "| part | status | wall s | estimate s | device | torch | commit (source hash) | date |",
             "|---|---|---|---|---|---|---|---|"]
    for name, data in found.items():
        m = data["meta"]
        status = data["status"] + (" (smoke)" if data["smoke"] else "")
        lines.append(f"| {name} | {status} | {data['seconds']:.0f} | {data['estimate_s']} | {m['device']} | "
                     f"{m['torch']} | {m['commit']} ({m['source_hash']}) | {m['date']} |")
    lines += [""] + how_to_run()
    for name, data in found.items():
        lines += ["", f"## {name}", "", f"Status: **{data['status']}** after {data['seconds']:.0f} s"
                  + (" (stopped before it finished)" if data["status"] == "running" else "") + "."]
        if data["error"]:
            lines += ["", "```", data["error"].rstrip(), "```"]
        if data["results"]:
            try:
                lines += [""] + PARTS[name].render(data["results"])
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:  # a part stopped half-way
                lines += ["", f"(results incomplete: {first_line(err)}; see {name}.json)"]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- command line

def selected_parts(parser: argparse.ArgumentParser, values: list[str] | None) -> list[str]:
    names = [n.strip() for v in values or ["all"] for n in v.split(",") if n.strip()]
    names = [p for n in names for p in (PARTS if n == "all" else [n])]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}: choose from all, {', '.join(PARTS)}")
    return list(dict.fromkeys(names))


def run_part(name: str, out: Path, device: torch.device, smoke: bool) -> str:
    """Run one part, recording it; returns its final status ("ok", "failed"), raises on interruption."""
    config = PARTS[name].config()
    config = config.smoke() if smoke else config
    say(f"{name}: started (estimate ~{PARTS[name].estimate_s} s)")
    record = Recorder(out, name, config, device, smoke)
    try:
        PARTS[name].run(config, device, out, record)
    except KeyboardInterrupt as err:  # SIGINT/SIGTERM (and mtt's Interrupted): record, then stop the suite
        record.finish("interrupted", str(err) or "interrupted by a signal")
        raise
    except Exception as err:
        record.finish("failed", first_line(err) + "\n\n" + traceback.format_exc(limit=-6))
        say(f"{name}: FAILED: {first_line(err)}")
        return "failed"
    record.finish("ok")
    say(f"{name}: done in {record.data['seconds']:.0f} s")
    return "ok"


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for NAME.json, report.md and the parts' runs")
    parser.add_argument("--part", action="append", metavar="NAME",
                        help=f"repeatable or comma-separated: all (default), {', '.join(PARTS)}")
    parser.add_argument("--smoke", action="store_true", help="every part at toy size on the CPU")
    args = parser.parse_args(argv)
    names = selected_parts(parser, args.part)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu") if args.smoke else resolve_device("auto")
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # a killed command still records its part
    statuses = {}
    try:
        for name in names:
            statuses[name] = run_part(name, args.out, device, args.smoke)
    except KeyboardInterrupt:
        say(f"interrupted; report in {args.out / 'report.md'}")
        return 130
    failed = [n for n, s in statuses.items() if s != "ok"]
    say(f"report in {args.out / 'report.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
