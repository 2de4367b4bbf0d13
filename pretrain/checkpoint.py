"""Checkpoints: save, validate, find the newest valid one, load, prune. The trainer decides when.

Layout of `<run_dir>/checkpoints/`:
  step_00000100/          DeepSpeed's files (model and ZeRO optimizer states of every rank), written by all
                          ranks through `save_checkpoint(client_state=...)`; plus rng_rank_<r>.pt per rank
  step_00000100/complete.json   written by rank 0 once every rank's files are written and fsynced: every file
                          with its size and CRC-32
  latest                  the tag of the newest complete checkpoint, replaced atomically after complete.json

A checkpoint counts only once its complete.json exists and every file it lists has the recorded size (and, when
asked, checksum). The checksum is CRC-32: it catches the torn, truncated and zeroed files a crash leaves, at 3x
the speed of sha256 here (with sha256, hashing took most of the save time). `latest` moves last, so a crash at
any moment leaves the previous checkpoint usable; on resume a checkpoint that fails validation is skipped with a
warning naming it, and the newest valid one is used.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.fileutil import fsync_dir, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

RECORD = "complete.json"
META = "meta.json"
LATEST = "latest"
TAG = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message names it."""


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    m = TAG.match(tag)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------------- rng
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------- save
def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != RECORD and not p.name.endswith(".tmp"))


def save(ds_engine, ckpt_dir: Path, step: int, meta: dict, *, checksums: bool = True) -> str:
    """Save on every rank (a collective); returns the tag. `meta` (JSON: step, config, data fingerprint, ...) is
    what resuming checks before loading anything. Rank 0 writes the record, then moves `latest`."""
    tag = tag_of(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    target = ckpt_dir / tag
    if rank == 0 and target.exists():  # a leftover of an interrupted save of the same step
        shutil.rmtree(target)
    dist.barrier()
    from deepspeed.checkpoint import constants as ds_constants

    # A plain data-parallel model: DeepSpeed's universal format needs no more than its version to convert it
    # (for resuming on another number of ranks).
    universal = {ds_constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: ds_constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    client_state = {"pretrain": meta, ds_constants.UNIVERSAL_CHECKPOINT_INFO: universal}
    ds_engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    write_bytes_atomic(target / f"rng_rank_{rank}.pt", _serialize(rng_state()))
    if rank == 0:
        write_json_atomic(target / META, meta)
    dist.barrier()
    # Every rank hashes a share of the files; rank 0 collects the record.
    files = _files(target)
    mine = {str(p.relative_to(target)): _describe(p, checksums) for i, p in enumerate(files) if i % world == rank}
    gathered: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        for d in sorted({target, *(p.parent for p in files)}):  # the files' names are durable too
            fsync_dir(d)
        listing = {k: v for part in gathered for k, v in part.items()}
        write_json_atomic(target / RECORD, {"tag": tag, "step": step, "world_size": world, "files": listing})
        write_bytes_atomic(ckpt_dir / LATEST, tag.encode())
    dist.barrier()
    return tag


def _serialize(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def crc32_file(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _describe(path: Path, checksums: bool) -> dict:
    """Make the file durable (DeepSpeed does not fsync) and describe it for the record. The fsync (disk) runs in a
    thread while the checksum (CPU, from the page cache) is computed: both release the GIL."""
    with open(path, "rb") as f:
        sync = threading.Thread(target=os.fsync, args=(f.fileno(),))
        sync.start()
        out = {"bytes": path.stat().st_size}
        if checksums:
            out["crc32"] = crc32_file(path)
        sync.join()
    return out


# ----------------------------------------------------------------------------------------------- validate
def validate(ckpt_dir: Path, tag: str, *, checksums: bool = True) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    target = ckpt_dir / tag
    record_path = target / RECORD
    if not record_path.is_file():
        return f"{target}: no {RECORD} (the save did not finish)"
    try:
        record = json.loads(record_path.read_text())
        files = record["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"{record_path}: unreadable ({e})"
    for name, want in files.items():
        path = target / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path}: {size} bytes, recorded {want['bytes']}"
        if checksums and "crc32" in want and crc32_file(path) != want["crc32"]:
            return f"{path}: CRC-32 differs from the record"
    return None


@dataclass
class Listed:
    tag: str
    step: int
    bytes: int
    problem: str | None  # None: valid


def list_checkpoints(ckpt_dir: Path, *, checksums: bool = False) -> list[Listed]:
    """Every step_* directory, newest first, with its size and validity."""
    out = []
    if not ckpt_dir.is_dir():
        return out
    for d in ckpt_dir.iterdir():
        step = step_of(d.name)
        if d.is_dir() and step is not None:
            size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
            out.append(Listed(d.name, step, size, validate(ckpt_dir, d.name, checksums=checksums)))
    return sorted(out, key=lambda c: -c.step)


def newest_valid(ckpt_dir: Path, *, checksums: bool = True) -> str | None:
    """The newest checkpoint that validates; invalid newer ones are skipped with a warning naming them."""
    for c in list_checkpoints(ckpt_dir, checksums=False):
        problem = c.problem or validate(ckpt_dir, c.tag, checksums=checksums)
        if problem is None:
            return c.tag
        log.warning("skipping checkpoint %s: %s", c.tag, problem)
    return None


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / META).read_text())


def read_rng(ckpt_dir: Path, tag: str, rank: int) -> dict | None:
    path = ckpt_dir / tag / f"rng_rank_{rank}.pt"
    return torch.load(path, weights_only=False) if path.is_file() else None


def consolidate(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The model's full fp32 state dict from a checkpoint of any ZeRO stage (on CPU, one process)."""
    stage = read_meta(ckpt_dir, tag)["zero_stage"]
    if stage == 0:
        state = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def universal_tag(tag: str) -> str:
    return f"{tag}.universal"


def to_universal(ckpt_dir: Path, tag: str) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (once), next to it: <tag>.universal/.
    Written under a temporary name and renamed when complete. Rank 0 only."""
    out = ckpt_dir / universal_tag(tag)
    if out.is_dir():
        return out
    tmp = ckpt_dir / (universal_tag(tag) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(ckpt_dir / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
        "--num_merge_workers", "1",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckpointError(f"{ckpt_dir / tag}: conversion to the universal format failed:\n{result.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------- prune
def prune(ckpt_dir: Path, *, keep_last: int, keep_every: int, protect: str) -> list[str]:
    """Delete complete checkpoints beyond the newest `keep_last`, except multiples of `keep_every` steps and
    `protect` (the one just saved); also delete incomplete ones older than `protect`. Rank 0 only."""
    listed = list_checkpoints(ckpt_dir)
    protect_step = step_of(protect)
    valid = [c for c in listed if c.problem is None]
    keep = {c.tag for c in valid[:keep_last]} | {protect}
    if keep_every:
        keep |= {c.tag for c in valid if c.step % keep_every == 0}
    removed = []
    for c in listed:
        if c.tag in keep or c.step > protect_step:
            continue
        shutil.rmtree(ckpt_dir / c.tag, ignore_errors=True)
        shutil.rmtree(ckpt_dir / universal_tag(c.tag), ignore_errors=True)
        removed.append(c.tag)
    return removed
