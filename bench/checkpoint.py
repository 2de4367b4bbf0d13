"""Checkpoint speed: `pretrain.checkpoint.save`, `validate` and DeepSpeed's load against the raw speed of the disk.

    .venv/bin/python bench/checkpoint.py                      # about 20 s on 2 cores
    .venv/bin/python bench/checkpoint.py --repeats 1 --mb 100 --dir /mnt/scratch --keep

One process, fp32, ZeRO-1, CPU. The model is our Transformer (4 layers, d_model 384, seq 64) with the vocabulary
sized so that the whole training state is about --mb MB on disk (default 300; at least ~115): fp32 weights,
DeepSpeed's fp32 partition copy and AdamW's exp_avg and exp_avg_sq, 16 bytes per parameter. One optimizer step
on a random batch creates the optimizer state. In the directory the checkpoints go to (a temporary directory
under --dir, default the system's temp dir) it then measures, --repeats times interleaved, keeping each one's best:
  - raw write: a file of the checkpoint's size in 8 MiB chunks, fsync at the end,
  - raw read: that file read back in 8 MiB chunks, after dropping it from the page cache,
  - save: `pretrain.checkpoint.save(...)`, with checksums and without, from the call to its return,
  - validate: `pretrain.checkpoint.validate(..., checksums=True)` (sizes and CRC-32, the check before resuming),
  - load: `engine.load(dir, tag)` (DeepSpeed's load_checkpoint) into a fresh Engine and model (only the call is timed).
The page cache is dropped (fsync, then posix_fadvise DONTNEED; whether that worked is checked with mincore) before
every raw read, validate and load; `os.sync()` runs before every timed operation, so no write-back of an earlier
one is in flight. GB/s = bytes of the checkpoint directory / seconds (MB and GB are 10^6 and 10^9 bytes).
Prints a Markdown table, each operation against the raw figure of the same direction, the target
"save >= 50% of raw write", and a breakdown of one extra, instrumented save: DeepSpeed's torch.save calls,
our checksums (CRC-32) and fsyncs (save fsyncs every file before the record is written).
Temporary files are removed unless --keep (which keeps the last checkpoint and the DeepSpeed config).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import zlib
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from machine import cpu_model  # noqa: E402  (bench/ is on the path when run as a script)

from pretrain import checkpoint  # noqa: E402
from pretrain.checkpoint import CheckpointMeta  # noqa: E402
from pretrain.config import BatchPlan, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from pretrain.distributed import World  # noqa: E402
from pretrain.model import Transformer, padded_vocab  # noqa: E402

D_MODEL, N_LAYERS, N_HEADS, SEQ, BATCH = 384, 4, 6, 64, 2
BYTES_PER_PARAM = 16  # fp32 weights + fp32 partition copy + exp_avg + exp_avg_sq
OPTIM = OptimConfig(lr=3e-4, warmup_steps=0, weight_decay=0.1, grad_clip=1.0)
CHUNK = 8 << 20
ROWS = ["raw write", "raw read", "save (with checksums)", "save (no checksums)", "validate (CRC-32)", "load"]
DIRECTION = {"raw write": "write", "save (with checksums)": "write", "save (no checksums)": "write"}


def model_config(target_mb: float) -> ModelConfig:
    """Our layout with the vocabulary chosen so that 16 bytes per parameter come to about target_mb."""
    probe = ModelConfig(vocab_size=64, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, seq_len=SEQ)
    with torch.device("meta"):
        base = Transformer(probe).num_params()
    per_row = 2 * D_MODEL  # input embedding + output head (untied)
    rest = base - per_row * padded_vocab(probe)
    vocab = max(64, round((target_mb * 1e6 / BYTES_PER_PARAM - rest) / per_row / 64) * 64)
    return ModelConfig(vocab_size=vocab, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, seq_len=SEQ)


# ----------------------------------------------------------------------------------------------- page cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


def resident_pages(path: Path) -> tuple[int, int] | None:
    """(pages of `path` in the page cache, pages), by mincore; None where that cannot be asked."""
    size = path.stat().st_size
    if size == 0:
        return 0, 0
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    n = (size + page - 1) // page
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            vec = (ctypes.c_ubyte * n)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return sum(v & 1 for v in vec), n
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


class Cache:
    """Drops files from the page cache (fsync, then fadvise DONTNEED) and remembers whether that worked."""

    def __init__(self):
        self.left = 0  # pages still resident after dropping
        self.total = 0
        self.unknown = False  # mincore unavailable
        self.possible = hasattr(os, "posix_fadvise")

    def drop(self, paths: list[Path]) -> None:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # DONTNEED only drops clean pages
                if self.possible:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            pages = resident_pages(path)
            if pages is None:
                self.unknown = True
            else:
                self.left += pages[0]
                self.total += pages[1]

    def summary(self) -> str:
        if not self.possible:
            return "not possible (no posix_fadvise): reads may come from the page cache"
        if self.unknown:
            return "posix_fadvise(DONTNEED) applied; residency not checked (no mincore)"
        share = self.left / self.total if self.total else 0.0
        if share < 0.01:
            return f"possible: posix_fadvise(DONTNEED) left {share:.1%} of the pages resident (checked with mincore)"
        return f"NOT effective: {share:.0%} of the pages stayed resident after posix_fadvise(DONTNEED) (mincore)"


def files_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in files_of(directory))


# ----------------------------------------------------------------------------------------------- raw disk
def raw_write(path: Path, nbytes: int, block: memoryview) -> float:
    os.sync()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def raw_read(path: Path, cache: Cache) -> float:
    cache.drop([path])
    os.sync()
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- engine
def init_distributed() -> World:
    from pretrain.distributed import init_distributed

    world = init_distributed()  # a process group of one, as `python launch/pretrain.py` makes
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return world


def build_engine(cfg: ModelConfig, ds_json: Path):
    from pretrain.engine import Engine

    train = TrainConfig(ds_config=str(ds_json), micro_batch_seqs=BATCH, global_batch_seqs=BATCH, precision="fp32")
    engine = Engine(OPTIM, train, BatchPlan.resolve(train, seq_len=cfg.seq_len, world_size=1))
    engine.build(cfg, seed=0)  # the trainer's model + engine build
    return engine


def timed_save(engine, ckpt_dir: Path, step: int, checksums: bool) -> tuple[float, str]:
    meta = CheckpointMeta.of_run(
        global_batch=BATCH,
        world_size=1,
        zero_stage=engine.zero_stage,
        config={"bench": "checkpoint", "model": {"seq_len": SEQ}},
        data_fingerprint={},
    ).at(step)
    os.sync()
    t0 = time.perf_counter()
    tag = checkpoint.save(engine, World(), ckpt_dir, meta, checksums=checksums)
    return time.perf_counter() - t0, tag


def timed_validate(ckpt_dir: Path, tag: str, cache: Cache) -> float:
    cache.drop(files_of(ckpt_dir / tag))
    os.sync()
    t0 = time.perf_counter()
    problem = checkpoint.validate(ckpt_dir, tag, checksums=True)
    seconds = time.perf_counter() - t0
    if problem is not None:
        raise RuntimeError(f"validate failed: {problem}")
    return seconds


def timed_load(cfg: ModelConfig, ds_json: Path, ckpt_dir: Path, tag: str, cache: Cache, reference) -> float:
    engine = build_engine(cfg, ds_json)
    cache.drop(files_of(ckpt_dir / tag))
    os.sync()
    t0 = time.perf_counter()
    path = engine.load(ckpt_dir, tag)
    seconds = time.perf_counter() - t0
    if path is None:
        raise RuntimeError(f"load_checkpoint found nothing in {ckpt_dir / tag}")
    for (name, a), b in zip(engine.module.named_parameters(), reference.module.parameters()):
        if not torch.equal(a, b):
            raise RuntimeError(f"loaded weights differ from the saved ones: {name}")
    del engine
    gc.collect()
    return seconds


# ----------------------------------------------------------------------------------------------- breakdown
class Timers:
    """Wraps callables to add their wall time under a name; `restore()` puts the originals back."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._undo = []

    def wrap(self, owner, attr: str, name_of) -> None:
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            name = name_of(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1

        had = attr in vars(owner)  # a module's function, or a method looked up on the instance's class
        self._undo.append((owner, attr, original, had))
        setattr(owner, attr, wrapper)

    def restore(self) -> None:
        for owner, attr, original, had in reversed(self._undo):
            if had:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)
        self._undo.clear()


