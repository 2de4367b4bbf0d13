"""Token shards in Megatron's indexed format (.bin/.idx) and the manifest that describes a dataset of them.

This module is the one owner of these bytes: data_prep writes shards through `ShardWriter`/`SplitWriter`, the
trainer reads them through `IndexedShard`, and `verify_dataset` checks a dataset against its manifest.

Format (little-endian), shared with Megatron-LM and GPT-NeoX so datasets move freely between them:
  .bin  the tokens of every document, concatenated, no header
  .idx  magic b"MMIDIDX\\x00\\x00" (9 bytes), version u64 = 1, dtype code u8, sequence count N u64,
        document-index length D+1 u64, N x int32 sequence lengths, N x int64 byte offsets into .bin,
        (D+1) x int64 document indices (here one document = one sequence, so [0, 1, ..., N])
Dataset layout: <dir>/manifest.json, <dir>/<split>/shard_00000.{bin,idx}, ... Every shard lies inside <dir>:
`read_manifest` refuses a shard path that leaves it, `dataset_shard` a symlink that resolves outside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from pretrain.fileutil import commit, sha256_file, stays_inside, tmp_name

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


def _map(path: Path, dtype) -> np.memmap:
    """A read-only memory map of a whole file (a ShardError if it cannot be read)."""
    try:
        return np.memmap(path, dtype=dtype, mode="r")
    except OSError as e:
        raise ShardError(f"{path}: cannot be read ({e.strerror or e})") from None


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
        if (idx_bytes := idx_path.stat().st_size) < HEADER.size:  # (and numpy cannot map an empty file)
            raise ShardError(f"{idx_path}: {idx_bytes} bytes is shorter than the {HEADER.size}-byte header")
        raw = _map(idx_path, np.uint8)
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
        self._bin_bytes = os.path.getsize(bin_path)
        self.check()  # before mapping the .bin: numpy refuses a size that is not a whole number of tokens
        self.tokens = _map(bin_path, self.dtype) if self._bin_bytes else np.zeros(0, dtype=self.dtype)

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


# ----------------------------------------------------------------------------------------------- manifest schema
# What read_manifest accepts, so that the code using a manifest may index it without looking. A dict is an object
# with these keys (a key ending in "?" may be absent; the key `str` stands for every key), a one-item list a list of
# such items, a pair (test, description) a value the test accepts.
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_relative_inside(v) -> bool:
    """A path relative to the dataset directory that does not leave it (symlinks are checked when opening)."""
    return isinstance(v, str) and stays_inside(v)


DTYPE_NAMES = tuple(np.dtype(t).name for t in DTYPE_CODES.values() if np.issubdtype(t, np.integer))
STRING = (lambda v: isinstance(v, str), "a string")
BOOL = (lambda v: isinstance(v, bool), "true or false")
COUNT = (lambda v: _is_int(v) and v >= 0, "a non-negative integer")
POSITIVE = (lambda v: _is_int(v) and v > 0, "a positive integer")
PIECE_ID = (lambda v: _is_int(v) and v >= -1, "an integer >= -1")  # sentencepiece: -1 when the piece is disabled
FRACTION = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)")
SHA256 = (lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None, "a sha256 (64 hex digits)")
DTYPE = (lambda v: v in DTYPE_NAMES, "one of " + ", ".join(DTYPE_NAMES))
SHARD_PATH = (_is_relative_inside, "a relative path inside the dataset directory")
SHARD_SCHEMA = {
    "prefix": SHARD_PATH,
    "documents": COUNT,
    "tokens": COUNT,
    "bin_bytes": COUNT,
    "bin_sha256": SHA256,
    "idx_sha256": SHA256,
}
MANIFEST_SCHEMA = {
    "format": STRING,
    "tool_version?": STRING,
    "tokenizer": {
        "path": STRING,
        "sha256": SHA256,
        "vocab_size": POSITIVE,
        "eod_id": COUNT,
        "bos_id": PIECE_ID,
        "pad_id?": PIECE_ID,
    },
    "dtype": DTYPE,
    "settings": {
        "text_field?": STRING,
        "val_fraction": FRACTION,
        "split_seed": COUNT,
        "shard_tokens": POSITIVE,
        "add_bos": BOOL,
        "on_error?": STRING,
        "dtype": DTYPE,
    },
    "split_rule?": STRING,
    "inputs": [{"path": STRING, "bytes": COUNT, "start?": COUNT, "end?": COUNT}],  # a byte range: one part's share
    "part?": {"index": COUNT, "of": POSITIVE, "all_inputs": [{"path": STRING, "bytes": COUNT}]},  # --num-parts
    "merged?": {"parts": POSITIVE, "part_shards": {str: [COUNT]}},  # data_prep merge: each part's shards per split
    "skipped": {str: COUNT},
    "unreadable?": [STRING],  # inputs skipped as unreadable (--on-error=skip)
    "zstd_without_checksum?": [STRING],  # .zst inputs whose corruption zstd could not detect
    "splits": {str: {"documents": COUNT, "tokens": COUNT, "text_bytes?": COUNT, "shards": [SHARD_SCHEMA]}},
}


def schema_error(value, schema, where: str = "") -> str | None:
    """The first place where `value` breaks `schema`, as "key.path: what is wrong"; None when it does not."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{where}: expected an object, got {_show(value)}"
        for key, sub in schema.items():
            if key is str:
                items = list(value.items())
            elif key.rstrip("?") in value:
                items = [(key.rstrip("?"), value[key.rstrip("?")])]
            elif key.endswith("?"):
                continue
            else:
                return f"{_join(where, key)}: missing"
            for k, v in items:
                if error := schema_error(v, sub, _join(where, k)):
                    return error
        return None
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{where}: expected a list, got {_show(value)}"
        for i, item in enumerate(value):
            if error := schema_error(item, schema[0], f"{where}[{i}]"):
                return error
        return None
    test, description = schema
    return None if test(value) else f"{where}: expected {description}, got {_show(value)}"


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_manifest(directory: str | Path) -> dict:
    """A dataset's manifest, checked against MANIFEST_SCHEMA: a ShardError names the file and the key otherwise."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: missing (the dataset is incomplete or was not made by data_prep tokenize)")
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as e:
        raise ShardError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # invalid JSON or UTF-8
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardError(f"{path}: format {found!r}, expected {MANIFEST_FORMAT!r}")
    if error := schema_error(manifest, MANIFEST_SCHEMA):
        raise ShardError(f"{path}: {error}")
    return manifest


def manifest_shards(manifest: dict) -> dict[str, list[ShardInfo]]:
    names = [f.name for f in fields(ShardInfo)]
    return {
        split: [ShardInfo(**{k: s[k] for k in names}) for s in entry["shards"]]
        for split, entry in manifest["splits"].items()
    }


def dataset_shard(root: str | Path, prefix: str) -> Path:
    """`root / prefix`, refused if one of its files resolves (through a symlinked file or directory) outside the
    dataset directory: a dataset's shards are its own, whatever its manifest says or its links point at."""
    path, inside = Path(root) / prefix, Path(root).resolve()
    for ext in (".bin", ".idx"):
        real = shard_file(path, ext).resolve()
        if not real.is_relative_to(inside):
            raise ShardError(f"{shard_file(path, ext)}: resolves to {real}, outside the dataset directory {inside}")
    return path


