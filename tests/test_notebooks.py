"""The notebooks are committed clean and stay thin (they call the package)."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["distillation.ipynb", "visualization.ipynb", "benchmarking.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    notebook = json.loads((ROOT / name).read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}: clear the outputs"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_has_a_parameters_cell_with_a_ci_configuration(name):
    cells = json.loads((ROOT / name).read_text())["cells"]
    parameters = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(parameters) == 1 and 'os.environ.get("CI")' in "".join(parameters[0]["source"])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_thin(name):
    """No function or class definitions: the logic lives in the package."""
    cells = json.loads((ROOT / name).read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "\ndef " not in source and "\nclass " not in source and not source.startswith("def ")
