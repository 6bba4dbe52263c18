"""The notebooks are committed clean and stay thin (they call the package)."""
import json
import sys
import types
from pathlib import Path

import pytest

from mtt import io

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


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_on_colab_each_notebook_keeps_its_folders_on_google_drive(name):
    cells = json.loads((ROOT / name).read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "ON_DRIVE = True" in source and "on_drive(" in source


def test_on_drive_is_google_drive_on_colab_and_the_path_itself_elsewhere(tmp_path, monkeypatch):
    """Colab wipes /content when its runtime disconnects: the notebooks' folders go to MyDrive/mtt, Drive mounted
    once. google.colab stands in for Colab's own module (its drive.mount asks the user for access)."""
    assert io.on_drive("runs/c10") == Path("runs/c10")  # not on Colab
    mounted = []

    def mount(where: str) -> None:
        mounted.append(where)
        (Path(where) / "MyDrive").mkdir(parents=True)

    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mount)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr(io, "COLAB_DRIVE", tmp_path / "drive")
    kept = tmp_path / "drive" / "MyDrive" / "mtt"
    assert io.on_drive("runs/c10") == kept / "runs" / "c10"
    assert io.on_drive("runs/c100/synthetic.safetensors") == kept / "runs" / "c100" / "synthetic.safetensors"
    assert mounted == [str(tmp_path / "drive")]  # once
    assert io.on_drive("/content/elsewhere") == Path("/content/elsewhere")  # where the user said
