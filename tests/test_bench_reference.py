"""bench/reference_unroll.py: its smoke mode runs end to end, and its reference computes our gradients."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mtt.unroll import BACKWARD_MODES, Student

from bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "reference_unroll.py"


def test_smoke_mode_writes_a_timed_row_per_config(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--json", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    bench = load_bench_script("reference_unroll")
    assert [row["config"]["name"] for row in result["rows"]] == [c.name for c in bench.CONFIGS]
    for row in result["rows"]:
        assert set(row["seconds"]) == {"reference", *BACKWARD_MODES}
        assert all(t > 0 for t in row["seconds"].values())
        assert set(row["ratio"]) == set(BACKWARD_MODES)


def test_reference_gradients_equal_ours_full_in_float64():
    bench = load_bench_script("reference_unroll")
    config = bench.Config("tiny", channels=3, size=8, width=8, ipc=2, steps=4)
    problem = bench.make_problem(config, torch.device("cpu"), dtype=torch.float64)
    reference = bench.reference_gradients(bench.ReparamModule(copy.deepcopy(problem.net)), problem)
    ours = bench.our_gradients(Student(problem.net), problem, "full")
    assert all(r.abs().max() > 0 for r in reference)  # the comparison is not vacuous
    bench.check_same_gradients(ours, reference, rtol=1e-6, atol=1e-12)
    assert not problem.images.requires_grad and not problem.theta_start.requires_grad  # inputs left as they were