def breakdown(engine, ckpt_dir: Path, step: int) -> tuple[dict[str, tuple[float, int]], float, float, int]:
    """One instrumented save with checksums: seconds (and calls) per part, the total, and what fsyncing
    DeepSpeed's files afterwards costs (save does not), with their bytes."""
    timers = Timers()
    latest = ckpt_dir / checkpoint.LATEST
    kept = latest.read_bytes() if latest.is_file() else None  # --keep: point back at the kept checkpoint

    def ds_file(state_dict=None, path=None, *args, **kwargs):
        path = str(path if path is not None else args[0])
        return "DeepSpeed torch.save: " + ("optimizer states" if "optim_states" in path else "model states")

    timers.wrap(engine.ds, "save_checkpoint", lambda *a, **k: "DeepSpeed save_checkpoint (all of it)")
    timers.wrap(engine.ds.checkpoint_engine, "save", ds_file)
    timers.wrap(checkpoint, "crc32_file", lambda *a, **k: "CRC-32 of every file (ours)")
    timers.wrap(os, "fsync", lambda *a, **k: "fsync (ours: every file, record, latest, directories)")
    try:
        seconds, tag = timed_save(engine, ckpt_dir, step, checksums=True)
    finally:
        timers.restore()
    ds_files = [p for p in files_of(ckpt_dir / tag) if p.name.endswith("_states.pt")]
    parts = {k: (v, timers.calls[k]) for k, v in timers.seconds.items()}
    ds_bytes = sum(p.stat().st_size for p in ds_files)
    shutil.rmtree(ckpt_dir / tag)
    if kept is not None:
        latest.write_bytes(kept)
    return parts, seconds, ds_bytes


