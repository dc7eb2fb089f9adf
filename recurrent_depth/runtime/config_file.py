"""Reading an ml_collections config file (configs/*.py): what `--config=FILE[:SPEC]` loads, outside absl too."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import ml_collections


def load_config_file(path: str | os.PathLike, spec: str | None = None) -> ml_collections.ConfigDict:
    """`get_config()` of a config file such as configs/tiny.py (what `--config=` loads); `get_config(spec)` with a
    spec (what `--config=FILE:SPEC` loads)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config() if spec is None else module.get_config(spec)
