"""bench/gpu_suite.py: its smoke mode runs every part on the CPU and reports each; a failing part stays contained."""
import json
import os
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_suite.py"
PARTS = ("cuda-tests", "unroll-c10", "unroll-c100", "compile-c10", "compile-c100", "cudagraphs-c10", "experts",
         "fmnist-experts", "fmnist-ipc1", "fmnist-ipc10")
PART_KEYS = {"part", "status", "error", "seconds", "smoke", "estimate_s", "meta", "config", "results"}
META_KEYS = {"device", "torch", "date", "commit", "source_hash"}
# What each part's results must hold for the report to be of use.
RESULT_KEYS = {"unroll-c10": {"cases", "segments"}, "unroll-c100": {"cases", "segments"},
               "experts": {"dataset", "rows"}, "fmnist-experts": {"folder", "experts", "epochs", "final_test_acc"},
               "fmnist-ipc1": {"iterations", "s_per_iteration", "distilled", "random_real", "changes"},
               "fmnist-ipc10": {"iterations", "s_per_iteration", "distilled", "random_real", "changes"},
               "cuda-tests": {"checks"}, "compile-c10": {"dsa", "backend", "cases"},
               "compile-c100": {"dsa", "backend", "cases"},
               "cudagraphs-c10": {"dsa", "backend", "cases"}}


