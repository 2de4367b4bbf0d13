"""Checkpoints: the mechanism (save, validate, list, prune, read) and the policy (`CheckpointManager`: find the
resume point, check it against the run, convert it when needed, load it; save with retention). The trainer
decides when; the manager decides how; `Engine` does the DeepSpeed part of both.

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
warning naming it, and the newest valid one is used. A run directory whose checkpoints are all invalid is refused
(never silently restarted), unless the only ones are leftovers of a first save that never finished.

Loading a checkpoint unpickles it (DeepSpeed's files and ours), and unpickling can run code. Before anything of a
checkpoint is loaded, every pickle in it is scanned (statically, nothing is run) for the Python names it would call;
one naming anything outside `torch.load(weights_only=True)`'s allowlist and the few classes our saves contain is
refused. Our own files are read with weights_only=True.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import random
import re
import shutil
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pretrain.config import CheckpointConfig, ModelConfig
from pretrain.data import Skips
from pretrain.distributed import World
from pretrain.errors import BadInput
from pretrain.fileutil import fsync_dir, stays_inside, write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    from pretrain.engine import Engine

log = logging.getLogger(__name__)

RECORD = "complete.json"
META = "meta.json"
LATEST = "latest"
CHECKPOINTS = "checkpoints"  # a run directory's checkpoints live in <run_dir>/checkpoints/
TAG = re.compile(r"^step_(\d+)$")
SET_ASIDE = (
    "`python launch/checkpoints.py set-aside <run_dir>` moves the earlier run's checkpoints, metrics and "
    "TensorBoard logs to <run_dir>/previous/<time>/ (nothing is deleted)"
)


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint that cannot be used for this run; the message names it."""


@dataclass
class CheckpointMeta:
    """meta.json: where the run stood and what it was, checked before anything is loaded."""

    step: int
    consumed_samples: int  # global samples trained on: the data position, valid on any number of ranks
    tokens_seen: int
    global_batch: int
    world_size: int
    zero_stage: int
    config: dict  # the resolved run config
    data_fingerprint: dict  # pretrain.data.fingerprint of the training data

    @classmethod
    def of_run(cls, *, global_batch: int, world_size: int, zero_stage: int, config: dict, data_fingerprint: dict):
        """A run's meta at step 0: what its checkpoints must agree with, and the template of what it saves."""
        return cls(0, 0, 0, global_batch, world_size, zero_stage, config, data_fingerprint)

    def at(self, step: int) -> CheckpointMeta:
        """The same run at another step."""
        return dataclasses.replace(
            self, step=step, consumed_samples=step * self.global_batch, tokens_seen=step * self.global_batch
            * self.config["model"]["seq_len"],
        )  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict, where: Path) -> CheckpointMeta:
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d] if isinstance(d, dict) else names
        if missing:
            raise CheckpointError(f"{where}: not a checkpoint's meta (missing {', '.join(missing)})")
        return cls(**{n: d[n] for n in names})


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