def crc32_speed(nbytes: int = 256 << 20) -> float:
    """In-memory CRC-32 throughput (bytes/s), 4 MiB updates as pretrain.checkpoint.crc32_file does."""
    block = os.urandom(1 << 22)
    crc = 0
    t0 = time.perf_counter()
    for _ in range(nbytes >> 22):
        crc = zlib.crc32(block, crc)
    return nbytes / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=None, help="where to write (a temporary directory is made inside)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each measurement's best is kept (default: 3)")
    p.add_argument("--mb", type=float, default=300, help="target size of the checkpoint in MB (default: 300)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and the last checkpoint")
    args = p.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    try:
        run(args, work, start)
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"total run time: {time.perf_counter() - start:.1f} s")
    return 0


def run(args: argparse.Namespace, work: Path, start: float) -> None:
    import deepspeed

    init_distributed()
    ds_json = work / "zero1.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    ckpt_dir = work / "checkpoints"
    cfg = model_config(args.mb)
    engine = build_engine(cfg, ds_json)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=g)
    engine.train_step([batch], OPTIM.lr)  # creates AdamW's exp_avg and exp_avg_sq
    n_params = engine.module.num_params()

    step = 1
    _, tag = timed_save(engine, ckpt_dir, step, checksums=True)  # warm-up, and the size to write raw
    nbytes = dir_bytes(ckpt_dir / tag)
    sizes = {p.name: p.stat().st_size for p in files_of(ckpt_dir / tag)}
    shutil.rmtree(ckpt_dir / tag)
    print(
        f"model: {N_LAYERS} layers, d_model {D_MODEL}, vocab {padded_vocab(cfg)}, {n_params / 1e6:.2f}M parameters; "
        f"checkpoint {nbytes / 1e6:.1f} MB ({nbytes / n_params:.1f} bytes/parameter) in {ckpt_dir}",
        flush=True,
    )
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:3]:
        print(f"  {name}: {size / 1e6:.1f} MB")

    cache = Cache()
    block = memoryview(os.urandom(CHUNK))
    raw = work / "raw.bin"
    best = dict.fromkeys(ROWS, float("inf"))
    for r in range(args.repeats):
        t = {"raw write": raw_write(raw, nbytes, block)}
        t["raw read"] = raw_read(raw, cache)
        raw.unlink()
        step += 1
        t["save (no checksums)"], other = timed_save(engine, ckpt_dir, step, checksums=False)
        shutil.rmtree(ckpt_dir / other)
        step += 1
        t["save (with checksums)"], tag = timed_save(engine, ckpt_dir, step, checksums=True)  # `latest` names it
        t["validate (CRC-32)"] = timed_validate(ckpt_dir, tag, cache)
        t["load"] = timed_load(cfg, ds_json, ckpt_dir, tag, cache, engine)
        if r < args.repeats - 1 or not args.keep:
            shutil.rmtree(ckpt_dir / tag)
        for k, v in t.items():
            best[k] = min(best[k], v)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()), flush=True)

    parts, total, ds_bytes = breakdown(engine, ckpt_dir, step + 1)
    report(best, nbytes, cache, (parts, total, ds_bytes), deepspeed.__version__, args)


