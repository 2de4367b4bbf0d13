"""Small file helpers shared by the library and data_prep: atomic writes and checksums.

Every output of the project is written under a temporary name in the same directory and renamed into place once
complete, so a crash never leaves a file that looks finished but is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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


SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
SIZE_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """A size as the command lines take it: '5GB' -> 5 * 10**9, '2GiB' -> 2 * 2**30, a bare number is bytes (as
    Hugging Face's max_shard_size); argparse.ArgumentTypeError (a usage error) for anything else."""
    import argparse

    m = SIZE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * SIZE_UNITS[(m.group(2) or "b").lower()])