def save(engine: Engine, world: World, ckpt_dir: Path, meta: CheckpointMeta, *, checksums: bool = True) -> str:
    """Save on every rank (a collective); returns the tag. `meta` is what resuming checks before loading
    anything. Rank 0 writes the record, then moves `latest`."""
    tag = tag_of(meta.step)
    target = ckpt_dir / tag
    if world.is_main and target.exists():  # a leftover of an interrupted save of the same step
        shutil.rmtree(target)
    world.barrier()
    engine.save(ckpt_dir, tag, {"pretrain": dataclasses.asdict(meta)})
    write_bytes_atomic(target / f"rng_rank_{world.rank}.pt", _serialize(rng_state()))
    if world.is_main:
        write_json_atomic(target / META, dataclasses.asdict(meta))
    world.barrier()
    # Every rank hashes a share of the files; rank 0 collects the record.
    files = _files(target)
    mine = {
        str(p.relative_to(target)): _describe(p, checksums) for i, p in enumerate(files) if i % world.size == world.rank
    }
    gathered = world.all_gather(mine)
    if world.is_main:
        for d in sorted({target, *(p.parent for p in files)}):  # the files' names are durable too
            fsync_dir(d)
        listing = {k: v for part in gathered for k, v in part.items()}
        write_json_atomic(target / RECORD, {"tag": tag, "step": meta.step, "world_size": world.size, "files": listing})
        write_bytes_atomic(ckpt_dir / LATEST, tag.encode())
    world.barrier()
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
        files = json.loads(record_path.read_text())["files"]
        wanted = {str(name): (int(want["bytes"]), want.get("crc32")) for name, want in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{record_path}: unreadable ({type(e).__name__}: {e})"
    if META not in wanted:
        return f"{record_path}: does not list {META}"
    outside = [n for n in wanted if not stays_inside(n)]
    if outside:
        return f"{record_path}: lists files outside the checkpoint ({', '.join(outside[:3])})"
    for name, (nbytes, crc) in wanted.items():
        path = target / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != nbytes:
            return f"{path}: {size} bytes, recorded {nbytes}"
        if checksums and crc is not None and crc32_file(path) != crc:
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


def checkpoints_of(path: str | Path) -> Path:
    """The checkpoints directory of a run directory (or the checkpoints directory itself)."""
    path = Path(path)
    return path if path.name == CHECKPOINTS else path / CHECKPOINTS


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag `latest` names (None without one); damaged bytes come back replaced, so they show in messages."""
    pointer = ckpt_dir / LATEST
    return pointer.read_bytes().decode("utf-8", errors="replace").strip() if pointer.is_file() else None


def newest_valid(ckpt_dir: Path, *, checksums: bool = True) -> str | None:
    """The newest checkpoint that validates; invalid newer ones are skipped with a warning naming them."""
    for c in list_checkpoints(ckpt_dir, checksums=False):
        problem = c.problem or validate(ckpt_dir, c.tag, checksums=checksums)
        if problem is None:
            return c.tag
        log.warning("skipping checkpoint %s: %s", c.tag, problem)
    return None


def read_meta(ckpt_dir: Path, tag: str) -> CheckpointMeta:
    path = ckpt_dir / tag / META
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    return CheckpointMeta.from_dict(data, path)


def read_rng(ckpt_dir: Path, tag: str, rank: int) -> dict | None:
    """A rank's RNG states (tensors, numpy's array and plain Python values), unpickled with weights_only=True."""
    path = ckpt_dir / tag / f"rng_rank_{rank}.pt"
    if not path.is_file():
        return None
    try:
        with torch.serialization.safe_globals(numpy_array_globals()):
            return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything that is not our RNG record
        raise CheckpointError(f"{path}: not an RNG state this project wrote ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------- unpickling
# Names a pickle of our checkpoints may call beyond those torch.load(weights_only=True) allows: numpy arrays (the
# numpy RNG state in rng_rank_*.pt) and the plain classes DeepSpeed puts in its ZeRO optimizer states (an int
# enum, the static or, with fp16, dynamic loss scaler, a (start, numel) record).
DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def numpy_array_globals() -> list:
    """What unpickling a numpy array calls: its reconstructor (module path differs across numpy versions), the
    array and dtype classes."""
    reconstruct = np.zeros(1).__reduce__()[0]
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


@contextlib.contextmanager
def restricted_unpickling():
    """Every torch.load in the block (DeepSpeed's, which ask for full unpickling, included) runs PyTorch's
    weights_only unpickler, allowing also numpy arrays and DEEPSPEED_GLOBALS: a checkpoint can then build only
    tensors, plain containers and those classes' instances, whatever its pickles say. Process-wide while it lasts
    (the environment variable is how torch.load lets a caller force it)."""
    import importlib

    classes = []
    for name in sorted(DEEPSPEED_GLOBALS):
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):  # a DeepSpeed without it cannot have saved it
            classes.append(getattr(importlib.import_module(module), attr))
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(numpy_array_globals() + classes):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def check_pickles(directory: Path) -> None:
    """Refuse a checkpoint directory holding a pickle that would call anything beyond what our saves contain.
    Static: each file's pickle is disassembled (torch's weights_only scanner, which also rejects the opcodes that
    build callables any other way); nothing in it is run."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    pickles = []
    for d, dirs, files in os.walk(directory):  # a link could bring in files this scan never sees
        links = [name for name in dirs + files if os.path.islink(os.path.join(d, name))]
        if links:
            raise CheckpointError(f"{Path(d) / links[0]}: a symlink inside a checkpoint; refusing to load it")
        pickles += [Path(d) / name for name in files if name.endswith(".pt")]
    for path in sorted(pickles):
        try:
            with torch.serialization.safe_globals(numpy_array_globals()):
                names = set(get_unsafe_globals_in_checkpoint(path))
        except Exception as e:  # noqa: BLE001 - not a zip file torch.save wrote, or opcodes the scanner refuses
            raise CheckpointError(
                f"{path}: refusing to unpickle it: not a file torch.save wrote, or one built to run code "
                f"({type(e).__name__}: {e})"
            ) from None
        if names - DEEPSPEED_GLOBALS:
            raise CheckpointError(
                f"{path}: refusing to unpickle it: loading would call {', '.join(sorted(names - DEEPSPEED_GLOBALS))}, "
                "which no checkpoint of this project contains (loading a checkpoint is running code: use only "
                "checkpoints you trust)"
            )