def verify_shard(root: Path, info: ShardInfo, manifest: dict, *, checksums: bool = True) -> list[str]:
    """Problems found in one shard against its manifest record and the manifest's dtype, vocab, special ids and
    settings (an empty list when it is sound)."""
    try:
        prefix = dataset_shard(root, info.prefix)
        shard = IndexedShard(prefix)
    except ShardError as e:
        return [str(e)]
    problems = []
    if shard.dtype.name != manifest["dtype"]:
        problems.append(f"{prefix}.idx: dtype {shard.dtype.name}, manifest says {manifest['dtype']}")
    if len(shard) != info.documents:
        problems.append(f"{prefix}.idx: {len(shard)} documents, manifest says {info.documents}")
    if shard.num_tokens != info.tokens:
        problems.append(f"{prefix}.bin: {shard.num_tokens} tokens, manifest says {info.tokens}")
    if shard.tokens.nbytes != info.bin_bytes:
        problems.append(f"{prefix}.bin: {shard.tokens.nbytes:,} bytes, manifest says {info.bin_bytes:,}")
    vocab = manifest["tokenizer"]["vocab_size"]
    if shard.num_tokens and (low := int(shard.tokens.min())) < 0:  # (int32 shards are signed)
        problems.append(f"{prefix}.bin: token id {low} is negative")
    if shard.num_tokens and (top := int(shard.tokens.max())) >= vocab:
        problems.append(f"{prefix}.bin: token id {top} >= vocab size {vocab}")
    problems += _document_problems(prefix, shard, manifest)
    if checksums:
        for ext, want in ((".bin", info.bin_sha256), (".idx", info.idx_sha256)):
            got = sha256_file(shard_file(prefix, ext))
            if got != want:
                problems.append(f"{prefix}{ext}: sha256 {got[:12]}..., manifest says {want[:12]}...")
    return problems


