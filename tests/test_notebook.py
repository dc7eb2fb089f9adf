"""examples/quickstart.ipynb runs top to bottom (so that it never rots): a short training run stands in for the
demo checkpoint."""

from pathlib import Path

import pytest

from helpers import single_cpu_env

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("QUICKSTART_STEPS", "30")  # the kernel inherits this process's environment
    for name in ("JAX_PLATFORMS", "XLA_FLAGS"):
        monkeypatch.setenv(name, single_cpu_env()[name])
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    # accuracy, adaptive exit, trajectory; then the inspect section's convergence, top tokens, PCA trajectories
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 6
    text = "".join(o.get("text", "") for o in outputs)
    assert "r=32:" in text and "iterations on average" in text and "12 swaps, after 1..16 iterations:" in text
    assert (tmp_path / "quickstart_run" / "checkpoints").is_dir()  # trained here: no demo checkpoint in tmp_path