def consolidate(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The model's full fp32 state dict from a checkpoint of any ZeRO stage (on CPU, one process)."""
    from pretrain.engine import consolidated_state_dict

    check_pickles(ckpt_dir / tag)
    with restricted_unpickling(), contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's progress lines: not output
        return consolidated_state_dict(ckpt_dir, tag, read_meta(ckpt_dir, tag).zero_stage)


def universal_tag(tag: str) -> str:
    return f"{tag}.universal"


def to_universal(ckpt_dir: Path, tag: str) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (once), next to it: <tag>.universal/.
    Written under a temporary name and renamed when complete. Rank 0 only."""
    from pretrain.engine import convert_to_universal

    out = ckpt_dir / universal_tag(tag)
    if out.is_dir():
        check_pickles(out)  # made by an earlier attempt: DeepSpeed will unpickle what is there
        return out
    check_pickles(ckpt_dir / tag)
    tmp = ckpt_dir / f"{universal_tag(tag)}.tmp.{os.getpid()}"  # one per attempt: never two converters in one
    try:
        convert_to_universal(ckpt_dir / tag, tmp)
        os.replace(tmp, out)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt_dir / tag}: conversion to the universal format failed:\n{e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
        for leftover in [ckpt_dir / universal_tag(c.tag), *ckpt_dir.glob(f"{universal_tag(c.tag)}.tmp*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        removed.append(c.tag)
    return removed


# ----------------------------------------------------------------------------------------------- policy
@dataclass
class ResumePoint:
    """A checkpoint to resume from, checked against the run."""

    directory: Path  # the checkpoints directory that holds it
    tag: str
    meta: CheckpointMeta
    universal: bool  # saved by another number of ranks or ZeRO stage: loads through DeepSpeed's universal format

    @property
    def path(self) -> Path:
        return self.directory / self.tag


class CheckpointManager:
    """The checkpoint policy of one run (rank 0 looks and decides, every rank gets the same answer):

    - `find()`: the checkpoint `checkpoint.resume` names (auto: the newest valid one in the run's directory),
      checked against the run (model, global batch, training data, ZeRO stage): a `ResumePoint`, or None.
    - `load(point)`: converts it to DeepSpeed's universal format when another number of ranks or stage saved it,
      loads it into the engine (and every rank's RNG states when the ranks are the same); returns its step.
    - `save(step)`: a checkpoint of the run at `step`, then retention.

    `run` is the run's own meta at step 0: what a checkpoint must agree with, and the template of what is saved.
    """

    def __init__(self, ckpt_dir: Path, cfg: CheckpointConfig, *, engine: Engine, world: World, run: CheckpointMeta):
        self.dir = Path(ckpt_dir)
        self.cfg = cfg
        self.engine = engine
        self.world = world
        self.run = run

    # ------------------------------------------------------------------------------------------- find
    def find(self) -> ResumePoint | None:
        if self.cfg.resume == "none":
            if list_checkpoints(self.dir):
                raise CheckpointError(
                    f"checkpoint.resume: none, but {self.dir} holds checkpoints of an earlier run; use another "
                    f"train.run_dir, resume it (checkpoint.resume=auto) or start it over ({SET_ASIDE})"
                )
            return None
        found = None
        if self.world.is_main:  # rank 0 looks, reads and checks; every rank gets its answer or its error
            try:
                found = self._find()
            except Exception as e:  # raised below on every rank
                found = e
        found = self.world.broadcast(found)
        if isinstance(found, Exception):
            raise found
        return found

    def _find(self) -> ResumePoint | None:
        located = self._locate()
        if located is None:
            return None
        directory, tag = located
        meta = read_meta(directory, tag)
        self.check(directory / tag, meta)
        check_pickles(directory / tag)
        universal = meta.zero_stage > 0 and (
            meta.world_size != self.run.world_size or meta.zero_stage != self.run.zero_stage
        )
        return ResumePoint(directory, tag, meta, universal)

    def _locate(self) -> tuple[Path, str] | None:
        """(checkpoints directory, tag) that checkpoint.resume names; None: start fresh."""
        resume, checksums = self.cfg.resume, self.cfg.checksums
        if resume == "auto":
            tag = newest_valid(self.dir, checksums=checksums)
            if tag is None:
                self._none_valid()
            return (self.dir, tag) if tag else None
        path = Path(resume)
        if path.is_dir() and ((path / RECORD).exists() or (path / META).exists()):
            src, tag = path.parent, path.name
        elif path.is_dir():
            src, tag = path, newest_valid(path, checksums=checksums)
            if tag is None:
                raise CheckpointError(f"checkpoint.resume: {path} holds no valid checkpoint")
        else:
            src, tag = self.dir, resume
        problem = validate(src, tag, checksums=checksums)
        if problem:
            raise CheckpointError(f"checkpoint.resume: {problem}")
        return src, tag

    def _none_valid(self) -> None:
        """No valid checkpoint in the run's directory. Starting from step 0 is right only when no save ever finished
        there (nothing but the leftovers of an interrupted first save, no `latest`); otherwise a run would be
        silently thrown away: refuse, listing each checkpoint and what is wrong with it."""
        listed = list_checkpoints(self.dir, checksums=self.cfg.checksums)
        latest = read_latest(self.dir)
        if latest is None and all(not (self.dir / c.tag / RECORD).exists() for c in listed):
            if listed:
                log.warning(
                    "%s: %s left by a first save that never finished; starting from step 0",
                    self.dir,
                    ", ".join(c.tag for c in listed),
                )
            return
        lines = "\n".join(f"  {c.tag}: {c.problem}" for c in listed) or "  (no checkpoint directories left)"
        named = f" (`latest` names {latest})" if latest is not None else ""
        raise CheckpointError(
            f"{self.dir} holds no valid checkpoint, but a run saved here before{named}:\n{lines}\n"
            f"Nothing was loaded or changed. Repair or restore the checkpoints, or start over: {SET_ASIDE}, or "
            "use another train.run_dir"
        )

    def check(self, where: Path, meta: CheckpointMeta) -> None:
        """Refuse a checkpoint this run cannot continue, naming the difference."""
        defaults = dataclasses.asdict(ModelConfig())  # keys added since the checkpoint was saved have their default
        old_model, new_model = {**defaults, **meta.config["model"]}, {**defaults, **self.run.config["model"]}
        for key in ("activation_checkpointing",):  # may change between attempts
            old_model.pop(key, None)
            new_model.pop(key, None)
        diff = [
            f"model.{k}: {old_model.get(k)!r} -> {new_model.get(k)!r}"
            for k in new_model
            if old_model.get(k) != new_model.get(k)
        ]
        if diff:
            raise CheckpointError(f"{where}: the model differs from the checkpoint's: {'; '.join(diff)}")
        old_skips = Skips(meta.config.get("data", {}).get("skip_samples"))
        new_skips = Skips(self.run.config.get("data", {}).get("skip_samples"))
        if not old_skips.same_until(new_skips, meta.consumed_samples):
            last = old_skips.number(meta.consumed_samples - 1)
            raise CheckpointError(
                f"{where}: data.skip_samples {new_skips.ranges} changes samples this run already trained on (up to "
                f"global sample {last}, {meta.consumed_samples} samples by step {meta.step}; its skips were "
                f"{old_skips.ranges}): only samples after {last} can be skipped from here"
            )
        if meta.global_batch != self.run.global_batch:
            raise CheckpointError(
                f"{where}: trained with a global batch of {meta.global_batch} sequences, this run has "
                f"{self.run.global_batch}; the data position is counted in batches, so it must stay the same"
            )
        if meta.data_fingerprint != self.run.data_fingerprint and not self.cfg.allow_data_change:
            raise CheckpointError(
                f"{where}: the training data differs from the checkpoint's (datasets, their contents, weights, "
                "seq_len or data.seed); set checkpoint.allow_data_change=true if that is deliberate"
            )
        old, new = meta.zero_stage, self.run.zero_stage
        if old != new and 3 in (old, new):
            raise CheckpointError(
                f"{where}: saved with ZeRO-{old}, this run uses ZeRO-{new}; moving between ZeRO-3 and the other "
                "stages is not supported (DeepSpeed's universal format differs between them); any number of ranks "
                "is, with the checkpoint's stage"
            )
        if (old == 0) != (new == 0):
            raise CheckpointError(
                f"{where}: saved with ZeRO-{old}, this run uses ZeRO-{new}; moving between no ZeRO and ZeRO is not "
                "supported (between ZeRO stages 1-3, and across numbers of ranks, it is)"
            )

    # ------------------------------------------------------------------------------------------- load
    def load(self, point: ResumePoint) -> int:
        """Load `point` into the engine (built with load_universal=point.universal); returns its step. A failure on
        any rank is raised on every rank."""
        tag = point.tag
        if point.universal:
            error = None
            if self.world.is_main:
                log.info(
                    "converting %s (%d ranks, ZeRO-%d) to DeepSpeed's universal format",
                    point.path,
                    point.meta.world_size,
                    point.meta.zero_stage,
                )
                try:
                    to_universal(point.directory, point.tag)
                except Exception as e:  # raised below on every rank
                    error = e
            error = self.world.broadcast(error)
            if error is not None:
                raise error
            tag = universal_tag(point.tag)
        error, rng = None, None
        try:
            with restricted_unpickling():
                loaded = self.engine.load(point.directory, tag)
            if loaded is None:
                error = CheckpointError(f"{point.directory / tag}: DeepSpeed could not load it")
            elif point.meta.world_size == self.run.world_size:  # each rank's own generators
                rng = read_rng(point.directory, point.tag, self.world.rank)
        except (AssertionError, FileNotFoundError, KeyError) as e:  # e.g. files removed while loading
            error = CheckpointError(f"{point.directory / tag}: DeepSpeed could not load it ({type(e).__name__}: {e})")
        except pickle.UnpicklingError as e:  # something beyond what restricted_unpickling allows
            error = CheckpointError(f"{point.directory / tag}: refusing to unpickle it ({e})")
        except Exception as e:  # raised below, after the other ranks know
            error = e
        if self.world.max(int(error is not None)):
            raise error or CheckpointError(f"{point.directory / tag}: another rank could not load it")
        if rng is not None:
            set_rng_state(rng)
        if self.world.is_main:
            log.info("resumed from %s at step %d", point.path, point.meta.step)
        return point.meta.step

    # ------------------------------------------------------------------------------------------- save
    def save(self, step: int) -> tuple[str, list[str]]:
        """A checkpoint of the run at `step` on every rank (a collective), then retention on rank 0; returns the
        tag and the tags removed."""
        tag = save(self.engine, self.world, self.dir, self.run.at(step), checksums=self.cfg.checksums)
        removed = []
        if self.world.is_main:
            removed = prune(self.dir, keep_last=self.cfg.keep_last, keep_every=self.cfg.keep_every, protect=tag)
        return tag, removed

    def latest(self) -> Path | None:
        """The newest complete checkpoint (what `latest` names), if any."""
        tag = read_latest(self.dir)
        return self.dir / tag if tag else None