def suite(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def part_json(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    return out, suite("--smoke", "--out", str(out))


def device_commands(suite_module):
    return [c for task in (suite_module.DEVICE_PLAN, *suite_module.DEVICE_LATER) for c in task]


def test_smoke_run_records_every_part_and_reports_it(smoke):
    out, run = smoke
    assert run.returncode == 0, run.stderr[-3000:]
    report = (out / "report.md").read_text()
    for name in PARTS:
        data = part_json(out, name)
        assert PART_KEYS <= set(data) and META_KEYS <= set(data["meta"]), name
        assert data["status"] == "ok" and data["smoke"] and data["error"] is None, (name, data["error"])
        assert RESULT_KEYS[name] <= set(data["results"]), name
        assert f"## {name}" in report and f"| {name} | ok (smoke) |" in report
    suite_module = load_bench_script("gpu_suite")
    for command in device_commands(suite_module):
        assert command.command() in report


def test_device_commands_cover_every_part_and_fit_one_tasks_device_time():
    suite = load_bench_script("gpu_suite")
    commands = device_commands(suite)
    assert {part for c in commands for part in c.parts} == set(PARTS)
    for c in commands:
        assert sum(suite.PARTS[part].estimate_s for part in c.parts) <= c.timeout_s, c
        assert c.call_timeout_s <= suite.DEVICE_COMMAND_LIMIT_S, c
        # a distillation part reads the experts that fmnist-experts leaves on the machine: same command, before it
        for i, part in enumerate(c.parts):
            assert not part.startswith("fmnist-ipc") or "fmnist-experts" in c.parts[:i], c
        # the Fashion-MNIST parts read data/fashion-mnist, which only travels when carried
        assert ("data/fashion-mnist" in c.carry) == any(p.startswith(("fmnist", "experts")) for p in c.parts), c
    for task in (suite.DEVICE_PLAN, *suite.DEVICE_LATER):  # each a task's machine of its own
        # the commands, the machine's start and idle time fit what one task gets
        assert sum(c.call_timeout_s for c in task) + suite.DEVICE_OVERHEAD_S <= suite.DEVICE_BUDGET_S
        # every part's JSON on the machine and the report come back: the device tool returns at most 8 files
        assert len({part for c in task for part in c.parts}) + 1 <= suite.DEVICE_MAX_FILES


def test_benchmarks_page_lists_the_device_commands_as_the_suite_runs_them():
    suite = load_bench_script("gpu_suite")
    page = (ROOT / "BENCHMARKS.md").read_text()
    for c in device_commands(suite):
        assert c.command() in page, c.command()


def test_smoke_unroll_measures_every_method_and_checks_the_reference(smoke):
    out, _ = smoke
    for case in part_json(out, "unroll-c100")["results"]["cases"]:
        cells = case["cells"]
        assert {"reference", "full", "checkpointed", "auto"} <= set(cells)
        for method in ("reference", "full", "checkpointed"):
            assert cells[method]["status"] == "ok" and cells[method]["seconds"] > 0, (method, cells[method])
        assert cells["auto"]["chose"] in ("full", "checkpointed")
        assert max(case["checks"]["reference_vs_full_rel_err"].values()) < 1e-3
        for mode in ("full", "checkpointed"):
            assert cells[f"segments8-{mode}"]["status"] == "ok" and cells[f"cudnn-benchmark-{mode}"]["status"] == "ok"
        # on a 1 MiB "card" full's graph does not fit: checkpointed keeping the graphs that do (none, at most)
        assert [cells[name]["status"] for name in cells if "card: checkpointed-kept" in name] == ["ok"]
        # ours vs the original, timed again in turns: each median over its runs alone and the rounds
        assert case["interleaved_rounds"] == 3
        for method in ("reference", "full", "checkpointed", "cudnn-benchmark-full"):
            runs = cells[method]["runs"]
            assert len(runs) >= 4 and cells[method]["seconds"] == statistics.median(runs)
        assert cells["auto"]["seconds"] == cells[cells["auto"]["chose"]]["seconds"]
    assert [c["case"] for c in part_json(out, "unroll-c10")["results"]["cases"]] == [
        "cifar10 IPC 1", "cifar10 IPC 10", "cifar10 IPC 50"]


def test_the_cudnn_benchmark_cells_turn_the_mode_on_for_their_runs_only():
    suite = load_bench_script("gpu_suite")
    seen = []
    run = suite.cudnn_benchmarked(lambda: lambda: seen.append(torch.backends.cudnn.benchmark))()
    assert not torch.backends.cudnn.benchmark
    run()
    assert seen == [True] and not torch.backends.cudnn.benchmark


def test_smoke_cuda_tests_pass_on_the_cpu(smoke):
    out, _ = smoke
    checks = part_json(out, "cuda-tests")["results"]["checks"]
    assert len(checks) >= 8
    failed = [(c["name"], c["message"]) for c in checks if c["passed"] is False]
    assert not failed, failed


def test_a_failing_part_is_recorded_and_the_next_part_still_runs(tmp_path):
    # fmnist-ipc1 needs the experts that fmnist-experts writes; in an empty --out it must fail alone.
    run = suite("--smoke", "--out", str(tmp_path), "--part", "fmnist-ipc1,unroll-c10")
    assert run.returncode == 1
    failed, after = part_json(tmp_path, "fmnist-ipc1"), part_json(tmp_path, "unroll-c10")
    assert failed["status"] == "failed" and "fmnist-experts" in failed["error"]
    assert after["status"] == "ok"
    report = (tmp_path / "report.md").read_text()
    assert "| fmnist-ipc1 | failed (smoke) |" in report and "| unroll-c10 | ok (smoke) |" in report
    assert "FAILED" in run.stderr


def test_unknown_part_is_refused_before_anything_runs(tmp_path):
    run = suite("--smoke", "--out", str(tmp_path / "out"), "--part", "unroll-c10,nope")
    assert run.returncode == 2
    assert "nope" in run.stderr and "fmnist-ipc10" in run.stderr  # names the valid parts
    assert not (tmp_path / "out").exists()


def test_cells_past_a_case_budget_are_skipped_and_reported(tmp_path):
    suite = load_bench_script("gpu_suite")
    config = replace(suite.UnrollConfig(cases=(("cifar10", 1),)).smoke(), case_budget_s=0.0)
    recorded = []
    suite.run_unroll(config, torch.device("cpu"), tmp_path, recorded.append)
    cells = recorded[-1]["cases"][0]["cells"]
    assert {"reference", "full", "checkpointed", "segments8-full", "segments8-checkpointed"} <= set(cells)
    assert all(c["status"] == "skipped" and "case budget" in c["error"] for c in cells.values()), cells
    table = "\n".join(suite.render_unroll(recorded[-1]))
    assert "| cifar10 IPC 1 | reference | skipped |" in table and "case budget spent" in table


def test_expert_counts_whose_estimate_overruns_the_budget_are_skipped(tmp_path):
    suite = load_bench_script("gpu_suite")
    config = replace(suite.ExpertsBenchConfig().smoke(), budget_s=0.0)
    recorded = []
    suite.run_experts(config, torch.device("cpu"), tmp_path, recorded.append)
    rows = recorded[-1]["rows"]
    assert [r["parallel"] for r in rows] == list(config.parallels)
    assert all(r["status"] == "skipped" and r["estimate_s"] > 0 and "s left" in r["error"] for r in rows), rows
    table = "\n".join(suite.render_experts(recorded[-1]))
    assert "| 1 | 1 x 1 | skipped: estimated" in table
    assert f"| | | | | {rows[0]['estimate_s']:.1f} s |" in table  # the estimate still reported


def test_smoke_compiled_steps_trace_and_equal_the_eager_unroll(smoke):
    out, _ = smoke
    results = part_json(out, "compile-c100")["results"]
    assert results["backend"] == "eager"  # the smoke traces, generates no code
    assert [c["case"] for c in results["cases"]] == ["cifar100 IPC 10", "cifar100 IPC 50"]
    compiled = ("compiled-checkpointed", "compiled-full")
    for case in results["cases"]:
        assert set(case["compile_s"]) == set(compiled) and all(t > 0 for t in case["compile_s"].values())
        assert case["ops"]
        assert all(case["cells"][m]["status"] == "ok" for m in ("reference", "full", *compiled))
        assert set(case["checks"]) == {f"{c}_vs_{m}" for c in compiled for m in ("full", "reference")}
        # one profiled run each: what the device did against the wall time (a GPU's kernels; the CPU's ops here)
        assert set(case["profiles"]) == {"reference", "full", *compiled}
        assert all(p["wall_s"] > 0 and p["aten_ops"] > 0 for p in case["profiles"].values())
        # the same arithmetic as the original's loop and eager full, float32 round-off apart
        for check in case["checks"].values():
            assert check["rel_err_images"] < 1e-3 and check["rel_err_syn_lr"] < 1e-3 and check["cosine_images"] > 0.999
        # what --compile runs under auto: both modes timed compiled and eager
        assert case["auto"]["status"] == "ok", case["auto"]
        assert set(case["auto"]["seconds"]) == {"full", "checkpointed", "compiled full", "compiled checkpointed"}
    assert len({op for case in results["cases"] for op in case["ops"]}) > 1  # one compiled step for several ops
    table = (out / "report.md").read_text()
    assert "| cifar100 IPC 50 | compiled-checkpointed |" in table and "| cifar100 IPC 50 | compiled-full |" in table
    assert "compiling and the first iteration" in table and "  - profile of full: " in table
    assert "  - `auto` with --compile chose **" in table


def test_smoke_cuda_graphs_part_runs_the_replayed_steps(smoke):
    out, _ = smoke
    results = part_json(out, "cudagraphs-c10")["results"]
    assert results["backend"] == "cudagraphs"  # dynamo's: on the CPU it runs the steps without their graphs
    assert [c["case"] for c in results["cases"]] == ["cifar10 IPC 1", "cifar10 IPC 10"]
    for case in results["cases"]:
        assert all(case["cells"][m]["status"] == "ok" for m in ("compiled-checkpointed", "compiled-full"))
        for check in case["checks"].values():
            assert check["rel_err_images"] < 1e-3 and check["rel_err_syn_lr"] < 1e-3
    assert "compiled steps that ran without CUDA graphs: " in (out / "report.md").read_text()


def test_compile_cases_past_the_part_budget_are_skipped(tmp_path):
    suite = load_bench_script("gpu_suite")
    recorded = []
    config = replace(suite.CompileConfig(cases=(("cifar10", 1),)).smoke(), budget_s=-1.0)
    suite.run_compile(config, torch.device("cpu"), tmp_path, recorded.append)
    assert recorded[-1]["cases"] == [{"case": "cifar10 IPC 1", "status": "skipped",
                                      "error": "part budget spent (0 s of -1 s)"}]
    assert "| cifar10 IPC 1 | | skipped |" in "\n".join(suite.render_compile(recorded[-1]))