def _document_problems(prefix: Path, shard: IndexedShard, manifest: dict) -> list[str]:
    """What data_prep tokenize makes of every document: the bos id first if (and only if) settings.add_bos, the
    eod id last; and a shard closes at the first document that brings it to settings.shard_tokens."""
    eod, bos = manifest["tokenizer"]["eod_id"], manifest["tokenizer"]["bos_id"]
    add_bos, shard_tokens = manifest["settings"]["add_bos"], manifest["settings"]["shard_tokens"]
    n = len(shard)
    if n == 0:
        return []
    short = np.flatnonzero(shard.sizes < 1 + add_bos)
    if len(short):
        what = "its bos and eod ids" if add_bos else "its eod id"
        return [f"{prefix}.idx: document {short[0]} holds {shard.sizes[short[0]]} token(s), too few for {what}"]
    problems = []
    starts = shard.offsets // shard.dtype.itemsize
    last = shard.tokens[starts + shard.sizes - 1]
    if len(bad := np.flatnonzero(last != eod)):
        problems.append(
            f"{prefix}.bin: {len(bad)} of {n} documents do not end with the eod id {eod} "
            f"(document {bad[0]} ends with {last[bad[0]]})"
        )
    first = shard.tokens[starts]
    if len(bad := np.flatnonzero((first == bos) != add_bos)):
        start = "do not start" if add_bos else "start"
        problems.append(
            f"{prefix}.bin: {len(bad)} of {n} documents {start} with the bos id {bos}, but settings.add_bos is "
            f"{str(add_bos).lower()} (document {bad[0]} starts with {first[bad[0]]})"
        )
    if (before_last := shard.num_tokens - int(shard.sizes[-1])) >= shard_tokens:
        problems.append(
            f"{prefix}.bin: {before_last:,} tokens before its last document: settings.shard_tokens {shard_tokens:,} "
            "would have closed it earlier"
        )
    return problems


def verify_dataset(directory: str | Path, *, checksums: bool = True) -> list[str]:
    """Check a dataset against its manifest: the manifest's own consistency, every shard (inside the dataset
    directory, index, counts, dtype, token ids, documents, where shards break, checksums) and shard files that no
    manifest entry lists. (The tokenizer file and the train/val split are checked by data_prep inspect.)"""
    root = Path(directory)
    manifest = read_manifest(root)
    problems = _manifest_problems(root / MANIFEST, manifest)
    shard_tokens = manifest["settings"]["shard_tokens"]
    for split, shards in manifest_shards(manifest).items():
        # the last shard of a split may be short; in a merged dataset, the last shard of each part's split too
        counts = manifest.get("merged", {}).get("part_shards", {}).get(split, [len(shards)])
        ends = {int(e) - 1 for e in np.cumsum(counts)}
        for i, info in enumerate(shards):
            problems += verify_shard(root, info, manifest, checksums=checksums)
            if i not in ends and i < len(shards) - 1 and info.tokens < shard_tokens:
                problems.append(
                    f"{root / info.prefix}.bin: {info.tokens:,} tokens, fewer than settings.shard_tokens "
                    f"{shard_tokens:,}, but not the last shard of '{split}'"
                )
    return problems + _unlisted_shard_files(root, manifest)


def _manifest_problems(path: Path, manifest: dict) -> list[str]:
    """What a manifest contradicts in itself: dtype for the vocab, special ids, split totals, shards listed twice."""
    tok, dtype, settings = manifest["tokenizer"], manifest["dtype"], manifest["settings"]
    vocab, problems = tok["vocab_size"], []
    if dtype != dtype_for_vocab(vocab).name:
        problems.append(f"{path}: dtype is {dtype}, but a vocab of {vocab} needs {dtype_for_vocab(vocab).name}")
    if settings["dtype"] != dtype:
        problems.append(f"{path}: settings.dtype is {settings['dtype']}, dtype is {dtype}")
    for key in ("eod_id", "bos_id"):
        if tok[key] >= vocab:
            problems.append(f"{path}: tokenizer.{key} {tok[key]} is not below tokenizer.vocab_size {vocab}")
    if settings["add_bos"] and tok["bos_id"] < 0:
        problems.append(f"{path}: settings.add_bos is true, but the tokenizer has no bos id")
    seen: dict[str, str] = {}
    for split, shards in manifest_shards(manifest).items():
        entry = manifest["splits"][split]
        for key in ("documents", "tokens"):
            total = sum(getattr(s, key) for s in shards)
            if total != entry[key]:
                problems.append(f"{path}: splits.{split}.{key} is {entry[key]}, its shards hold {total}")
        for i, info in enumerate(shards):
            key = f"splits.{split}.shards[{i}]"
            if (first := seen.setdefault(Path(info.prefix).as_posix(), key)) != key:
                problems.append(f"{path}: {key}.prefix is {info.prefix}, already listed at {first}")
        if "merged" in manifest:
            counts = manifest["merged"]["part_shards"].get(split, [])
            if sum(counts) != len(shards) or len(counts) != manifest["merged"]["parts"]:
                problems.append(
                    f"{path}: merged.part_shards.{split} ({counts}) does not account for the {len(shards)} shard(s) "
                    f"of {manifest['merged']['parts']} part(s)"
                )
    return problems


def _unlisted_shard_files(root: Path, manifest: dict) -> list[str]:
    """Shard files in the dataset's directories that no manifest entry lists (an entry removed by hand?)."""
    listed = {
        shard_file(root / info.prefix, ext)
        for shards in manifest_shards(manifest).values()
        for info in shards
        for ext in (".bin", ".idx")
    }
    folders = {p.parent for p in listed} | {p for p in root.iterdir() if p.is_dir()}
    found = sorted(p for d in folders if d.is_dir() for p in d.iterdir() if p.suffix in (".bin", ".idx"))
    return [f"{p}: a shard file that no manifest entry lists (a removed entry?)" for p in found if p not in listed]
