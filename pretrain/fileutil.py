"""Small file helpers shared by the library and data_prep: atomic writes and checksums.

Every output of the project is written under a temporary name in the same directory and renamed into place once
complete, so a crash never leaves a file that looks finished but is not.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 20


def tmp_name(path: Path) -> Path:
    """The temporary name `path` is written under before it is renamed into place."""
    return path.with_name(path.name + ".tmp")


def stays_inside(name: str) -> bool:
    """Whether `name` is a relative path that cannot leave the directory it is joined to (no '..', not absolute,
    not empty); symlinks are for the caller to check when it opens the file."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> None:
    """Rename a fully written (and fsynced) temporary file to its final name."""
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    commit(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
