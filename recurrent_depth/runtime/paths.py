"""Paths of every file the project reads or writes, local or in cloud storage (`gs://bucket/dir`), as
`etils.epath.Path` (the path type Orbax takes). `pathlib.Path` would turn `gs://b/x` into the local `gs:/b/x`.

epath reaches gs:// through gcsfs, which by default caches directory listings forever and so never sees what
another host (or a later run) wrote; importing this module turns that cache off for gs://.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable

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


def write_atomically(target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(local_path)` into a uniquely named temporary file, then renamed over `target` (a local path) or
    copied to it (cloud storage, where an object appears whole or not at all): never a half-written file, even with
    another writer of the same target still running."""
    target = as_path(target)
    local = not is_url(target)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent) if local else None, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        if local:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
            os.replace(tmp, os.fspath(target))
        else:
            with open(tmp, "rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 2**20)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomically(target: str | os.PathLike, text: str) -> None:
    """`text` written to `target` whole or not at all (see write_atomically)."""
    write_atomically(target, lambda tmp: open(tmp, "w", encoding="utf-8").write(text))
