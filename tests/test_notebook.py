"""examples/quickstart.ipynb runs top to bottom (so that it never rots): a short training run stands in for the
demo checkpoint, and the tiny Huginn fixture with a word-level tokenizer for huginn-0125 (nothing is downloaded)."""

import json
import shutil
from pathlib import Path

import pytest

from helpers import HUGINN_TEST_SPECIALS, TINY, single_cpu_env

ROOT = Path(__file__).parent.parent


def tiny_huginn_checkpoint(directory: Path, text: str) -> Path:
    """The tiny fixture checkpoint with a word-level `tokenizer.json` (huginn-0125's special tokens, the words of
    `text`, 512 ids like the model), in `directory`. One token per word keeps the notebook's prompts inside the
    fixture's 128-token context: a byte-level BPE small enough for 512 ids needs 125-165 tokens per word problem."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    shutil.copytree(TINY / "checkpoint", directory)
    vocab_size = json.loads((directory / "config.json").read_text())["vocab_size"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=vocab_size,
                                                              special_tokens=[*HUGINN_TEST_SPECIALS, "[UNK]"]))
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    huginn = tiny_huginn_checkpoint(tmp_path / "huginn-tiny", "\n".join(cell.source for cell in notebook.cells))
    # the kernel inherits this process's environment: the notebook's parameters, and no hub access at all
    # the training cell runs (what it learns is not checked), as tests/test_demo.py's train.py: compiled once
    monkeypatch.setenv("QUICKSTART_STEPS", "4")
    monkeypatch.setenv("QUICKSTART_HUGINN_DIR", str(huginn))
    monkeypatch.setenv("QUICKSTART_MAX_NEW_TOKENS", "8")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("JAX_PLATFORMS", "XLA_FLAGS"):
        monkeypatch.setenv(name, single_cpu_env()[name])
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    # accuracy, adaptive exit, trajectory; the inspect section's convergence, top tokens, PCA trajectories; and
    # huginn-0125's accuracy against iterations
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 7
    text = "".join(o.get("text", "") for o in outputs)
    assert "r=32:" in text and "iterations on average" in text and "12 swaps, after 1..16 iterations:" in text
    assert (tmp_path / "quickstart_run" / "checkpoints").is_dir()  # trained here: no demo checkpoint in tmp_path
    # huginn-0125's section ran on the fixture: loaded onto one device, two chat turns, the sweep at five counts
    assert "on mesh {'data': 1, 'fsdp': 1, 'tensor': 1} of cpu" in text and "cpu:0: weights" in text
    assert "> Hi! In two sentences" in text and "> And why could" in text and "dropped" not in text
    assert all(f"r={r:2d}: accuracy" in text for r in (1, 4, 8, 16, 32))
    assert "longer than the model's context" not in text  # the prompts fit: none was cut
    assert not (tmp_path / "huginn-0125").exists()  # nothing was downloaded
