"""bench/methods.py --smoke: every recipe distils and is evaluated, and the results file is what the notebook reads."""
import json
import os
import subprocess
import sys
from pathlib import Path

from mtt.paper import load_method_results
from mtt.recipes import METHODS

from bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "methods.py"


def test_methods_bench_smoke(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tmp_path / "results.json").read_text())
    variants = load_bench_script("methods").VARIANTS
    assert sorted(r["method"] for r in records) == sorted([*METHODS, *variants, "random real"])
    assert all(0 <= r["mean"] <= 100 and r["seconds"] > 0 for r in records)
    assert "FAILED" not in done.stdout
    results = load_method_results(tmp_path / "results.json")
    assert ("datm", "digits", 1) in results
    ftd = json.loads((tmp_path / "smoke" / "ftd" / "config.json").read_text())
    assert ftd["method"] == "ftd" and ftd["ema_decay"] >= 0
    # The own-experts rows distil from experts trained with their paper's expert-stage options.
    own = json.loads((tmp_path / "smoke" / "experts-pad-own-experts" / "config.json").read_text())
    assert own["sam_rho"] == 0.01 and own["easy_to_hard"] == 0.75 and own["drop_easy"] == [[4, 0.1], [6, 0.2]]
    pad = json.loads((tmp_path / "smoke" / "pad-own-experts" / "config.json").read_text())
    assert pad["method"] == "pad"
    assert json.loads((tmp_path / "smoke" / "experts" / "config.json").read_text())["sam_rho"] == 0
