"""Paths of every file the project reads or writes, local or in cloud storage (`gs://bucket/dir`), as
`etils.epath.Path` (the path type Orbax takes). `pathlib.Path` would turn `gs://b/x` into the local `gs:/b/x`."""

from __future__ import annotations

import os
import re

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names cloud storage (`gs://...`, `s3://...`) rather than a local file."""
    return bool(_URL.match(os.fspath(path)))


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a URL as it is, a local path made absolute (Orbax needs absolute local paths;
    `absolute()` on a URL would make it a local path)."""
    path = epath.Path(path)
    return path if is_url(path) else path.absolute()
