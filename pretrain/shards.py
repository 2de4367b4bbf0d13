"""Token shards in Megatron's indexed format (.bin/.idx) and the manifest that describes a dataset of them.

This module is the one owner of these bytes: data_prep writes shards through `ShardWriter`/`SplitWriter`, the
trainer reads them through `IndexedShard`, and `verify_dataset` checks a dataset against its manifest.

Format (little-endian), shared with Megatron-LM and GPT-NeoX so datasets move freely between them:
  .bin  the tokens of every document, concatenated, no header
  .idx  magic b"MMIDIDX\\x00\\x00" (9 bytes), version u64 = 1, dtype code u8, sequence count N u64,
        document-index length D+1 u64, N x int32 sequence lengths, N x int64 byte offsets into .bin,
        (D+1) x int64 document indices (here one document = one sequence, so [0, 1, ..., N])
Dataset layout: <dir>/manifest.json, <dir>/<split>/shard_00000.{bin,idx}, ...
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.fileutil import commit, sha256_file, tmp_name

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index length
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "pretrain-shards/1"
REQUIRED_KEYS = (
    "tokenizer.path",
    "tokenizer.sha256",
    "tokenizer.vocab_size",
    "tokenizer.eod_id",
    "dtype",
    "settings.val_fraction",
    "settings.split_seed",
    "inputs",
    "skipped",
    "splits",
)


class ShardError(ValueError):
    """A shard or manifest that is malformed or does not match what describes it."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits (vocab <= 65536), else int32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


def shard_file(prefix: str | Path, ext: str) -> Path:
    """`<prefix>.bin` or `<prefix>.idx`. (Not Path.with_suffix: Megatron prefixes often contain dots.)"""
    return Path(str(prefix) + ext)


def shard_prefix(directory: Path, split: str, index: int) -> Path:
    return directory / split / f"shard_{index:05d}"


def encode_index(sizes: np.ndarray, dtype: np.dtype) -> bytes:
    """The .idx bytes for documents of `sizes` tokens each (one document per sequence)."""
    sizes = np.asarray(sizes, dtype=np.int32)
    n = len(sizes)
    offsets = np.zeros(n, dtype=np.int64)
    np.cumsum(sizes[:-1], dtype=np.int64, out=offsets[1:])
    offsets *= np.dtype(dtype).itemsize
    doc_idx = np.arange(n + 1, dtype=np.int64)
    header = HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[np.dtype(dtype)], n, n + 1)
    return b"".join(
        [header, sizes.astype("<i4").tobytes(), offsets.astype("<i8").tobytes(), doc_idx.astype("<i8").tobytes()]
    )


@dataclass
class ShardInfo:
    """What the manifest records of one finished shard; `prefix` is relative to the dataset directory."""

    prefix: str
    documents: int
    tokens: int
    bin_bytes: int
    bin_sha256: str
    idx_sha256: str


class ShardWriter:
    """Streams documents into `<prefix>.bin`/`.idx` under temporary names; `finish()` renames them into place.

    Until `finish()` returns, neither final name exists, so an interrupted write never looks complete.
    """

    def __init__(self, prefix: Path, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = tmp_name(shard_file(self.prefix, ".bin"))
        self._bin = open(self._bin_tmp, "wb")
        self._sha = hashlib.sha256()
        self._sizes: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: bytes | np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: `tokens` holds them concatenated (as `dtype`), `lengths` their token counts."""
        data = tokens.tobytes() if isinstance(tokens, np.ndarray) else tokens
        lengths = np.asarray(lengths, dtype=np.int32)
        if len(data) != int(lengths.sum(dtype=np.int64)) * self.dtype.itemsize:
            raise ShardError(f"{self.prefix}: {len(data)} bytes do not hold {int(lengths.sum())} tokens")
        self._bin.write(data)
        self._sha.update(data)
        self._sizes.append(lengths)
        self.documents += len(lengths)
        self.tokens += int(lengths.sum(dtype=np.int64))

    def finish(self, root: Path) -> ShardInfo:
        """Flush, write the index, rename both files into place and describe the shard relative to `root`."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, dtype=np.int32)
        idx = encode_index(sizes, self.dtype)
        idx_final = shard_file(self.prefix, ".idx")
        idx_tmp = tmp_name(idx_final)
        with open(idx_tmp, "wb") as f:
            f.write(idx)
            f.flush()
            os.fsync(f.fileno())
        # .bin first: a shard counts as present only once its .idx exists.
        commit(self._bin_tmp, shard_file(self.prefix, ".bin"))
        commit(idx_tmp, idx_final)
        return ShardInfo(
            prefix=self.prefix.relative_to(root).as_posix(),
            documents=self.documents,
            tokens=self.tokens,
            bin_bytes=self.tokens * self.dtype.itemsize,
            bin_sha256=self._sha.hexdigest(),
            idx_sha256=hashlib.sha256(idx).hexdigest(),
        )

    def abort(self) -> None:
        """Remove the temporary files (also after an interrupted `finish()`)."""
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)
        tmp_name(shard_file(self.prefix, ".idx")).unlink(missing_ok=True)