def report(best, nbytes, cache, instrumented, ds_version, args) -> None:
    parts, total, ds_bytes = instrumented
    cpu = cpu_model()
    print(
        f"\n{date.today()} | {cpu} | {os.cpu_count()} cores, {args.threads} threads, 1 process, fp32, ZeRO-1 | "
        f"torch {torch.__version__}, deepspeed {ds_version}"
    )
    print(f"page cache dropping before reads: {cache.summary()}")
    print(f"best of {args.repeats}; vs raw = against raw write (saves) or raw read (validate, load)\n")
    print("| operation | MB | seconds | GB/s | vs raw |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in ROWS:
        sec = best[name]
        raw = best["raw write"] if DIRECTION.get(name) == "write" else best["raw read"]
        print(f"| {name} | {nbytes / 1e6:.1f} | {sec:.3f} | {nbytes / sec / 1e9:.3f} | {raw / sec:.0%} |")
    ratio = best["raw write"] / best["save (with checksums)"]
    print(f"\nsave >= 50% of raw write: {'PASS' if ratio >= 0.5 else 'FAIL'} ({ratio:.0%})")

    print(f"\nbreakdown of one instrumented save with checksums ({total:.3f} s; the parts add up to it):\n")
    print("| part | calls | seconds | share |")
    print("| --- | ---: | ---: | ---: |")
    ds_all = parts.pop("DeepSpeed save_checkpoint (all of it)", (0.0, 0))[0]
    rows = sorted(parts.items(), key=lambda kv: -kv[1][0])
    inside = sum(v for k, (v, _) in rows if k.startswith("DeepSpeed torch.save"))
    ours = sum(v for k, (v, _) in rows if not k.startswith("DeepSpeed"))
    rows.append(("DeepSpeed, besides torch.save (state dicts, recovery scripts)", (ds_all - inside, None)))
    rows.append(("ours, the rest (serialising rng, json, listing, barriers)", (total - ds_all - ours, None)))
    for name, (sec, calls) in rows:
        print(f"| {name} | {'' if calls is None else calls} | {sec:.3f} | {sec / total:.0%} |")
    print(f"\nDeepSpeed's *_states.pt files: {ds_bytes / 1e6:.1f} MB; in-memory CRC-32: {crc32_speed() / 1e9:.2f} GB/s")


if __name__ == "__main__":
    sys.exit(main())
