"""Tokenize a corpus into Megatron-format shards (.bin/.idx) with a manifest, in parallel and resumably.

The main process reads documents in order, assigns each to train or val by a hash of its text, and sends batches
to worker processes that run sentencepiece; results are written back in submission order. The output bytes thus
depend only on the inputs and the settings, never on the number of workers or the batch size.

A document longer than PIECE_CHARS characters is encoded in pieces cut at word boundaries, so sentencepiece's
memory (about 40 bytes per character it is handed at once) stays bounded; with the tokenizers train-tokenizer makes,
the ids are those of encoding it whole, except near a cut forced where PIECE_CHARS characters in a row hold no
space (see `LongTextEncoder`). With tokenizers whose settings make cuts inexact, long documents are encoded whole.

Inputs: see `data_prep.readers` (directories and `**` globs are searched without entering symlinked directories;
unreadable files and directories follow --on-error like other bad input; .zst frames without a content checksum
are reported, as zstd cannot detect their corruption).

Crash safety: shards are written under temporary names and renamed when complete; after each finished shard a
progress record (`.progress.json`) is replaced atomically; `manifest.json` is written last. `--resume` continues
from the completed shards (re-reading, but not re-tokenizing, the documents they hold).

As a library: `run(TokenizeSettings(inputs=["corpus/"], tokenizer="tok/sp.model", output="data/mycorpus"))`; the
CLI (`python -m data_prep tokenize`) only turns its arguments into those settings.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import signal
import stat
import sys
import time
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from data_prep.parts import check_part, plan
from data_prep.readers import INPUTS_HELP, ON_ERROR, REASONS, CorpusReader, InputError, OnError
from pretrain import __version__
from pretrain.fileutil import sha256_file, tmp_name, write_json_atomic
from pretrain.shards import (
    MANIFEST,
    MANIFEST_FORMAT,
    ShardError,
    ShardInfo,
    SplitWriter,
    dtype_for_vocab,
    read_manifest,
)
from pretrain.tokenizer import Tokenizer

log = logging.getLogger("data_prep.tokenize")

PROGRESS = ".progress.json"
LOCK = ".lock"
SPLITS = ("train", "val")
SPLIT_RULE = "val iff int.from_bytes(blake2b(utf8(text), digest_size=8, salt=seed as 16 bytes LE), 'little') < val_fraction * 2**64"
EXIT_INTERRUPTED = 130
PIECE_CHARS = 1 << 20  # longer documents are encoded in pieces of at most this many characters
FIRST_BATCH = 64 << 10  # text bytes of the first batch, and the least of any (see batch_limit)


class OutputError(RuntimeError):
    """The output directory cannot be used as asked (exists, locked, or does not match a run to resume)."""


class AlreadyComplete(Exception):
    pass


# ------------------------------------------------------------------------------------------------- settings
@dataclass
class TokenizeSettings:
    """Everything `run` reads. Field names are the CLI's flags (`shard_tokens` is `--shard-tokens`), defaults its
    defaults; invalid values raise `ValueError` naming the flag when the settings are made."""

    inputs: list[str]  # files, directories or globs (.txt, .jsonl, with .gz or .zst)
    tokenizer: str | Path  # sentencepiece .model file (from `data_prep train-tokenizer`)
    output: str | Path  # dataset directory to write (train/, val/, manifest.json)
    text_field: str = "text"  # JSON field holding the text in .jsonl inputs
    val_fraction: float = 0.01  # fraction of documents held out for validation, by hash of their text
    split_seed: int = 0  # seed of the train/val hash, in [0, 2**128)
    shard_tokens: int = 250_000_000  # close a shard once it holds this many tokens
    add_bos: bool = False  # prepend the bos id to every document (the eod id is always appended)
    workers: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))  # tokenizer processes
    batch_docs: int = 512  # documents per batch sent to a worker...
    batch_mb: float = 4.0  # ...or at most this many MB (2**20 bytes) of text, whichever comes first (batch_limit)
    on_error: OnError = "fail"  # bad input: stop with an error, or skip and count it
    resume: bool = False  # continue an interrupted run from its completed shards
    overwrite: bool = False  # delete an existing dataset in `output` and start over
    quiet: bool = False  # no progress bar and no summary
    num_parts: int = 1  # split the job into this many parts (data_prep/parts.py), one per machine...
    part: int | None = None  # ...and write this one (0-based): a dataset of its own; `data_prep merge` joins them

    def __post_init__(self) -> None:
        self.inputs = [os.fspath(p) for p in self.inputs]  # Path objects welcome; expand_inputs globs strings
        self.validate()

    def validate(self) -> None:
        """Raise ValueError, naming the CLI flag, for a value `run` cannot use."""
        if not 0 <= self.split_seed < 2**128:
            raise ValueError(f"--split-seed must be in [0, 2**128), got {self.split_seed}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("shard_tokens", "workers", "batch_docs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.batch_mb <= 0:
            raise ValueError(f"--batch-mb must be positive, got {self.batch_mb}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        check_part(self.num_parts, self.part)


# ----------------------------------------------------------------------------------------------- split rule
def is_val(data: bytes, val_fraction: float, salt: bytes) -> bool:
    """The train/val split of one document: a pure function of its text, so it never moves between runs."""
    h = int.from_bytes(hashlib.blake2b(data, digest_size=8, salt=salt).digest(), "little")
    return h < val_fraction * 2**64


def split_salt(seed: int) -> bytes:
    return seed.to_bytes(16, "little")


# ----------------------------------------------------------------------------------------------- workers
SPACES = " \u2581"  # a space, and "▁" (the whitespace marker, which sentencepiece keeps as is): both become "▁"
_PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece


def piecewise_obstacle(proto: sentencepiece_model_pb2.ModelProto) -> str | None:
    """The setting of a model that makes `LongTextEncoder`'s cuts at word boundaries inexact, or None (the model is
    one for which they are exact: train-tokenizer's are)."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if not trainer.split_by_whitespace:
        return "trainer_spec.split_by_whitespace is false (pieces may span words)"
    if trainer.treat_whitespace_as_suffix:
        return "trainer_spec.treat_whitespace_as_suffix is true"
    if not norm.escape_whitespaces:
        return "normalizer_spec.escape_whitespaces is false"
    if norm.remove_extra_whitespaces:
        return "normalizer_spec.remove_extra_whitespaces is true"
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        return f"normalizer_spec.name is {norm.name!r}, not 'identity'"
    pieces = proto.pieces
    # e.g. a user-defined symbol with a space inside; the cheap test first (a model has tens of thousands of pieces)
    for i, piece in enumerate([p.piece for p in pieces]):
        if "\u2581" in piece[1:] and pieces[i].type in (_PIECE.NORMAL, _PIECE.USER_DEFINED):
            if re.search("[^\u2581]\u2581", piece):
                return f"its piece {piece!r} spans a word boundary"
    return None


