"""`%run train.py` in a Jupyter kernel trains and returns: the entry point does not re-execute the kernel's process
for huge pages (recurrent_depth.runtime.host_memory), which used to replace the kernel and hang the cell."""

from pathlib import Path

import pytest

from helpers import single_cpu_env

ROOT = Path(__file__).parent.parent
# Two steps of a smaller tiny model: compiles in seconds.
TINY = ("--config.train.steps=2 --config.train.batch_size=2 --config.train.seq_len=16 --config.train.log_every=1 "
        "--config.train.optimizer.warmup_steps=1 --config.model.num_prelude_layers=1 --config.model.num_core_layers=1 "
        "--config.model.mean_recurrence=2 --config.model.mean_backprop_depth=1")


@pytest.mark.slow
def test_percent_run_train_py_in_a_kernel_finishes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)  # the kernel inherits this process's environment
    for name, value in single_cpu_env().items():
        if name in ("JAX_PLATFORMS", "XLA_FLAGS", "PYTHONPATH"):
            monkeypatch.setenv(name, value)
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import os\nkernel_pid = os.getpid()"),
        nbformat.v4.new_code_cell(f"%run {ROOT / 'train.py'} --config={ROOT / 'configs' / 'tiny.py'} "
                                  f"--workdir={tmp_path / 'run'} {TINY}"),
        nbformat.v4.new_code_cell("print('same kernel:', os.getpid() == kernel_pid, os.environ.get('GLIBC_TUNABLES'))"),
    ])
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # CellTimeoutError where the kernel was replaced; CellExecutionError where a cell failed
    assert notebook.cells[2].outputs[0]["text"].strip() == "same kernel: True None"
    assert (tmp_path / "run" / "checkpoints").is_dir() and (tmp_path / "run" / "metrics.jsonl").exists()
