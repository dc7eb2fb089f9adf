"""Paths of every file the project reads or writes, local or in cloud storage (`gs://bucket/dir`), as
`etils.epath.Path` (the path type Orbax takes). `pathlib.Path` would turn `gs://b/x` into the local `gs:/b/x`.

epath reaches gs:// through gcsfs, which by default caches directory listings forever and so never sees what
another host (or a later run) wrote; importing this module turns that cache off for gs://.
"""

from __future__ import annotations

import os
import re

import fsspec
from etils import epath

fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BUCKET = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]+")


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names cloud storage (`gs://...`, `s3://...`) rather than a local file."""
    return bool(_URL.match(os.fspath(path)))


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a URL as it is, a local path made absolute (Orbax needs absolute local paths;
    `absolute()` on a URL would make it a local path)."""
    path = epath.Path(path)
    return path if is_url(path) else path.absolute()


def check_bucket(path: str | os.PathLike) -> None:
    """Raises FileNotFoundError naming the bucket if `path` is in cloud storage and its bucket cannot be read,
    before anything is computed for it (a missing bucket otherwise fails only at the first write, tersely)."""
    bucket = _BUCKET.match(os.fspath(path))
    try:
        readable = bucket is None or epath.Path(bucket.group()).exists()
    except ImportError as err:  # fsspec names the missing package; say where it comes from
        raise ImportError(f"{os.fspath(path)}: {err} (pip install -e '.[gcs]')") from err
    if not readable:
        raise FileNotFoundError(f"bucket {bucket.group()} of {os.fspath(path)} does not exist or cannot be read "
                                "(credentials; STORAGE_EMULATOR_HOST for an emulator)")