def warn_if_encoded_whole(long: LongTextEncoder, name: str) -> None:
    """Log, once per run (the main process calls it), that long documents are encoded whole with this model."""
    if long.obstacle:
        log.warning(
            "%s: %s, so encoding a long document in pieces could change its token ids: documents longer than %d "
            "characters are encoded whole (sentencepiece needs about 40 bytes per character)",
            name,
            long.obstacle,
            PIECE_CHARS,
        )


class LongTextEncoder:
    """Encodes a text in pieces of at most `piece_chars` characters, so that sentencepiece's memory (about 40 bytes
    per character it is handed at once) stays bounded whatever the length of the text.

    A piece ends at a word boundary: before a run of spaces (or "▁", which the identity normalization leaves as is,
    so sentencepiece cannot tell it from a space) that follows another character. The next piece starts after the
    run's first character, which its dummy prefix ("▁") stands for. A model trained with split_by_whitespace
    (sentencepiece's default, and train-tokenizer's) has no piece that spans such a boundary, so the ids are exactly
    those of the whole text.

    That holds only for models without the settings `piecewise_obstacle` names (whitespace as a suffix, extra
    whitespace removed, a normalization other than identity, ...); with such a model a text is encoded whole.

    Where `piece_chars` characters in a row hold no space (e.g. Chinese), a piece ends after its last newline, else
    after exactly `piece_chars` characters, and the next is encoded without the dummy prefix. The text survives
    (with byte fallback), but the ids are not always the whole text's: at a newline they are when the model has byte
    fallback (else a run of unknown characters across the cut is one <unk> whole, two in pieces) and no piece with a
    newline followed by another character (train-tokenizer's models have no piece with a newline); at a cut
    mid-text they differ where a piece of the model would span the cut.
    """

    def __init__(self, sp: spm.SentencePieceProcessor):
        proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
        self.sp, self.dummy = sp, proto.normalizer_spec.add_dummy_prefix
        self.obstacle = piecewise_obstacle(proto)
        self.whole = self.obstacle is not None  # cuts could change the ids: encode texts whole

    @cached_property
    def sp_cont(self) -> spm.SentencePieceProcessor:
        """The model without its dummy prefix, for the text after a cut with no space (made the first time)."""
        proto = sentencepiece_model_pb2.ModelProto.FromString(self.sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def encode(self, text: str, piece_chars: int) -> Iterator[list[int]]:
        """The ids of `text`, a piece at a time."""
        start, sp = 0, self.sp
        while not self.whole and len(text) - start > piece_chars:
            end = start + piece_chars
            cut = max(text.rfind(c, start + 1, end) for c in SPACES)
            while cut > start and text[cut - 1] in SPACES:
                cut -= 1  # a run of spaces starts the next piece, as "▁▁" pieces may exist
            if cut > start:
                yield sp.encode(text[start:cut], out_type=int)
                start, sp = (cut + 1 if self.dummy else cut), self.sp  # the dummy prefix stands for the space
            else:
                cut = text.rfind("\n", start, end) + 1 or end
                yield sp.encode(text[start:cut], out_type=int)
                start, sp = cut, self.sp_cont
        yield sp.encode(text[start:], out_type=int)


# What the workers use: set by the main process just before it forks them, so they inherit the loaded model and
# start at once (no model loaded per worker), and share its memory.
_worker: dict = {}


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops the pool


def encode_batch(batch: dict[str, list[bytes]]) -> dict[str, tuple[bytes, np.ndarray]]:
    """Tokenize each split's documents (UTF-8 bytes: sentencepiece reads them as they are, and they cross the process
    boundary as a copy, not re-encoded); returns per split the concatenated tokens (with EOD) and the lengths."""
    sp, long, eod, bos, code = _worker["sp"], _worker["long"], _worker["eod"], _worker["bos"], _worker["code"]
    out = {}
    for split, docs in batch.items():
        if not docs:
            continue
        # one thread per worker: workers are the parallelism. A document of at most PIECE_CHARS bytes has at most
        # that many characters; a longer one is decoded and LongTextEncoder decides.
        short = iter(sp.encode([d for d in docs if len(d) <= PIECE_CHARS], out_type=int, num_threads=1))
        tokens = array(code)
        lengths = np.empty(len(docs), dtype=np.int32)
        for i, data in enumerate(docs):
            begin = len(tokens)
            if bos is not None:
                tokens.append(bos)
            for ids in [next(short)] if len(data) <= PIECE_CHARS else long.encode(data.decode(), PIECE_CHARS):
                tokens.fromlist(ids)  # fromlist: about twice as fast as extend for a list
            tokens.append(eod)
            lengths[i] = len(tokens) - begin
        if sys.byteorder != "little":
            tokens.byteswap()
        out[split] = (tokens.tobytes(), lengths)
    return out


# ----------------------------------------------------------------------------------------------- output dir
def _our_files(out: Path) -> list[Path]:
    files = [p for p in (out / MANIFEST, out / PROGRESS) if p.exists()]
    for split in SPLITS:
        if (out / split).is_dir():
            files += sorted(p for p in (out / split).iterdir() if p.name.startswith("shard_"))
    return files


def _remove(files: list[Path]) -> None:
    for p in files:
        p.unlink(missing_ok=True)


def prepare_output(out: Path, fingerprint: dict, *, resume: bool, overwrite: bool) -> dict[str, list[ShardInfo]]:
    """Make `out` ready for writing; returns the completed shards a resumed run keeps, per split."""
    done: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
    existing = _our_files(out)
    if not existing:
        return done
    if overwrite:
        _remove(existing)
        return done
    if not resume:
        state = "a complete dataset" if (out / MANIFEST).exists() else "an incomplete dataset"
        raise OutputError(f"{out}: holds {state}; pass --resume to continue it or --overwrite to start over")
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        made = {
            **manifest["settings"],
            "tokenizer_sha256": manifest["tokenizer"]["sha256"],
            "inputs": manifest["inputs"],
            **({"part": manifest["part"]} if "part" in manifest else {}),
        }
        now = {
            **fingerprint,
            "inputs": [{k: v for k, v in i.items() if k != "mtime_ns"} for i in fingerprint["inputs"]],
        }
        _refuse_changes(out / MANIFEST, made, now, "the complete dataset")
        raise AlreadyComplete(f"{out}: already complete ({MANIFEST} exists); nothing to do")
    progress = out / PROGRESS
    if progress.exists():
        record = json.loads(progress.read_text())
        _refuse_changes(progress, record["fingerprint"], fingerprint, "the interrupted run")
        for split in SPLITS:
            for s in record["shards"][split]:
                info = ShardInfo(**s)
                for ext, want in ((".bin", info.bin_sha256), (".idx", info.idx_sha256)):
                    path = out / (info.prefix + ext)
                    if not path.is_file() or sha256_file(path) != want:
                        raise OutputError(f"{path}: missing or changed since it was recorded; pass --overwrite")
                done[split].append(info)
    keep = {out / (i.prefix + ext) for infos in done.values() for i in infos for ext in (".bin", ".idx")}
    _remove([p for p in existing if p.parent.name in SPLITS and p not in keep])  # partial shard files
    return done


def _refuse_changes(path: Path, old: dict, new: dict, what: str) -> None:
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        raise OutputError(
            f"{path}: cannot resume, these settings differ from {what}: {', '.join(changed)} (pass --overwrite to start over)"
        )


def lock_output(out: Path):
    """Create `out` if needed and hold its lock file for this run (OutputError if another run holds it)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is not a directory" if blocker else e.strerror
        raise OutputError(f"{out}: cannot be used as the output directory ({why})") from None
    path = out / LOCK
    not_regular = OutputError(f"{path}: is not a regular file; remove it")
    # never through a symlink, never truncating: a planted link must not clobber (or create) its target; never
    # waiting: opening a FIFO for writing waits for a reader (with O_NONBLOCK it fails with ENXIO instead)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EISDIR):
            raise not_regular from None
        why = "is a symlink; remove it" if e.errno == errno.ELOOP else f"cannot be opened ({e.strerror})"
        raise OutputError(f"{path}: {why}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO with a reader, a device, ...
        os.close(fd)
        raise not_regular
    f = os.fdopen(fd, "w")  # only flock-ed, never written: O_NONBLOCK may stay
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise OutputError(f"{out}: another tokenize run is writing here") from None
    return f


# ----------------------------------------------------------------------------------------------- the run
def batch_limit(k: int, remaining: int, batch_bytes: int, workers: int) -> int:
    """The text bytes after which batch `k` (0-based) closes, with `remaining` raw input bytes still unread: small at
    first (the workers start at once: FIRST_BATCH, doubling), then `batch_bytes`, and small again toward the end of
    the input, so that no worker idles while another finishes a big last batch."""
    return min(batch_bytes, max(FIRST_BATCH, min(FIRST_BATCH << min(k, 32), remaining // (4 * workers))))


def batches(
    reader,
    done_docs: dict[str, int],
    *,
    val_fraction: float,
    seed: int,
    batch_docs: int,
    batch_bytes: int,
    workers: int,
    stats: dict,
):
    """Group documents into batches per split (their UTF-8 bytes), skipping those already in completed shards
    (resume). Batch sizes follow `batch_limit`; the output never depends on them."""
    # The main process's per-document work (workers only encode): `is_val` inlined, counts kept in locals and
    # flushed into `stats` before each yield.
    salt, limit, blake2b = split_salt(seed), val_fraction * 2**64, hashlib.blake2b
    seen = dict.fromkeys(SPLITS, 0)
    nbytes = dict.fromkeys(SPLITS, 0)
    batch, n, size, k = {s: [] for s in SPLITS}, 0, 0, 0
    limit_bytes = batch_limit(0, reader.total_raw_bytes, batch_bytes, workers)

    def flush() -> None:
        for s in SPLITS:
            stats[s]["documents"] += seen[s] - counted[s]
            stats[s]["text_bytes"] += nbytes[s]
            counted[s], nbytes[s] = seen[s], 0

    counted = dict(seen)
    for doc in reader:
        data = doc.data
        # is_val(data, val_fraction, salt), without the call; no hash at all when nothing is held out
        split = (
            "val"
            if limit and int.from_bytes(blake2b(data, digest_size=8, salt=salt).digest(), "little") < limit
            else "train"
        )
        seen[split] += 1
        nbytes[split] += len(data)
        if seen[split] <= done_docs[split]:
            continue
        batch[split].append(data)
        n += 1
        size += len(data)
        if n >= batch_docs or size >= limit_bytes:
            flush()
            yield batch
            batch, n, size, k = {s: [] for s in SPLITS}, 0, 0, k + 1
            limit_bytes = batch_limit(k, reader.total_raw_bytes - reader.raw_bytes_read, batch_bytes, workers)
    flush()
    if n:
        yield batch


def run(settings: TokenizeSettings) -> dict:
    """Tokenize `settings.inputs` into `settings.output`; returns the manifest written."""
    t0 = time.perf_counter()
    reader = CorpusReader.from_inputs(settings.inputs, text_field=settings.text_field, on_error=settings.on_error)
    all_inputs = [{"path": str(p), "bytes": p.stat().st_size} for p in reader.paths]
    slices = plan(reader.paths, [i["bytes"] for i in all_inputs], settings.num_parts)[settings.part or 0]
    reader.read_slices(slices)
    paths = reader.paths
    tok = Tokenizer(settings.tokenizer)
    long = LongTextEncoder(tok.sp)
    warn_if_encoded_whole(long, settings.tokenizer)
    dtype = dtype_for_vocab(tok.vocab_size)
    out = Path(settings.output)
    tokenizer = tok.describe()
    recorded = {  # the settings the output bytes depend on: the manifest records them, --resume checks them
        "text_field": settings.text_field,
        "val_fraction": settings.val_fraction,
        "split_seed": settings.split_seed,
        "shard_tokens": settings.shard_tokens,
        "add_bos": settings.add_bos,
        "on_error": settings.on_error,
        "dtype": dtype.name,
    }
    inputs = [s.describe() for s in slices]
    fingerprint = {
        **recorded,
        "tokenizer_sha256": tokenizer["sha256"],
        "inputs": [{**i, "mtime_ns": p.stat().st_mtime_ns} for i, p in zip(inputs, paths)],
    }
    part = None
    if settings.num_parts > 1:  # what `data_prep merge` checks: the same inputs in all parts, each part once
        part = {"index": settings.part, "of": settings.num_parts, "all_inputs": all_inputs}
        fingerprint["part"] = part
    lock = lock_output(out)
    try:
        done = prepare_output(out, fingerprint, resume=settings.resume, overwrite=settings.overwrite)
        shards = {s: list(done[s]) for s in SPLITS}

        def record_shard(split: str, info: ShardInfo) -> None:
            shards[split].append(info)
            write_json_atomic(
                out / PROGRESS,
                {"fingerprint": fingerprint, "shards": {s: [asdict(i) for i in shards[s]] for s in SPLITS}},
            )

        writers = {
            s: SplitWriter(out, s, dtype, settings.shard_tokens, first_index=len(done[s]), on_shard=record_shard)
            for s in SPLITS
        }
        stats = {s: {"documents": 0, "text_bytes": 0} for s in SPLITS}
        if any(done.values()):
            log.info("resuming: %s", ", ".join(f"{len(done[s])} {s} shard(s)" for s in SPLITS))
        try:
            new_tokens = _tokenize(settings, reader, writers, tok, long, dtype, done, stats)
            for w in writers.values():
                w.finish()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        if sum(stats[s]["documents"] for s in SPLITS) == 0 and part is None:  # a part may hold none
            raise InputError(f"no documents in {len(paths)} input file(s): {', '.join(str(p) for p in paths[:5])}")
        manifest = {
            "format": MANIFEST_FORMAT,
            "tool_version": __version__,
            "tokenizer": tokenizer,
            "dtype": dtype.name,
            "settings": recorded,
            "split_rule": SPLIT_RULE,
            "inputs": inputs,
            **({"part": part} if part is not None else {}),
            "skipped": {r: reader.skipped.get(r, 0) for r in REASONS},
            "unreadable": reader.unreadable,  # files and directories skipped as unreadable (--on-error=skip)
            "zstd_without_checksum": reader.unchecked,  # .zst inputs whose corruption zstd could not detect
            "splits": {
                s: {
                    "documents": sum(i.documents for i in shards[s]),
                    "tokens": sum(i.tokens for i in shards[s]),
                    "text_bytes": stats[s]["text_bytes"],
                    "shards": [asdict(i) for i in shards[s]],
                }
                for s in SPLITS
            },
        }
        write_json_atomic(out / MANIFEST, manifest)
        (out / PROGRESS).unlink(missing_ok=True)
    except BaseException:
        # Ctrl-C may land anywhere, even between opening a temporary file and recording it; the output directory
        # is locked by this run, so every temporary file in it is ours to remove.
        tmps = [tmp_name(out / MANIFEST), tmp_name(out / PROGRESS)]
        _remove(tmps + [p for s in SPLITS for p in (out / s).glob("shard_*.tmp")])
        raise
    finally:
        lock.close()
    elapsed = time.perf_counter() - t0
    if not settings.quiet:
        print_summary(out, manifest, elapsed=elapsed, new_tokens=new_tokens, raw_bytes=reader.total_raw_bytes)
    return manifest


def _tokenize(settings: TokenizeSettings, reader, writers, tok, long, dtype, done, stats) -> int:
    """The parallel part: batches out to the workers, results back in order to the split writers."""
    done_docs = {s: sum(i.documents for i in done[s]) for s in SPLITS}
    gen = batches(
        reader,
        done_docs,
        val_fraction=settings.val_fraction,
        seed=settings.split_seed,
        batch_docs=settings.batch_docs,
        batch_bytes=int(settings.batch_mb * 2**20),
        workers=settings.workers,
        stats=stats,
    )
    # fork: the workers inherit the loaded model (`_worker`) and start at once (spawn costs an interpreter and
    # imports each); the pool exists before any other thread (tqdm's monitor) does.
    _worker.update(
        sp=tok.sp,
        long=long,
        eod=tok.eod_id,
        bos=tok.bos_id if settings.add_bos else None,
        code="H" if dtype.name == "uint16" else "i",
    )
    pool = mp.get_context("fork").Pool(settings.workers, initializer=_init_worker)
    bar = None  # made at the first result: importing tqdm overlaps the workers' first batches
    t0, tokens, docs, shown = time.perf_counter(), 0, 0, 0

    def consume(result: dict) -> None:
        nonlocal bar, tokens, docs, shown
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(
                total=reader.total_raw_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=None if not settings.quiet else True,
                desc="tokenize",
                mininterval=1.0,
            )
        for split, (data, lengths) in result.items():
            writers[split].add(data, lengths)
            tokens += int(lengths.sum(dtype=np.int64))
            docs += len(lengths)
        bar.update(reader.raw_bytes_read - shown)
        shown = reader.raw_bytes_read
        el = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{docs / el:,.0f} docs/s, {tokens / el / 1e6:.2f}M tok/s", refresh=False)

    try:
        pending: deque = deque()
        for batch in gen:
            pending.append(pool.apply_async(encode_batch, (batch,)))
            while len(pending) >= 2 * settings.workers:
                consume(pending.popleft().get())
        while pending:
            consume(pending.popleft().get())
        pool.close()
    finally:
        pool.terminate()
        pool.join()
        if bar is not None:
            bar.close()
        _worker.clear()
    return tokens


def print_summary(out: Path, manifest: dict, *, elapsed: float, new_tokens: int, raw_bytes: int) -> None:
    rows = [("split", "documents", "tokens", "shards", "text MB", "tokens/doc")]
    for s, e in manifest["splits"].items():
        rows.append(
            (
                s,
                f"{e['documents']:,}",
                f"{e['tokens']:,}",
                str(len(e["shards"])),
                f"{e['text_bytes'] / 1e6:,.1f}",
                f"{e['tokens'] / max(e['documents'], 1):,.0f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    skipped = {k: v for k, v in manifest["skipped"].items() if v}
    print("skipped:", ", ".join(f"{k}={v}" for k, v in skipped.items()) if skipped else "none")
    for key, what in (
        ("unreadable", "unreadable, not read"),
        ("zstd_without_checksum", "zstd frames without a checksum (corruption in them goes undetected)"),
    ):
        if manifest[key]:
            print(f"{what}: {_some(manifest[key])}")
    print(
        f"{elapsed:.1f} s, {new_tokens / elapsed / 1e6:.2f}M tokens/s, {raw_bytes / elapsed / 1e6:.1f} MB/s of input -> {out / MANIFEST}"
    )


def _some(paths: list[str], limit: int = 5) -> str:
    more = f" and {len(paths) - limit} more (see {MANIFEST})" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


# ----------------------------------------------------------------------------------------------- CLI
EXAMPLES = """
examples:
  # a folder of .txt files (one document each), 1% held out for validation
  python -m data_prep tokenize corpus/ --tokenizer tok/sp.model --output out/mydata
  # several JSON-lines files, compressed or not, with the text under "content"
  python -m data_prep tokenize 'dumps/*.jsonl.zst' extra.jsonl.gz --text-field content \\
      --tokenizer tok/sp.model --output out/web --shard-tokens 500000000
  # continue a run that was interrupted, or start over
  python -m data_prep tokenize corpus/ --tokenizer tok/sp.model --output out/mydata --resume
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep tokenize",
        description="Tokenize text corpora into Megatron-format token shards (.bin/.idx) plus manifest.json.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help=INPUTS_HELP)
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model file (from `data_prep train-tokenizer`)")
    p.add_argument("--output", required=True, help="dataset directory to write (train/, val/, manifest.json)")
    p.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl inputs (default: text)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="fraction of documents held out for validation, by hash of their text (default: 0.01)",
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val hash (default: 0)")
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=250_000_000,
        help="close a shard once it holds this many tokens (default: 250M)",
    )
    p.add_argument(
        "--add-bos", action="store_true", help="prepend the bos id to every document (the eod id is always appended)"
    )
    p.add_argument(
        "--workers", type=int, default=len(os.sched_getaffinity(0)), help="tokenizer processes (default: all cores)"
    )
    p.add_argument("--batch-docs", type=int, default=512, help="documents per batch sent to a worker (default: 512)")
    p.add_argument(
        "--batch-mb",
        type=float,
        default=4.0,
        help="...or at most this many MB of text, whichever comes first; smaller at the start and the end of the input "
        "(default: 4)",
    )
    p.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="fail",
        help="bad input (malformed or truncated data, an unreadable file or directory): stop with an error, or skip "
        "and count it (default: fail)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its completed shards")
    g.add_argument("--overwrite", action="store_true", help="delete an existing dataset in --output and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    g = p.add_argument_group("many machines (then: python -m data_prep merge PART_DIR... --output DIR)")
    g.add_argument(
        "--num-parts", type=int, default=1, help="split the job into this many parts, one per machine (default: 1)"
    )
    g.add_argument("--part", type=int, help="the part to write, 0 to num-parts - 1: a complete dataset of its own")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    try:
        settings = TokenizeSettings(**vars(p.parse_args(argv)))  # the parser's dests are the settings' fields
    except ValueError as e:
        p.error(str(e))  # usage and the message on stderr, exit status 2, as for any bad argument
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(settings)
    except AlreadyComplete as e:
        print(e)
    except (InputError, OutputError, ShardError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"interrupted: completed shards are kept in {settings.output}; rerun with --resume to continue",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