class SplitWriter:
    """Writes one split (train or val) as a series of shards of about `shard_tokens` tokens each.

    Documents are never cut: a shard is closed as soon as it holds `shard_tokens` or more. Where the shards
    break therefore depends only on the sequence of documents, never on how they were batched.
    """

    def __init__(
        self, root: Path, split: str, dtype: np.dtype, shard_tokens: int, *, first_index: int = 0, on_shard=None
    ):
        self.root, self.split, self.dtype, self.shard_tokens = Path(root), split, np.dtype(dtype), shard_tokens
        self.next_index = first_index
        self.on_shard = on_shard  # called with each finished ShardInfo
        self._writer: ShardWriter | None = None

    def add(self, tokens: bytes, lengths: np.ndarray) -> None:
        lengths = np.asarray(lengths, dtype=np.int32)
        itemsize = self.dtype.itemsize
        start_doc, start_byte = 0, 0
        while start_doc < len(lengths):
            if self._writer is None:
                self._writer = ShardWriter(shard_prefix(self.root, self.split, self.next_index), self.dtype)
                self.next_index += 1
            room = self.shard_tokens - self._writer.tokens
            cum = np.cumsum(lengths[start_doc:], dtype=np.int64)
            # First document whose end reaches the shard size closes the shard.
            stop = int(np.searchsorted(cum, room, side="left")) + 1
            stop = min(stop, len(cum))
            nbytes = int(cum[stop - 1]) * itemsize
            self._writer.add(tokens[start_byte : start_byte + nbytes], lengths[start_doc : start_doc + stop])
            start_doc += stop
            start_byte += nbytes
            if self._writer.tokens >= self.shard_tokens:
                self._close()

    def finish(self) -> None:
        if self._writer is not None and self._writer.documents:
            self._close()
        elif self._writer is not None:
            self._writer.abort()
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def _close(self) -> None:
        info = self._writer.finish(self.root)
        self._writer = None
        if self.on_shard is not None:
            self.on_shard(self.split, info)


