"""examples/quickstart.ipynb runs top to bottom (so that it never rots): a short training run stands in for the
demo checkpoint."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("QUICKSTART_STEPS", "30")  # the kernel inherits this process's environment
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                             if not f.startswith("--xla_force_host_platform_device_count")))
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # accuracy, adaptive exit, trajectory
    text = "".join(o.get("text", "") for o in outputs)
    assert "r=32:" in text and "iterations on average" in text
    assert (tmp_path / "quickstart_run" / "checkpoints").is_dir()  # trained here: no demo checkpoint in tmp_path