class IndexedShard:
    """Memory-mapped reader of one `.bin`/`.idx` pair, ours or any Megatron writer's.

    `shard[i]` is document i's tokens (a read-only view); `sizes`, `offsets` and `doc_idx` are the index arrays.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        idx_path, bin_path = shard_file(self.prefix, ".idx"), shard_file(self.prefix, ".bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise ShardError(f"{p}: missing")
        raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
        if len(raw) < HEADER.size:
            raise ShardError(f"{idx_path}: {len(raw)} bytes is shorter than the {HEADER.size}-byte header")
        magic, version, code, n, d = HEADER.unpack(bytes(raw[: HEADER.size]))
        if magic != MAGIC:
            raise ShardError(f"{idx_path}: bad magic {magic!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise ShardError(f"{idx_path}: unsupported version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise ShardError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER.size + 4 * n + 8 * n + 8 * d
        if len(raw) != expected:
            raise ShardError(
                f"{idx_path}: {len(raw)} bytes, expected {expected} for {n} sequences and {d} document indices"
            )
        pos = HEADER.size
        self.sizes = np.frombuffer(raw, dtype="<i4", count=n, offset=pos)
        self.offsets = np.frombuffer(raw, dtype="<i8", count=n, offset=pos + 4 * n)
        self.doc_idx = np.frombuffer(raw, dtype="<i8", count=d, offset=pos + 12 * n)
        bin_bytes = os.path.getsize(bin_path)
        if bin_bytes == 0:
            self.tokens = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")
        self._bin_bytes = bin_bytes
        self.check()

    def check(self) -> None:
        """Index consistency: offsets follow the sizes and the .bin holds exactly the tokens indexed."""
        name, item = shard_file(self.prefix, ".idx"), self.dtype.itemsize
        if len(self.sizes) and self.sizes.min() < 0:
            raise ShardError(f"{name}: negative sequence length")
        expect = np.zeros(len(self.sizes), dtype=np.int64)
        np.cumsum(self.sizes[:-1], dtype=np.int64, out=expect[1:])
        if not np.array_equal(self.offsets, expect * item):
            bad = int(np.flatnonzero(self.offsets != expect * item)[0])
            raise ShardError(
                f"{name}: byte offset of sequence {bad} is {self.offsets[bad]}, expected {expect[bad] * item}"
            )
        if len(self.doc_idx) == 0 or self.doc_idx[0] != 0 or self.doc_idx[-1] != len(self.sizes):
            raise ShardError(f"{name}: document index must run from 0 to {len(self.sizes)}")
        if np.any(np.diff(self.doc_idx) < 0):
            raise ShardError(f"{name}: document index is not non-decreasing")
        total = int(self.sizes.sum(dtype=np.int64))
        if self._bin_bytes != total * item:
            raise ShardError(
                f"{shard_file(self.prefix, '.bin')}: {self._bin_bytes} bytes, index expects {total * item}"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.offsets[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: missing (the dataset is incomplete or was not made by data_prep tokenize)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardError(f"{path}: format {found!r}, expected {MANIFEST_FORMAT!r}")
    for key in REQUIRED_KEYS:
        node = manifest
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ShardError(f"{path}: no '{key}' (a damaged or hand-edited manifest?)")
            node = node[part]
    for split, entry in manifest["splits"].items():
        for field in ("documents", "tokens", "shards"):
            if not isinstance(entry, dict) or field not in entry:
                raise ShardError(f"{path}: no 'splits.{split}.{field}'")
    return manifest


def verify_shard(root: Path, info: ShardInfo, *, vocab_size: int | None, checksums: bool = True) -> list[str]:
    """Problems found in one shard against its manifest record (an empty list when it is sound)."""
    prefix = root / info.prefix
    try:
        shard = IndexedShard(prefix)
    except ShardError as e:
        return [str(e)]
    problems = []
    if len(shard) != info.documents:
        problems.append(f"{prefix}.idx: {len(shard)} documents, manifest says {info.documents}")
    if shard.num_tokens != info.tokens:
        problems.append(f"{prefix}.bin: {shard.num_tokens} tokens, manifest says {info.tokens}")
    if vocab_size is not None and shard.num_tokens and int(shard.tokens.max()) >= vocab_size:
        problems.append(f"{prefix}.bin: token id {int(shard.tokens.max())} >= vocab size {vocab_size}")
    if checksums:
        for ext, want in ((".bin", info.bin_sha256), (".idx", info.idx_sha256)):
            got = sha256_file(shard_file(prefix, ext))
            if got != want:
                problems.append(f"{prefix}{ext}: sha256 {got[:12]}..., manifest says {want[:12]}...")
    return problems


def manifest_shards(manifest: dict) -> dict[str, list[ShardInfo]]:
    return {split: [ShardInfo(**s) for s in entry["shards"]] for split, entry in manifest["splits"].items()}


def verify_dataset(directory: str | Path, *, checksums: bool = True) -> list[str]:
    """Check every shard of a dataset against its manifest: presence, index consistency, counts, checksums."""
    root = Path(directory)
    manifest = read_manifest(root)
    vocab = manifest["tokenizer"]["vocab_size"]
    problems = []
    for split, shards in manifest_shards(manifest).items():
        entry = manifest["splits"][split]
        for info in shards:
            problems += verify_shard(root, info, vocab_size=vocab, checksums=checksums)
        for key in ("documents", "tokens"):
            total = sum(getattr(s, key) for s in shards)
            if total != entry[key]:
                problems.append(f"{root / MANIFEST}: splits.{split}.{key} is {entry[key]}, its shards hold {total}")
    return problems
